"""Dense-CRF post-processing: one parameter set, named backends, a process pool for pydensecrf.

Model (Krähenbühl & Koltun 2011, as pydensecrf's DenseCRF2D builds it): unary energies, a
Gaussian kernel on pixel positions (``gauss_sxy``, Potts weight ``gauss_compat``) and a bilateral
kernel on positions and RGB (``bi_sxy``, ``bi_srgb``, ``bi_compat``), symmetric normalisation,
``iters`` mean-field iterations. Backends (``available_backends()``):

* ``"pydensecrf"``: the reference C++ implementation (``pydensecrf2``), one image per call; use
  ``crf_batch(..., workers=N)`` to spread images over processes.
* ``"gpu"``: hsc_fast.crf.lattice, the same permutohedral-lattice algorithm in torch, batched,
  on CUDA when available (CuPy hash build with the ``gpu`` extra) and on the CPU otherwise.

Unaries follow pydensecrf.utils: ``crf_inference`` takes probabilities and uses
``-log(clip(p, 1e-5, 1))`` (``unary_from_softmax``); ``crf_labels`` takes a label map and uses
``unary_from_labels(..., zero_unsure=False)`` (every value, 0 included, is a real class).

Presets (``CrfParams``): ``INFERENCE`` (seeds -> pseudo-labels, SEAM/PSA/HSC README),
``DEEPLAB_TEST`` (DeepLab test-time CRF), ``TRAIN`` (HSC's 16x16 training CRF; its batched backends,
``loss.crf.backend``, are in hsc_fast.crf.train).

This module imports torch only inside the ``gpu`` backend, so pool workers start light.
"""
from __future__ import annotations

import math
import multiprocessing
import sys
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from hsc_fast.crf.params import DEEPLAB_TEST, INFERENCE, TRAIN, CrfParams, validate_params  # noqa: F401 - the API
from hsc_fast.errors import ConfigError, DataError
from hsc_fast.registry import CRF_BACKENDS

UNARY_CLIP = 1e-5          # pydensecrf.utils.unary_from_softmax's default clip


# --------------------------------------------------------------------------------------------
# Backends: (images [(H,W,3) uint8], unaries [(C,H,W) float32], params) -> marginals [(C,H,W) float32]
# --------------------------------------------------------------------------------------------

Backend = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], CrfParams], list]


@dataclass(frozen=True)
class CrfBackend:
    """One inference-CRF backend: ``fn(images, unaries, params) -> marginals``; ``batched``: it takes
    many images per call on one device (no process pool), else one image per call in pool workers."""
    name: str
    fn: Backend
    batched: bool


def register_backend(name: str, fn: Backend, *, batched: bool) -> CrfBackend:
    """Make ``fn`` selectable as ``backend=name`` (``seeds.crf.backend``, ``deeplab.crf.backend``)."""
    return CRF_BACKENDS.register(name, CrfBackend(name, fn, batched))


def available_backends() -> list[str]:
    return sorted(CRF_BACKENDS.names())


def _get_backend(name: str) -> Backend:
    return CRF_BACKENDS.get(name).fn


