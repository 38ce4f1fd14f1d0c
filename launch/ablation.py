#!/usr/bin/env python
"""HSC ablation on the synthetic set (paper Table 4 rows + the EPS pair); see hsc_fast/engine/ablation.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsc_fast.cli.ablation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
