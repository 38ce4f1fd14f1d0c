"""What the lattice and the exact dense CRF share: label unaries, normalisation, the mean-field loop."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from hsc_fast.errors import ConfigError, DataError

_NORM_EPS = 1e-20        # pydensecrf adds it before the inverse square root


def unary_from_labels_torch(labels: torch.Tensor, n_labels: int, gt_prob: float) -> torch.Tensor:
    """pydensecrf ``unary_from_labels(..., zero_unsure=False)``: (...,) int -> (..., n_labels) float32 energies."""
    if not 0.0 < gt_prob < 1.0:
        raise ConfigError(f"crf gt_prob: expected a value in (0, 1), got {gt_prob!r}")
    if n_labels < 2:
        raise ConfigError(f"crf n_labels: expected >= 2, got {n_labels!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_labels):
        raise DataError(f"crf labels: expected values in [0, {n_labels - 1}], got "
                        f"[{int(labels.min())}, {int(labels.max())}] (map ignore/255 to a class first)")
    # Energies computed in float64 then stored as float32, as numpy does there.
    n_energy = float(torch.tensor(-math.log((1.0 - gt_prob) / (n_labels - 1)), dtype=torch.float32))
    p_energy = float(torch.tensor(-math.log(gt_prob), dtype=torch.float32))
    unary = torch.full((*labels.shape, n_labels), n_energy, dtype=torch.float32, device=labels.device)
    unary.scatter_(-1, labels.long().unsqueeze(-1), p_energy)
    return unary


def symmetric_normalizer(kernel_row_sums: torch.Tensor) -> torch.Tensor:
    """pydensecrf's NORMALIZE_SYMMETRIC factor 1/sqrt(K 1 + 1e-20) (computed in float64 as it does)."""
    return (1.0 / torch.sqrt(kernel_row_sums.double() + _NORM_EPS)).to(kernel_row_sums.dtype)


def mean_field(unary: torch.Tensor, messages: Sequence[tuple[Callable[[torch.Tensor], torch.Tensor], float]],
               iters: int) -> torch.Tensor:
    """Potts mean-field: ``unary`` (..., C) energies, ``messages`` [(normalised filter, compat)], labels last.

    A Potts term ``w [l != l']`` contributes ``w * sum_{l' != l} (KQ)_l'``, which equals
    ``-w (KQ)_l`` up to a per-pixel constant that softmax ignores; hence ``+ w * KQ`` below.
    """
    q = torch.softmax(-unary, dim=-1)
    for _ in range(iters):
        logits = -unary
        for filt, compat in messages:
            logits = logits + compat * filt(q)
        q = torch.softmax(logits, dim=-1)
    return q