def _pydensecrf_one(img: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf  # noqa: PLC0415 - only this backend needs it

    n_labels, h, w = unary.shape
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(n_labels, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    # pydensecrf needs a writable C-contiguous buffer (np.asarray(PIL image) is read-only).
    rgb = np.require(img, dtype=np.uint8, requirements=["C", "W"])
    crf.addPairwiseBilateral(sxy=params.bi_sxy, srgb=params.bi_srgb, rgbim=rgb, compat=params.bi_compat)
    return np.array(crf.inference(params.iters), dtype=np.float32).reshape(n_labels, h, w)


def _pydensecrf_backend(images, unaries, params):
    return [_pydensecrf_one(img, u, params) for img, u in zip(images, unaries)]


def _gpu_backend(images, unaries, params):
    from hsc_fast.crf.lattice import lattice_crf_batch  # noqa: PLC0415 - torch only when asked for

    return lattice_crf_batch(images, unaries, **params.kwargs())


register_backend("pydensecrf", _pydensecrf_backend, batched=False)
register_backend("gpu", _gpu_backend, batched=True)


# --------------------------------------------------------------------------------------------
# Unaries and input checks
# --------------------------------------------------------------------------------------------

def _check_image(img, where: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DataError(f"{where}: expected an RGB image as a (H, W, 3) uint8 numpy array, got {desc}")
    return img


def unary_from_probs(probs: np.ndarray, where: str = "crf probs") -> np.ndarray:
    """``-log(clip(p, 1e-5, 1))`` as float32 (C, H, W), like pydensecrf.utils.unary_from_softmax."""
    if not isinstance(probs, np.ndarray) or probs.ndim != 3 or probs.shape[0] < 1:
        raise DataError(f"{where}: expected a (C, H, W) numpy array of probabilities, got "
                        f"{getattr(probs, 'shape', type(probs).__name__)}")
    if not np.issubdtype(probs.dtype, np.floating) or not np.isfinite(probs).all():
        raise DataError(f"{where}: expected finite floating-point probabilities, got dtype {probs.dtype}")
    return -np.log(np.clip(probs, UNARY_CLIP, 1.0)).astype(np.float32)


def unary_from_label_map(labels: np.ndarray, n_labels: int, gt_prob: float, where: str = "crf labels") -> np.ndarray:
    """pydensecrf.utils.unary_from_labels(labels, n_labels, gt_prob, zero_unsure=False) as (C, H, W) float32."""
    if not 0.0 < gt_prob < 1.0:
        raise ConfigError(f"crf gt_prob: expected a value in (0, 1), got {gt_prob!r}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 2:
        raise ConfigError(f"crf n_labels: expected an integer >= 2, got {n_labels!r}")
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected a (H, W) integer label map, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise DataError(f"{where}: expected values in [0, {n_labels - 1}], got [{labels.min()}, {labels.max()}] "
                        "(map ignore/255 pixels to a class first)")
    unary = np.full((n_labels, labels.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    unary[labels.reshape(-1), np.arange(labels.size)] = -np.log(gt_prob)
    return unary.reshape(n_labels, *labels.shape)


def cam_to_crf_probs(cams_fg: np.ndarray, alpha: float) -> np.ndarray:
    """Seeds -> CRF probabilities: (K, H, W) fg scores in [0, 1] -> (K+1, H, W) float32.

    Channel 0 is the BACKGROUND ``(1 - max_k cam_k) ** alpha`` and channel k+1 is ``cams_fg[k]``
    (the SEAM/PSA post-processing layout; note it differs from the CAM tensors' bg-last layout,
    ``ClassSet.bg_index`` = K). K here is the number of CAMs given -- callers pass only the image's
    present classes, so the CRF cost does not depend on the class set's size (20 for VOC, 80 for
    COCO) -- and map the argmax channel back to label ids themselves (0 -> background, k+1 -> the
    label of the class of ``cams_fg[k]``). Like SEAM, the result is not renormalised.
    """
    if not isinstance(cams_fg, np.ndarray) or cams_fg.ndim != 3:
        raise DataError(f"cam_to_crf_probs cams_fg: expected a (K, H, W) numpy array, got "
                        f"{getattr(cams_fg, 'shape', type(cams_fg).__name__)}")
    if not (isinstance(alpha, (int, float, np.number)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"cam_to_crf_probs alpha: expected a finite number > 0, got {alpha!r}")
    cams = cams_fg.astype(np.float32, copy=False)
    if cams.size and (not np.isfinite(cams).all() or cams.min() < 0.0 or cams.max() > 1.0):
        raise DataError("cam_to_crf_probs cams_fg: expected finite scores in [0, 1] (normalise CAMs by their max "
                        f"first), got range [{np.nanmin(cams)}, {np.nanmax(cams)}]")
    top = cams.max(axis=0, keepdims=True) if cams.shape[0] else np.zeros((1, *cams.shape[1:]), np.float32)
    bg = np.power(1.0 - top, alpha).astype(np.float32)
    return np.concatenate([bg, cams], axis=0)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def _check_pair(img: np.ndarray, unary: np.ndarray, where: str) -> None:
    if unary.shape[1:] != img.shape[:2]:
        raise DataError(f"{where}: scores {unary.shape[1:]} do not match the image size {img.shape[:2]}")


def crf_inference(img_uint8_hwc: np.ndarray, probs_chw: np.ndarray, *, iters: int = INFERENCE.iters,
                  gauss_sxy: float = INFERENCE.gauss_sxy, gauss_compat: float = INFERENCE.gauss_compat,
                  bi_sxy: float = INFERENCE.bi_sxy, bi_srgb: float = INFERENCE.bi_srgb,
                  bi_compat: float = INFERENCE.bi_compat, backend: str = "pydensecrf") -> np.ndarray:
    """Dense CRF on class probabilities: (H,W,3) uint8 image, (C,H,W) probs -> (C,H,W) float32 marginals.

    Defaults are the ``INFERENCE`` preset; pass ``**DEEPLAB_TEST.kwargs()`` etc. for the others.
    """
    params = CrfParams(gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, iters)
    img = _check_image(img_uint8_hwc, "crf_inference img")
    unary = unary_from_probs(probs_chw, "crf_inference probs")
    _check_pair(img, unary, "crf_inference probs")
    return _get_backend(backend)([img], [unary], params)[0]


def crf_labels(img: np.ndarray, labels_hw: np.ndarray, n_labels: int, *, gt_prob: float = 0.7,
               iters: int = TRAIN.iters, gauss_sxy: float = TRAIN.gauss_sxy, gauss_compat: float = TRAIN.gauss_compat,
               bi_sxy: float = TRAIN.bi_sxy, bi_srgb: float = TRAIN.bi_srgb, bi_compat: float = TRAIN.bi_compat,
               backend: str = "pydensecrf", return_probs: bool = False) -> np.ndarray:
    """Dense CRF on a label map (HSC's ``crf_inference_label``): returns the (H,W) int64 argmax labels,
    or the (n_labels,H,W) marginals with ``return_probs=True``. Defaults are the ``TRAIN`` preset."""
    params = CrfParams(gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat, iters)
    img = _check_image(img, "crf_labels img")
    unary = unary_from_label_map(labels_hw, n_labels, gt_prob, "crf_labels labels_hw")
    _check_pair(img, unary, "crf_labels labels_hw")
    q = _get_backend(backend)([img], [unary], params)[0]
    return q if return_probs else q.argmax(0).astype(np.int64)


def _finish(q: np.ndarray, return_labels: bool) -> np.ndarray:
    return q.argmax(0).astype(np.int64) if return_labels else q


def _pool_task(task):
    """Worker body (module level so that spawn/forkserver children can unpickle it)."""
    img, probs, params, backend, return_labels = task
    return _finish(crf_inference(img, probs, backend=backend, **params.kwargs()), return_labels)


def _default_start_method() -> str:
    # fork after torch/CUDA/threads is unsafe; forkserver children come from a clean process.
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def crf_imap(pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, workers: int = 1, backend: str = "pydensecrf",
             chunksize: int = 1, gpu_batch: int = 8, return_labels: bool = False,
             start_method: str | None = None, **params) -> Iterator[np.ndarray]:
    """Lazily run crf_inference over (image, probs) pairs, results in input order.

    ``backend="pydensecrf"``: ``workers`` processes (1 = in this process), fed ``chunksize`` images per
    task, reading the input a window at a time so memory stays bounded on long lists.
    ``backend="gpu"``: batches of ``gpu_batch`` images through one lattice (``workers`` ignored).
    ``return_labels=True`` yields the (H,W) int64 argmax instead of the (C,H,W) marginals.
    """
    unknown = set(params) - set(CrfParams.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"crf parameters: unknown {sorted(unknown)}; expected {sorted(CrfParams.__dataclass_fields__)}")
    p = CrfParams(**params)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"crf workers: expected an integer >= 1, got {workers!r}")
    if chunksize < 1 or gpu_batch < 1:
        raise ConfigError(f"crf chunksize/gpu_batch: expected >= 1, got {chunksize}/{gpu_batch}")
    _get_backend(backend)
    pairs = iter(pairs)
    if CRF_BACKENDS.get(backend).batched:
        while batch := list(islice(pairs, gpu_batch)):
            images = [_check_image(img, "crf_batch images") for img, _ in batch]
            unaries = [unary_from_probs(pr, "crf_batch probs") for _, pr in batch]
            for img, u in zip(images, unaries):
                _check_pair(img, u, "crf_batch probs")
            yield from (_finish(q, return_labels) for q in _get_backend(backend)(images, unaries, p))
        return
    if workers == 1:
        for img, probs in pairs:
            yield _pool_task((img, probs, p, backend, return_labels))
        return
    ctx = multiprocessing.get_context(start_method or _default_start_method())
    window = workers * chunksize * 4
    with ctx.Pool(workers) as pool:
        while window_items := [(img, pr, p, backend, return_labels) for img, pr in islice(pairs, window)]:
            yield from pool.imap(_pool_task, window_items, chunksize=chunksize)


def crf_batch(images: Sequence[np.ndarray], probs_list: Sequence[np.ndarray], *, workers: int = 1,
              backend: str = "pydensecrf", chunksize: int = 1, gpu_batch: int = 8, return_labels: bool = False,
              start_method: str | None = None, **params) -> list[np.ndarray]:
    """crf_inference over lists (same parameters as crf_imap); returns a list in input order."""
    if len(images) != len(probs_list):
        raise DataError(f"crf_batch: {len(images)} images but {len(probs_list)} probability maps")
    return list(crf_imap(zip(images, probs_list), workers=workers, backend=backend, chunksize=chunksize,
                         gpu_batch=gpu_batch, return_labels=return_labels, start_method=start_method, **params))
