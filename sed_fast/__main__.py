"""``python -m sed_fast ...``: the same as the ``sed-fast`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
