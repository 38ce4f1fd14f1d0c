#!/usr/bin/env python
"""Train the HSC CAM network. Thin wrapper: everything lives in hsc_fast.engine.cam_trainer (see --help)."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsc_fast.cli.train_cam import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
