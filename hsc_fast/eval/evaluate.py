"""Segmentation evaluation: confusion matrices, mIoU, and the background-threshold sweep of CAMs.

    python -m hsc_fast.evaluate --gt VOC/SegmentationClass --pred seeds/ [--list ids.txt] [--json out.json]
    python -m hsc_fast.evaluate --gt VOC/SegmentationClass --cam cam_npy/ --thresholds 0.00:0.60:0.01

Definitions (those of the VOC benchmark and of the authors' eval.py):
  * one confusion matrix per image (rows: ground truth 0..K, columns: prediction 0..K plus one
    "void" column for predictions of 255), summed over images; ground-truth 255 pixels are ignored.
    K is the class set's foreground count (``classes``: a hsc_fast.classes.ClassSet, default VOC),
    so the matrices are (K+1) x (K+2): 21 x 22 for VOC, 81 x 82 for COCO.
    A predicted 255 (an "uncertain" pseudo-label pixel) therefore counts as a miss (FN) of its
    ground-truth class and as nobody's false positive.
  * IoU_c = TP / (TP + FP + FN). mIoU, ``average="present"`` (the default): the mean IoU over the
    classes that occur in the ground truth or the prediction. ``average="all"``: the authors' rule
    (SEAM / PSA / HSC ``evaluation.py``: ``mean_c TP_c / (T_c + P_c - TP_c + 1e-10)`` over all K+1
    classes, 21 for VOC, 81 for COCO), so a class in neither counts as 0. The two agree whenever
    every class occurs (all of VOC train or val); on a small list they differ (one VOC image with 3
    classes: 21 / 3 = 7x apart).
  * CAM seeds at threshold t: argmax over [t, CAM_1..CAM_K] with ties going to the background,
    i.e. class argmax_k CAM_k where max_k CAM_k > t, else background (as the authors compute it).

The sweep evaluates every threshold from ONE pass over each CAM file: per pixel it finds the
number of thresholds below its max score, and one bincount over (that number, gt, fg argmax) gives
all per-threshold confusion matrices by cumulative sums -- exact, and as cheap as one evaluation.

Id list: ``--list`` (plain ids or the SEAM format). Default: the VOC train list, i.e.
``<gt>/../ImageSets/Segmentation/train.txt`` when it exists, else every ``*.png`` in ``--gt``.
Missing files raise DataError naming the id; with ``--allow-missing`` an id without a prediction
counts as an all-background prediction and an id without ground truth is skipped (both counted in
the JSON as ``n_missing_pred`` / ``n_missing_gt``, beside every mIoU). When no id has both a ground
truth and a prediction there is nothing to evaluate: NothingEvaluatedError (before any file is read).

CAM files: ``{id}.npy`` (the SEAM/HSC format: a pickled dict {fg class 0..K-1 -> (H, W) float}) read
with a restricted unpickler that rebuilds numpy arrays only (no arbitrary code), or ``{id}.npz``
with arrays ``keys`` (K,) and ``cams`` (K, H, W) -- the pickle-free variant.

Under torch.distributed (initialised by the caller) each rank evaluates ids[rank::world] and the
confusion matrices (their shape is the class set's) are all-reduced; every rank returns the same
result (every rank must be given the same class set).
"""
from __future__ import annotations

import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hsc_fast.classes import IGNORE_INDEX, VOC, ClassSet
from hsc_fast.errors import ConfigError, DataError
from hsc_fast.data.voc import read_id_list, read_label_png, safe_join

AVERAGES = ("present", "all")        # mIoU: over the classes that occur / over all K+1 (the authors')
AUTHORS_IOU_EPS = 1e-10              # the authors' evaluation.py: TP / (T + P - TP + 1e-10)


class NothingEvaluatedError(DataError):
    """No id of the list has both a ground truth and a prediction: there is no mIoU to report.
    ``before_work``: found by the pre-check, before any file was read (exit 2), else after (exit 1)."""

    def __init__(self, message: str, before_work: bool):
        super().__init__(message)
        self.before_work = before_work


# ----------------------------------------------------------------------------------- confusion

