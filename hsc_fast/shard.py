"""`python -m hsc_fast.shard` (console script `hsc-shard`): the documented entry point; the command
itself lives in hsc_fast.cli.shard."""
import sys

from hsc_fast.cli.shard import main

if __name__ == "__main__":
    sys.exit(main())
