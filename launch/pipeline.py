#!/usr/bin/env python
"""Whole pipeline under one launcher (deepspeed / torchrun / python); see hsc_fast/engine/pipeline.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsc_fast.cli.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