def confusion_shape(classes: ClassSet = VOC) -> tuple[int, int]:
    """(K+1, K+2): rows ground truth 0..K, columns prediction 0..K and the void column (21 x 22 for
    VOC, 81 x 82 for COCO)."""
    return classes.num_classes, classes.num_classes + 1


def _label_range_error(where: str, values: np.ndarray, classes: ClassSet) -> DataError:
    bad = [int(v) for v in np.unique(values) if v < 0 or (v > classes.num_fg and v != IGNORE_INDEX)][:5]
    return DataError(f"{where}: label values {bad} outside 0..{classes.num_fg} and {IGNORE_INDEX} "
                     f"(class set {classes.name!r}, {classes.num_fg} classes)")


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, *, classes: ClassSet = VOC) -> np.ndarray:
    """int64 (K+1, K+2) confusion of one image: rows ground truth, columns prediction (+ void).

    ``gt`` and ``pred`` hold labels 0..K and 255 (gt 255: ignored; pred 255: the void column);
    DataError for any other value (it would land in another class's cell)."""
    rows, cols = confusion_shape(classes)           # the void column is the last one, index K+1
    valid = gt != IGNORE_INDEX
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() > classes.num_fg):
        raise _label_range_error("confusion_matrix gt", g, classes)
    void = p == IGNORE_INDEX
    if p.size and (p.min() < 0 or np.any((p > classes.num_fg) & ~void)):
        raise _label_range_error("confusion_matrix pred", p[~void], classes)
    p[void] = cols - 1
    return np.bincount(g * cols + p, minlength=rows * cols).reshape(rows, cols)


def _n_classes_of(conf: np.ndarray) -> int:
    """K+1 from a (..., K+1, K+2) confusion stack."""
    if conf.ndim < 2 or conf.shape[-1] != conf.shape[-2] + 1:
        raise DataError(f"confusion of shape {conf.shape}: expected (..., K+1, K+2) (one void column)")
    return conf.shape[-2]


