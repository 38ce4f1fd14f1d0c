"""`python -m hsc_fast.doctor` (console script `hsc-doctor`): the documented entry point; the command
itself lives in hsc_fast.cli.doctor."""
import sys

from hsc_fast.cli.doctor import main

if __name__ == "__main__":
    sys.exit(main())
