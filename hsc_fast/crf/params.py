"""CRF parameters: one validated dataclass and the authors' three parameter sets.

``INFERENCE``: seeds -> pseudo-labels (SEAM/PSA/HSC README); ``DEEPLAB_TEST``: DeepLab's test-time
CRF; ``TRAIN``: HSC's 16x16 in-training CRF (with gt_prob 0.7 label unaries). Config sections
``seeds.crf``, ``deeplab.crf`` and ``loss.crf`` default to them (``preset`` selects another).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from hsc_fast.config import CRF_PRESETS
from hsc_fast.errors import ConfigError


def validate_params(iters, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat) -> None:
    """Raise ConfigError naming the first bad CRF parameter."""
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ConfigError(f"crf iters: expected an integer >= 0, got {iters!r}")
    for name, val in (("gauss_sxy", gauss_sxy), ("bi_sxy", bi_sxy), ("bi_srgb", bi_srgb)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.number)) or not math.isfinite(val) or val <= 0:
            raise ConfigError(f"crf {name}: expected a finite number > 0, got {val!r}")
    for name, val in (("gauss_compat", gauss_compat), ("bi_compat", bi_compat)):
        if isinstance(val, bool) or not isinstance(val, (int, float, np.number)) or not math.isfinite(val):
            raise ConfigError(f"crf {name}: expected a finite number, got {val!r}")


@dataclass(frozen=True)
class CrfParams:
    """Kernel widths, Potts weights and iteration count of the 2-D dense CRF."""
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bi_sxy: float = 80.0
    bi_srgb: float = 13.0
    bi_compat: float = 10.0
    iters: int = 8

    def __post_init__(self):
        validate_params(self.iters, self.gauss_sxy, self.gauss_compat, self.bi_sxy, self.bi_srgb, self.bi_compat)

    def kwargs(self) -> dict:
        """As keyword arguments for crf_inference / crf_labels / crf_batch."""
        return asdict(self)


# The numbers live in one place, hsc_fast.config.CRF_PRESETS (the config sections' defaults too).
INFERENCE = CrfParams(**CRF_PRESETS["inference"])
DEEPLAB_TEST = CrfParams(**CRF_PRESETS["deeplab_test"])
TRAIN = CrfParams(**CRF_PRESETS["train"])
