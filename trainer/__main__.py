"""`python -m trainer`: the same as the `lens-trainer` command."""

from trainer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
