"""``python -m vsl``: the same command line as the ``vsl`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
