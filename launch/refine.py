#!/usr/bin/env python
"""Refine seeds into Masks with PSA's AffinityNet and random walk. Thin wrapper: everything lives
in hsc_fast.engine.refine (see --help)."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsc_fast.cli.refine import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
