"""The in-training CRF of HSC and its three backends (config key ``loss.crf.backend``).

Every step the authors refine the 16x16 pseudo-labels of both views with ``crf_inference_label``
(pydensecrf, one image at a time on the CPU): unary ``unary_from_labels(labels, K+1, gt_prob=0.7,
zero_unsure=False)``, Gaussian kernel sxy 3 / compat 3, bilateral sxy 50 / srgb 5 / compat 10,
10 mean-field iterations, argmax. All three backends take the same arguments

    fn(images (N, 3, h, w) uint8, labels (N, h, w) int, n_labels, gt_prob, iters,
       gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat) -> (N, h, w) int64 on labels' device

* ``lattice`` (default of the official and paper presets): ``crf_lattice.lattice_crf_labels``, the
  same permutohedral-lattice approximation of the Gaussian kernels as pydensecrf, batched (one
  lattice per kernel for the whole batch, image index in the keys) on the training device. Measured:
  pydensecrf's labels on 100 % of pixels at the training parameters (random inputs and 16x16 crops
  of the real fixture photos, tests/crf/test_lattice.py).
* ``dense``: ``crf_dense.dense_crf_labels``, mean-field with the EXACT Gaussian kernels
  exp(-|f_i - f_j|^2 / 2) as (N, 256, 256) matrices. Not the authors' CRF: the lattice is an
  approximation of these kernels, so ~1 % of the labels differ (99.0-99.3 % agreement measured).
* ``pydensecrf``: the authors' computation itself, a per-image loop over ``hsc_fast.crf.crf_labels``
  on the CPU (the reference; needs the pydensecrf2 package).

Each backend runs with autocast disabled: under the engine's bf16 autocast the filters would
otherwise be rounded to bf16 and the labels would no longer be the authors'.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from hsc_fast.classes import VOC
from hsc_fast.registry import TRAIN_CRF_BACKENDS



def pydensecrf_crf_labels(images_uint8: torch.Tensor, labels: torch.Tensor, n_labels: int = VOC.num_classes,
                          gt_prob: float = 0.7, iters: int = 10, gauss_sxy: float = 3, gauss_compat: float = 3,
                          bi_sxy: float = 50, bi_srgb: float = 5, bi_compat: float = 10) -> torch.Tensor:
    """The reference: pydensecrf on each image in turn (what the authors run), on the CPU."""
    from hsc_fast.crf import crf_labels  # noqa: PLC0415
    from hsc_fast.crf.lattice import _check_label_batch  # noqa: PLC0415

    _check_label_batch(images_uint8, labels)
    rgb = images_uint8.detach().permute(0, 2, 3, 1).cpu().numpy()
    lab = labels.detach().cpu().numpy()
    out = [crf_labels(np.ascontiguousarray(rgb[i]), lab[i], n_labels, gt_prob=gt_prob, iters=iters,
                      gauss_sxy=gauss_sxy, gauss_compat=gauss_compat, bi_sxy=bi_sxy, bi_srgb=bi_srgb,
                      bi_compat=bi_compat, backend="pydensecrf") for i in range(lab.shape[0])]
    refined = np.stack(out) if out else lab.astype(np.int64)
    return torch.from_numpy(refined.astype(np.int64)).to(labels.device)


def _lattice(images_uint8, labels, **params):
    from hsc_fast.crf.lattice import lattice_crf_labels  # noqa: PLC0415
    return lattice_crf_labels(images_uint8, labels, **params)


def _dense(images_uint8, labels, **params):
    from hsc_fast.crf.dense import dense_crf_labels  # noqa: PLC0415
    return dense_crf_labels(images_uint8, labels, **params)


def register_train_backend(name: str, fn: Callable[..., torch.Tensor], *, batched: bool) -> Callable:
    """Make ``fn(images_uint8 (N,3,H,W), labels (N,H,W), **params) -> labels`` selectable as
    ``loss.crf.backend: name``; ``batched``: the whole batch in one call on its device."""
    fn.batched = batched
    return TRAIN_CRF_BACKENDS.register(name, fn)


register_train_backend("lattice", _lattice, batched=True)
register_train_backend("dense", _dense, batched=True)
register_train_backend("pydensecrf", pydensecrf_crf_labels, batched=False)


def train_crf_fn(backend: str = "lattice") -> Callable[..., torch.Tensor]:
    """The training-CRF function of ``loss.crf.backend`` (float32: autocast disabled inside)."""
    fn = TRAIN_CRF_BACKENDS.get(backend)

    def refine(images_uint8: torch.Tensor, labels: torch.Tensor, **params) -> torch.Tensor:
        with torch.autocast(labels.device.type, enabled=False):
            return fn(images_uint8, labels, **params)

    refine.backend = backend
    return refine
