"""`python -m hsc_fast.report` (console script `hsc-report`): the documented entry point; the command
itself lives in hsc_fast.cli.report."""
import sys

from hsc_fast.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
