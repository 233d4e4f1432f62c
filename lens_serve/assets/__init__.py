"""What is built or found on this machine without a hub: model directories, the corpora that ship
inside packages, and the reference transformers forward over a built model."""
