"""AffinityNet training labels from CAMs (PSA, Ahn & Kwak CVPR 2018): two dense CRFs, one rule.

What the authors do (jiwoon-ahn/psa, infer_cls.py ``_crf_with_alpha``, voc12/data.py
``VOC12AffDataset``, tool/imutils.py ``crf_inference`` / ``AvgPool2d``):

1. For the present classes' CAMs (normalised by their max), bg = (1 - max_k cam_k)^alpha is put
   FIRST and a dense CRF runs on [bg, cams] twice: alpha_low = 4 (a large bg score: only strong
   CAM survives as fg = confident foreground) and alpha_high = 32 (a tiny bg score: bg only where
   every CAM is ~0 = confident background). CRF: 10 mean-field iterations, Gaussian sxy 3 compat 3,
   bilateral sxy 80 srgb 13 compat 10 (``PSA_AFFINITY_CRF``; our seed preset has 8 iterations).
2. The CRF score maps (not labels) are cropped, flipped and average-pooled 8x8 to feature
   resolution (``downsample_scores``: zero padding to a multiple of 8 at the bottom/right, as
   skimage's block_reduce); then per pixel
      label = argmax of the low-alpha scores (its class), 255 where that argmax is the bg,
      0 (bg) where the argmax of the high-alpha scores is the bg,
      255 where the max of all scores is < 1e-5 (the zero padding of the crop).
   ``affinity_label_from_scores`` is that rule; ``affinity_label_map`` runs both CRFs and the
   rule at image resolution (stride 1) or pooled over the whole image at stride 8. PSA pools each
   training CROP (after padding and flip): ``refine.label_pooling: scores`` stores both score maps
   and does exactly that (hsc_fast.engine.affinity_data); ``vote`` stores the stride-1 label.

Labels are label ids as every label PNG of this project: 0 = background, k+1 = fg class k
(0..K-1 of the run's class set: 0..19 for VOC, 0..79 for COCO), 255 = no label. The CRFs run over
the image's present classes and the background only, so their cost does not grow with K. hsc_fast.losses.affinity.affinity_targets(label, bg_index=0) reads them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from hsc_fast.classes import IGNORE_INDEX, MAX_FG, ClassSet
from hsc_fast.crf import CrfParams, cam_to_crf_probs, crf_inference
from hsc_fast.errors import ConfigError, DataError

PSA_LOW_ALPHA = 4.0
PSA_HIGH_ALPHA = 32.0
PSA_AFFINITY_CRF = CrfParams(gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=80.0, bi_srgb=13.0, bi_compat=10.0, iters=10)
PSA_LABEL_STRIDE = 8
NO_SCORE_EPS = 1e-5


def _check_cams(cams, keys, classes: Optional[ClassSet] = None) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams, np.float32)
    keys = np.asarray(keys, np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise DataError(f"affinity labels: expected (K, H, W) CAMs for the K = {keys.size} given class keys, "
                        f"got shape {cams.shape}")
    n_fg = MAX_FG if classes is None else classes.num_fg
    if keys.size and (keys.min() < 0 or keys.max() >= n_fg):
        where = "" if classes is None else f" of class set {classes.name!r}"
        raise DataError(f"affinity labels: class keys must be fg indices 0..{n_fg - 1}{where}, got {keys.tolist()}")
    return cams, keys


def affinity_crf_scores(img_uint8: np.ndarray, cams: np.ndarray, alpha: float, *,
                        crf: CrfParams = PSA_AFFINITY_CRF, backend: str = "pydensecrf") -> np.ndarray:
    """(n+1, H, W) CRF marginals of [(1 - max cam)^alpha, cams] (bg first; CAMs clipped to [0, 1])."""
    probs = cam_to_crf_probs(np.clip(np.asarray(cams, np.float32), 0.0, 1.0), alpha)
    return crf_inference(img_uint8, probs, backend=backend, **crf.kwargs())


def downsample_scores(scores: np.ndarray, stride: int = PSA_LABEL_STRIDE) -> np.ndarray:
    """(C, H, W) -> (C, ceil(H/s), ceil(W/s)) block means, zero-padded at the bottom/right
    (skimage.measure.block_reduce(..., np.mean), PSA's AvgPool2d)."""
    if scores.ndim != 3:
        raise DataError(f"downsample_scores: expected (C, H, W) scores, got shape {scores.shape}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"affinity label stride: expected an integer >= 1, got {stride!r}")
    c, h, w = scores.shape
    ph, pw = -h % stride, -w % stride
    padded = np.pad(scores, ((0, 0), (0, ph), (0, pw)))
    blocks = padded.reshape(c, (h + ph) // stride, stride, (w + pw) // stride, stride)
    return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def affinity_label_from_scores(low: np.ndarray, high: np.ndarray, keys, *,
                               no_score_eps: float = NO_SCORE_EPS) -> np.ndarray:
    """PSA's rule on (n+1, h, w) low- and high-alpha scores (bg first) -> uint8 (h, w) label ids:
    the low-alpha class where it is fg, 0 where the high-alpha argmax is bg, 255 elsewhere and
    where every score is below ``no_score_eps``."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    if low.shape != high.shape or low.ndim != 3 or low.shape[0] != keys.size + 1:
        raise DataError(f"affinity_label_from_scores: expected two (K+1, h, w) maps for K = {keys.size} keys, "
                        f"got {low.shape} and {high.shape}")
    label_of_channel = np.concatenate([[0], keys + 1]).astype(np.uint8)
    low_arg, high_arg = low.argmax(axis=0), high.argmax(axis=0)
    label = np.where(low_arg == 0, np.uint8(IGNORE_INDEX), label_of_channel[low_arg])
    label = np.where(high_arg == 0, np.uint8(0), label)
    no_score = np.maximum(low.max(axis=0), high.max(axis=0)) < no_score_eps
    return np.where(no_score, np.uint8(IGNORE_INDEX), label).astype(np.uint8)


def affinity_label_map(img_uint8: np.ndarray, cams: np.ndarray, keys, *, alpha_low: float = PSA_LOW_ALPHA,
                       alpha_high: float = PSA_HIGH_ALPHA, crf: Optional[CrfParams] = None,
                       backend: str = "pydensecrf", stride: int = 1,
                       classes: Optional[ClassSet] = None) -> np.ndarray:
    """uint8 label (0 bg, key + 1, 255) for AffinityNet from one image's CAMs.

    img_uint8 (H, W, 3); cams (n, H, W) in [0, 1] for the present fg classes ``keys`` (the cam_npy
    layout; 0..K-1 of ``classes`` when given, else any fg index a uint8 label can hold). Runs the CRF at alpha_low and alpha_high (``PSA_AFFINITY_CRF`` unless ``crf``),
    pools the scores by ``stride`` (1: image resolution; 8: PSA's feature resolution) and applies
    ``affinity_label_from_scores``. No classes (n = 0): every pixel is bg.
    """
    cams, keys = _check_cams(cams, keys, classes)
    if not alpha_low < alpha_high:
        raise ConfigError(f"affinity labels: expected alpha_low < alpha_high, got {alpha_low} and {alpha_high}")
    params = PSA_AFFINITY_CRF if crf is None else crf
    low, high = (affinity_crf_scores(img_uint8, cams, a, crf=params, backend=backend) for a in (alpha_low, alpha_high))
    if stride != 1:
        low, high = downsample_scores(low, stride), downsample_scores(high, stride)
    return affinity_label_from_scores(low, high, keys)
