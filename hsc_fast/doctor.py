"""Old path of `python -m hsc_fast.cli.doctor`, kept for one release (0.2 removes it)."""
import sys

from hsc_fast.cli.doctor import main

if __name__ == "__main__":
    sys.exit(main())
