"""``python -m lens_serve``: the same command line as ``lens-serve``."""

import sys

from lens_serve.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
