"""`python -m hsc_fast.evaluate` (console script `hsc-evaluate`): the documented entry point; the command
itself lives in hsc_fast.cli.evaluate."""
import sys

from hsc_fast.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
