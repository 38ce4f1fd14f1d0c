"""`python -m hsc_fast.synth` (console script `hsc-synth`): the documented entry point; the command
itself lives in hsc_fast.cli.synth."""
import sys

from hsc_fast.cli.synth import main

if __name__ == "__main__":
    sys.exit(main())