def iou_from_confusion(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU (fraction, NaN where the class is in neither gt nor prediction) and that mask,
    for a (..., K+1, K+2) confusion (the class count is its shape)."""
    conf = np.asarray(conf, dtype=np.float64)
    n = _n_classes_of(conf)
    tp = np.diagonal(conf[..., :n], axis1=-2, axis2=-1)
    gt_count = conf.sum(axis=-1)                          # TP + FN (void predictions are FN)
    pred_count = conf[..., :n].sum(axis=-2)               # TP + FP
    union = gt_count + pred_count - tp
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / np.where(present, union, 1.0), np.nan)
    return iou, present


def miou_from_confusion(conf: np.ndarray, average: str = "present") -> np.ndarray:
    """Mean IoU (fraction); works on (..., K+1, K+2) stacks. ``average``: "present" (the classes in
    the ground truth or the prediction) or "all" (the authors' rule: every one of the K+1 classes,
    IoU_c = TP / (T + P - TP + 1e-10), so an absent class counts 0)."""
    if average == "all":
        conf = np.asarray(conf, dtype=np.float64)
        n = _n_classes_of(conf)
        tp = np.diagonal(conf[..., :n], axis1=-2, axis2=-1)
        union = conf.sum(axis=-1) + conf[..., :n].sum(axis=-2) - tp
        return np.mean(tp / (union + AUTHORS_IOU_EPS), axis=-1)
    if average != "present":
        raise ConfigError(f"average {average!r}: expected one of {', '.join(AVERAGES)}")
    iou, present = iou_from_confusion(conf)
    n = present.sum(axis=-1)
    return np.where(n > 0, np.nansum(iou, axis=-1) / np.maximum(n, 1), np.nan)


def foreground_precision_recall(conf: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """Foreground (any class but background 0) taken as one class, in percent: precision = TP_fg /
    predicted foreground pixels (low: over-activation), recall = TP_fg / ground-truth foreground
    pixels (low: under-activation); a pixel of gt class a predicted as class b != a counts as TP_fg.
    Void predictions (255) are not foreground. None where a denominator is 0."""
    conf = np.asarray(conf, dtype=np.float64)
    n = _n_classes_of(conf)
    tp = conf[1:, 1:n].sum()
    pred_fg, gt_fg = conf[:, 1:n].sum(), conf[1:, :].sum()
    return (float(tp / pred_fg * 100) if pred_fg else None, float(tp / gt_fg * 100) if gt_fg else None)


# ------------------------------------------------------------------------------------ CAM files

def _check_cam_items(items: list, where: str, classes: ClassSet) -> tuple[np.ndarray, np.ndarray]:
    """[(key, array)] -> (keys ascending, stacked float32 cams), validating keys (0..K-1) and shapes."""
    k = classes.num_fg
    for key, _ in items:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= int(key) < k:
            raise DataError(f"{where}: CAM key {key!r}; expected class indices 0..{k - 1} "
                            f"(class set {classes.name!r}, {k} classes)")
    items = sorted(((int(k), np.asarray(a)) for k, a in items), key=lambda kv: kv[0])
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise DataError(f"{where}: CAM keys {keys} repeat a class")
    arrays = [a for _, a in items]
    if arrays and (any(a.ndim != 2 for a in arrays) or len({a.shape for a in arrays}) != 1):
        raise DataError(f"{where}: CAMs have shapes {[a.shape for a in arrays]}; expected equal (H, W)")
    stacked = np.stack(arrays).astype(np.float32) if arrays else np.zeros((0, 0, 0), np.float32)
    return np.asarray(keys, dtype=np.int64), stacked


def read_cam_file(path, *, classes: ClassSet = VOC) -> tuple[np.ndarray, np.ndarray]:
    """A CAM file -> (keys int64 (n,) fg class indices ascending, cams float32 (n, H, W)).

    Keys must be fg indices 0..K-1 of ``classes`` (0..19 for VOC, 0..79 for COCO). An image with no
    class stored gives n = 0 (cams (0, H, W) for .npz, (0, 0, 0) for .npy).
    """
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, cams = z["keys"], z["cams"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: expected an .npz with arrays 'keys' (K,) and 'cams' (K, H, W) ({e})") from e
        if keys.ndim != 1 or cams.ndim != 3 or len(keys) != len(cams):
            raise DataError(f"{path}: keys {keys.shape} / cams {cams.shape}; expected (K,) and (K, H, W)")
        if len(keys) == 0:
            return keys.astype(np.int64), cams.astype(np.float32)
        if not np.issubdtype(keys.dtype, np.integer):
            raise DataError(f"{path}: 'keys' has dtype {keys.dtype}; expected integers 0..{classes.num_fg - 1}")
        return _check_cam_items(list(zip(keys.tolist(), cams)), str(path), classes)
    from hsc_fast.data.voc import load_pickled_npy_dict  # restricted unpickler: numpy arrays and scalars only
    obj = load_pickled_npy_dict(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds {type(obj).__name__}; expected a dict "
                        f"{{class 0..{classes.num_fg - 1}: (H, W) CAM}}")
    return _check_cam_items(list(obj.items()), str(path), classes)


def seeds_from_cams(keys: np.ndarray, cams: np.ndarray, threshold: float,
                    shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """uint8 (H, W) labels: argmax over [threshold, cams] (ties -> background); fg class k -> label
    k + 1 (any class set: the keys say which classes the CAMs are)."""
    if len(keys) == 0:
        if shape is None:
            raise DataError("seeds_from_cams: no CAM stored and no image size given")
        return np.zeros(shape, dtype=np.uint8)
    top = cams.max(axis=0)
    cls = keys[cams.argmax(axis=0)] + 1
    return np.where(top > np.float32(threshold), cls, 0).astype(np.uint8)


def max_argmax(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and first argmax over axis 0 of a (K, N) array, one row at a time (numpy's argmax along
    a short first axis is strided and several times slower)."""
    top = cams[0].copy()
    arg = np.zeros(cams.shape[1], dtype=np.intp)
    for i in range(1, len(cams)):
        better = cams[i] > top            # strict: ties keep the first class, like np.argmax
        np.copyto(arg, i, where=better)
        np.maximum(top, cams[i], out=top)
    return top, arg


def count_below(thresholds: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many (ascending) thresholds are strictly below each value: searchsorted(side='left').

    For an evenly spaced grid an arithmetic guess corrected by exact comparisons replaces the
    binary search (3x faster); any value the correction cannot settle falls back to searchsorted.
    """
    ths = np.asarray(thresholds, np.float32)
    values = np.asarray(values, np.float32)
    n = len(ths)
    steps = np.diff(ths)
    if n < 3 or not np.all(np.isfinite(values)) or np.ptp(steps) > 1e-3 * steps[0]:
        return np.searchsorted(ths, values, side="left")
    ext = np.concatenate([[-np.inf], ths, [np.inf]]).astype(np.float32)   # ext[i + 1] == ths[i]
    guess = np.clip(np.ceil((values - ths[0]) / steps.mean()), 0, n).astype(np.intp)
    for _ in range(2):
        guess += ext[guess + 1] < values      # a threshold at the guess is still below: move up
        guess -= ext[guess] >= values         # the one before is not below: move down
    bad = (ext[guess] >= values) | (ext[guess + 1] < values)
    if bad.any():
        guess[bad] = np.searchsorted(ths, values[bad], side="left")
    return guess


def sweep_confusions(gt: np.ndarray, keys: np.ndarray, cams: np.ndarray,
                     thresholds: np.ndarray, *, classes: ClassSet = VOC) -> np.ndarray:
    """int64 (T, K+1, K+2): the confusion of the seeds at every threshold (ascending), in one pass.

    ``keys``: the fg classes (0..K-1) of the CAMs ``cams`` (n, H, W); ``gt``: labels 0..K and 255."""
    n_t = len(thresholds)
    n_cls, n_cols = confusion_shape(classes)
    g = gt.ravel().astype(np.intp)
    g[g == IGNORE_INDEX] = n_cls                  # an extra row, dropped below (no masked copies)
    if g.size and (g.min() < 0 or g.max() > n_cls):
        raise _label_range_error("sweep_confusions gt", gt, classes)
    keys = np.asarray(keys, np.intp)
    if keys.size and (keys.min() < 0 or keys.max() >= classes.num_fg):
        raise DataError(f"sweep_confusions: CAM keys {keys.tolist()}; expected class indices 0..{classes.num_fg - 1}")
    out = np.zeros((n_t, n_cls, n_cols), dtype=np.int64)
    if len(keys) == 0:   # everything background at every threshold
        out[:, :, 0] = np.bincount(g, minlength=n_cls + 1)[None, :n_cls]
        return out
    top, arg = max_argmax(cams.reshape(len(keys), -1))
    cls = keys[arg] + 1
    # A pixel is foreground exactly for the thresholds t_j < top, i.e. for j < n_below.
    n_below = count_below(thresholds, top)
    rows = n_cls + 1
    hist = np.bincount((n_below * rows + g) * n_cls + cls, minlength=(n_t + 1) * rows * n_cls)
    hist = hist.reshape(n_t + 1, rows, n_cls)[:, :n_cls]
    # foreground at threshold j: pixels with n_below > j (reverse cumulative sum over n_below)
    fg = np.cumsum(hist[::-1], axis=0)[::-1][1:]                       # (T, K+1, K+1)
    # background at threshold j: pixels with n_below <= j, whatever their fg class
    bg = np.cumsum(hist.sum(axis=2), axis=0)[:n_t]                     # (T, K+1)
    out[:, :, :n_cls] = fg
    out[:, :, 0] += bg
    return out


def parse_thresholds(text: str) -> np.ndarray:
    """'A:B:STEP' -> float32 thresholds A, A+STEP, ... < B (B excluded), rounded to 6 decimals."""
    try:
        a, b, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--thresholds {text!r}: expected A:B:STEP, e.g. 0.00:0.60:0.01") from None
    if step <= 0 or b <= a:
        raise ConfigError(f"--thresholds {text!r}: expected STEP > 0 and B > A")
    n = int(np.ceil((b - a) / step - 1e-9))
    return np.round(a + step * np.arange(n), 6).astype(np.float32)


# ------------------------------------------------------------------------------ per-id workers

@dataclass
class EvalJob:
    gt_dir: str
    pred_dir: str
    mode: str                      # "png" | "cam"
    thresholds: Optional[np.ndarray] = None
    allow_missing: bool = False
    classes: ClassSet = VOC        # label PNG range, CAM keys, confusion shape


def _find_prediction(job: EvalJob, image_id: str) -> Optional[Path]:
    exts = (".png",) if job.mode == "png" else (".npy", ".npz")
    for ext in exts:
        p = safe_join(job.pred_dir, f"{image_id}{ext}")
        if p.is_file():
            return p
    return None


def _evaluate_id(job: EvalJob, image_id: str) -> tuple[str, Optional[np.ndarray]]:
    """(status, confusion) for one id; status 'ok' | 'missing_gt' | 'missing_pred'."""
    gt_path = safe_join(job.gt_dir, f"{image_id}.png")
    if not gt_path.is_file():
        if job.allow_missing:
            return "missing_gt", None
        raise DataError(f"id {image_id!r}: no ground truth {gt_path}")
    gt = read_label_png(gt_path, job.classes)
    pred_path = _find_prediction(job, image_id)
    status = "ok"
    if pred_path is None:
        if not job.allow_missing:
            raise DataError(f"id {image_id!r}: no prediction "
                            f"{Path(job.pred_dir) / image_id}{'.png' if job.mode == 'png' else '.npy/.npz'}")
        status = "missing_pred"
    if job.mode == "png":
        pred = np.zeros_like(gt) if pred_path is None else read_label_png(pred_path, job.classes)
        _check_size(image_id, pred.shape, gt.shape, pred_path)
        return status, confusion_matrix(gt, pred, classes=job.classes)
    if pred_path is None:
        keys, cams = np.zeros(0, np.int64), np.zeros((0,) + gt.shape, np.float32)
    else:
        keys, cams = read_cam_file(pred_path, classes=job.classes)
        if len(keys) == 0 and cams.shape[1:] == (0, 0):
            cams = np.zeros((0,) + gt.shape, np.float32)   # empty .npy dict: size unknown, all bg
        _check_size(image_id, cams.shape[1:], gt.shape, pred_path)
    return status, sweep_confusions(gt, keys, cams, job.thresholds, classes=job.classes)


def _check_size(image_id, pred_shape, gt_shape, path) -> None:
    if tuple(pred_shape) != tuple(gt_shape):
        raise DataError(f"id {image_id!r}: prediction {path} has size {tuple(pred_shape)} (H, W) "
                        f"but the ground truth has {tuple(gt_shape)}")


def _evaluate_chunk(job: EvalJob, ids: Sequence[str]):
    total, counts = None, {"ok": 0, "missing_gt": 0, "missing_pred": 0}
    for image_id in ids:
        status, conf = _evaluate_id(job, image_id)
        counts[status] += 1
        if conf is not None:
            total = conf if total is None else total + conf
    return total, counts


def _accumulate(job: EvalJob, ids: Sequence[str], workers: int, progress: bool):
    shape = confusion_shape(job.classes)
    if job.mode != "png":
        shape = (len(job.thresholds),) + shape
    total = np.zeros(shape, dtype=np.int64)
    counts = {"ok": 0, "missing_gt": 0, "missing_pred": 0}
    chunk = 16
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    bar = _progress(len(ids), progress)

    def add(result, n):
        nonlocal total
        conf, c = result
        if conf is not None:
            total += conf
        for k in counts:
            counts[k] += c[k]
        bar.update(n)

    if workers <= 1 or len(chunks) <= 1:
        for ch in chunks:
            add(_evaluate_chunk(job, ch), len(ch))
    else:
        # forkserver: children start clean even when the caller holds CUDA or threads
        ctx = multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [(pool.submit(_evaluate_chunk, job, ch), len(ch)) for ch in chunks]
            for fut, n in futures:
                add(fut.result(), n)
    bar.close()
    return total, counts


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc="evaluate", unit="img", file=sys.stderr)


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def _all_reduce(total: np.ndarray, counts: dict) -> tuple[np.ndarray, dict]:
    """Sum ``total`` (any shape: (K+1, K+2), (T, K+1, K+2), ...) and ``counts`` over the ranks; the
    shape is the caller's array's, so every rank must pass the same one (the same class set)."""
    rank, world = _dist_rank_world()
    if world == 1:
        return total, counts
    import torch
    import torch.distributed as dist
    keys = sorted(counts)
    flat = np.concatenate([total.ravel(), np.array([counts[k] for k in keys], dtype=np.int64)])
    t = torch.from_numpy(flat)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    flat = t.cpu().numpy()
    n = total.size
    return flat[:n].reshape(total.shape), {k: int(v) for k, v in zip(keys, flat[n:])}


# ------------------------------------------------------------------------------------- public API

def default_id_list(gt_dir) -> list[str]:
    """The VOC train list beside the ground truth, else every PNG of the ground-truth folder."""
    train = Path(gt_dir).parent / "ImageSets" / "Segmentation" / "train.txt"
    if train.is_file():
        return read_id_list(train)
    ids = sorted(p.stem for p in Path(gt_dir).glob("*.png"))
    if not ids:
        raise DataError(f"{gt_dir}: no ground-truth PNGs and no {train}; pass --list")
    return ids


def _result_dict(conf: np.ndarray, counts: dict, average: str = "present", classes: ClassSet = VOC) -> dict:
    if conf.shape != confusion_shape(classes):
        raise DataError(f"confusion of shape {conf.shape}: expected {confusion_shape(classes)} "
                        f"for class set {classes.name!r}")
    iou, present = iou_from_confusion(conf)
    fg_precision, fg_recall = foreground_precision_recall(conf)
    return {
        "miou": float(miou_from_confusion(conf, average) * 100),
        "average": average,
        "fg_precision": fg_precision,
        "fg_recall": fg_recall,
        "iou": {name: (float(iou[i] * 100) if present[i] else None) for i, name in enumerate(classes.label_names)},
        "n_images": counts["ok"] + counts["missing_pred"],
        "n_missing_pred": counts["missing_pred"],
        "n_missing_gt": counts["missing_gt"],
        "confusion": conf.tolist(),
    }


def evaluate(gt_dir, *, pred_dir=None, cam_dir=None, ids: Optional[Sequence[str]] = None,
             thresholds="0.00:0.60:0.01", allow_missing: bool = False, workers: int = 0,
             progress: bool = False, average: str = "present", classes: ClassSet = VOC) -> dict:
    """Evaluate label PNGs (``pred_dir``) or sweep CAM files (``cam_dir``) against ``gt_dir``.

    ``classes``: the class set (hsc_fast.classes; default VOC): label PNGs may hold 0..K and 255
    (DataError naming the file and the value otherwise), CAM keys 0..K-1, and "iou" has its K+1
    label names (0 = background) in index order.

    Returns {"miou", "fg_precision", "fg_recall", "iou", "n_images", "n_missing_pred", "n_missing_gt",
    "confusion"} (percent; fg_*: foreground_precision_recall); for a sweep the top-level metrics
    are those at the best threshold, plus "curve" (list of {"threshold", "miou"}) and "best"
    ({"threshold", "miou", "fg_precision", "fg_recall", "n_missing_pred"}). Ties pick the
    lowest threshold. ``average``: the mIoU rule (see the module doc). NothingEvaluatedError (a
    DataError) before any work when no id has both a ground truth and a prediction, and after it
    if none turned out to be evaluable.
    """
    if (pred_dir is None) == (cam_dir is None):
        raise ConfigError("evaluate: give exactly one of pred_dir (label PNGs) or cam_dir (CAM files)")
    if average not in AVERAGES:
        raise ConfigError(f"average {average!r}: expected one of {', '.join(AVERAGES)}")
    for name, d in (("gt", gt_dir), ("pred", pred_dir), ("cam", cam_dir)):
        if d is not None and not Path(d).is_dir():
            raise DataError(f"--{name} {d}: not a directory")
    ids = list(default_id_list(gt_dir) if ids is None else ids)
    rank, world = _dist_rank_world()
    my_ids = ids[rank::world]
    if pred_dir is not None:
        job = EvalJob(str(gt_dir), str(pred_dir), "png", allow_missing=allow_missing, classes=classes)
    else:
        ths = parse_thresholds(thresholds) if isinstance(thresholds, str) else np.asarray(thresholds, np.float32)
        if np.any(np.diff(ths) <= 0):
            raise ConfigError(f"thresholds {ths.tolist()}: expected strictly ascending values")
        job = EvalJob(str(gt_dir), str(cam_dir), "cam", thresholds=ths, allow_missing=allow_missing, classes=classes)
    if allow_missing:
        _check_something_to_evaluate(job, ids)   # without it a missing file raises DataError anyway
    total, counts = _accumulate(job, my_ids, workers, progress and rank == 0)
    total, counts = _all_reduce(total, counts)
    if counts["ok"] + counts["missing_pred"] == 0:
        raise DataError(f"evaluate: none of the {len(ids)} ids has a ground truth in {gt_dir}")
    if counts["ok"] == 0:   # the files changed under us since the pre-check
        raise NothingEvaluatedError(f"evaluate: none of the {len(ids)} ids has both a ground truth in {gt_dir} "
                                    f"and a prediction in {job.pred_dir} ({counts['missing_pred']} predictions "
                                    f"missing, {counts['missing_gt']} ground truths missing)", before_work=False)
    if job.mode == "png":
        return _result_dict(total, counts, average, classes)
    mious = miou_from_confusion(total, average) * 100
    best = int(np.nanargmax(mious)) if np.any(np.isfinite(mious)) else 0
    result = _result_dict(total[best], counts, average, classes)
    result["curve"] = [{"threshold": round(float(t), 6), "miou": float(m)} for t, m in zip(job.thresholds, mious)]
    result["best"] = {"threshold": round(float(job.thresholds[best]), 6), "miou": float(mious[best]),
                      "fg_precision": result["fg_precision"], "fg_recall": result["fg_recall"],
                      "n_missing_pred": counts["missing_pred"]}
    return result


def _check_something_to_evaluate(job: EvalJob, ids: Sequence[str]) -> None:
    """Before any work: at least one id has both a ground truth and a prediction (stops at the
    first; scans every id, on every rank alike, only when none has). NothingEvaluatedError names
    the counts otherwise: an mIoU of all-background stand-ins would be a number about nothing."""
    n_gt = n_pred = 0
    for image_id in ids:
        has_gt = safe_join(job.gt_dir, f"{image_id}.png").is_file()
        has_pred = _find_prediction(job, image_id) is not None
        if has_gt and has_pred:
            return
        n_gt += has_gt
        n_pred += has_pred
    raise NothingEvaluatedError(
        f"evaluate: nothing to evaluate: none of the {len(ids)} ids has both a ground truth and a prediction "
        f"({len(ids) - n_pred} predictions missing in {job.pred_dir}, {len(ids) - n_gt} ground truths missing "
        f"in {job.gt_dir}); --allow-missing only fills in some missing ids", before_work=True)


def format_table(result: dict) -> str:
    """Per-class IoU table (percent) for stdout: one row per label name of the result (K+1)."""
    width = max([14] + [len(name) for name in result["iou"]])
    lines = [f"{'class':>{width}s}  IoU (%)"]
    for name, v in result["iou"].items():
        lines.append(f"{name:>{width}s}  {'   -' if v is None else f'{v:7.2f}'}")
    missing = _missing_note(result)
    average = ("" if result.get("average", "present") == "present"
               else f", average over all {len(result['iou'])} classes")
    lines.append(f"{'mIoU':>{width}s}  {result['miou']:7.2f}   ({result['n_images']} images{missing}{average})")
    if "best" in result:
        lines.append(f"best background threshold {result['best']['threshold']:.2f} -> mIoU {result['best']['miou']:.2f}"
                     f" ({missing[2:]})")
    return "\n".join(lines)


def _missing_note(result: dict) -> str:
    """', N missing predictions counted as background' (always), plus the skipped ids without ground truth."""
    parts = [f"{result.get('n_missing_pred', 0)} missing predictions counted as background"]
    if result.get("n_missing_gt"):
        parts.append(f"{result['n_missing_gt']} ids without ground truth skipped")
    return "".join(", " + p for p in parts)


def write_outputs(result: dict, json_path) -> None:
    """JSON (without the raw confusion, which stays in the returned dict) and, for a sweep, the curve PNG."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if k != "confusion"}
    json_path.write_text(json.dumps(public, indent=2) + "\n")
    if "curve" in result:
        from hsc_fast.eval.visualize import draw_threshold_curve
        draw_threshold_curve(json_path.with_suffix(".png"), result["curve"], result["best"])


# ------------------------------------------------------------------------------------------ CLI
