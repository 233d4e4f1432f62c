"""The command line and the demos."""
