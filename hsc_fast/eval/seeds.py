"""CAM inference, seeds and CRF pseudo-labels (the stage after CAM training).

What is computed (the authors' inference.py, see notes/hsc-reference.md "Inference"):
  * per scale s (default 0.5/1.0/1.5/2.0) the image is resized with PIL bicubic to
    (round(W*s), round(H*s)), normalised (ImageNet mean/std, in float64 then cast to float32 as the
    authors: ``hsc_fast.data.seg_set.normalize_image``), and run with its horizontal flip;
  * image and flip run as ONE batch of two (the authors run eight single-image passes); batch
    members are computed independently, so this equals the per-pass results to fp32 round-off
    (convolution algorithms may sum in another order for a batch of 2: ~1e-6 on the CAMs);
  * only the CAM path runs: ``model.forward_cam(x)`` = backbone + the 1x1 CAM head, the raw CAM
    (not the PCM-refined one), as the authors' ``forward_cam``; PCM (whose HW x HW affinity at
    scale 2 of a VOC image does not fit a GPU) and the projectors are skipped. Softmax over its K+1
    channels (background last; 21 for VOC, 81 for COCO), bilinear upsampling (align_corners=False)
    to the image size, the flipped one flipped back, the K fg channels times the image labels, all
    summed;
  * each class divided by its max (+1e-5); the classes of the image (label > 1e-5) are stored.

Files (``OUT`` = ``--out``):
  * ``cam_npy/{id}.npy``: the SEAM/HSC format, ``np.save`` of a dict {fg class 0..K-1: (H, W)
    float32 (float16 with --fp16)}. It is a pickle: other WSSS tools read it with
    ``np.load(allow_pickle=True)``; our evaluate reads it with a restricted unpickler that only
    rebuilds numpy arrays. ``--format npz`` writes ``cam_npy/{id}.npz`` instead (arrays ``keys``
    (K,) and ``cams`` (K, H, W), no pickle at all) -- safe to exchange, but only our tools read it.
  * ``seeds/{id}.png``: argmax over [bg threshold, CAMs] as palette PNGs (labels 0..K, the VOC
    colour map, which covers all 256 indices); ``sweep.json`` and
    ``sweep.png``: the threshold sweep against the ground truth (when there is one).
  * ``pseudo_labels/{id}.png``: dense-CRF pseudo-labels: probabilities [(1 - max fg)^alpha, CAMs],
    CRF (``hsc_fast.crf``) over the image's present classes and the background only, argmax;
    pixels whose two best CRF probabilities are closer than
    ``--uncertain-margin`` become 255 (ignored by DeepLab training); ``crf_eval.json``.
  * ``overlays/{id}.jpg``: image | CAM heat map | seeds | CRF label, for the first few ids of rank 0.

Class set: ``SeedJob.classes`` (a hsc_fast.classes.ClassSet, default VOC; the run's) bounds the
CAM keys read back, the label PNG values, and the confusion matrices of the sweeps.

Distributed: rank r of W handles ids[r::W] (each id exactly once); outputs are written to a
temporary name and renamed, so an existing file is complete and a rerun skips it (resume).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hsc_fast.io import atomic_write, write_json
from hsc_fast.classes import IGNORE_INDEX, VOC, ClassSet
from hsc_fast.config import RunConfig, SeedConfig
from hsc_fast.crf import CrfParams
from hsc_fast.distributed import barrier, get_rank, world_size
from hsc_fast.errors import ConfigError, DataError, WeightsError
from hsc_fast.eval.evaluate import evaluate, format_table, read_cam_file, seeds_from_cams, write_outputs
from hsc_fast.data.seg_set import normalize_image
from hsc_fast.data.voc import encode_label_png, safe_join

LABEL_PRESENT = 1e-5   # a class is "in the image" when its label exceeds this (as the authors test it)
N_OVERLAYS = 8


@dataclass
class Sample:
    """One image to infer: id, uint8 (H, W, 3) RGB, float32 (K,) multi-hot labels."""
    key: str
    image: np.ndarray
    label: np.ndarray


# ------------------------------------------------------------------------------------ id split

def split_ids(ids: Sequence[str], rank: int, world: int) -> list[str]:
    """The ids of one rank: every world-th id from position rank (each id exactly once overall)."""
    return list(ids)[rank::world]


def dist_rank_world() -> tuple[int, int]:
    return get_rank(), world_size()


# -------------------------------------------------------------------------------- image sources

def _as_sample(rec) -> Sample:
    """An eval-stream record ``(key, image, label (K,)[, mask])`` -> Sample."""
    if isinstance(rec, Sample):
        return rec
    key, img, label = rec[:3]
    # decoded JPEGs are read-only views; pydensecrf (and torch) want writable buffers
    img = np.require(np.asarray(img, np.uint8), requirements=["C", "W"])
    return Sample(str(key), img, np.asarray(label, np.float32))


def open_samples(data, ids: Sequence[str], *, cls_labels: Optional[str] = None,
                 sbd_root: Optional[str] = None, workers: int = 0) -> Iterator[Sample]:
    """Samples of exactly ``ids`` (in order for folders) from a VOC root folder or shards.

    Goes through ``hsc_fast.data.build_eval_dataset`` (labels: the cls_labels file, else the VOC XML,
    else the mask classes); ``workers`` loader processes decode ahead of the model.
    """
    if not ids:
        return iter(())
    from hsc_fast.data import build_eval_dataset
    stream = build_eval_dataset(str(data), ids=list(ids), cls_labels=cls_labels or None,
                                sbd_root=sbd_root or None)
    return (_as_sample(rec) for rec in stream.loader(num_workers=workers))


# -------------------------------------------------------------------------------- CAM inference

def scaled_inputs(image: np.ndarray, scales: Sequence[float], mean, std) -> list[torch.Tensor]:
    """Normalised (3, h, w) tensors of the image resized (PIL bicubic) to each scale."""
    pil = Image.fromarray(image)
    w, h = pil.size
    out = []
    for s in scales:
        size = (max(1, round(w * s)), max(1, round(h * s)))
        resized = pil if size == (w, h) else pil.resize(size, resample=Image.BICUBIC)
        out.append(normalize_image(np.array(resized), mean, std))  # a writable copy for torch
    return out


def cam_logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The raw CAM of ``batch`` through the CAM path only (``model.forward_cam``): at inference
    the authors run no PCM and no projectors, and ours would cost time and memory for nothing."""
    forward_cam = getattr(model, "forward_cam", None)
    if forward_cam is None:
        raise ConfigError(f"CAM inference needs a model with forward_cam (backbone + CAM head only); "
                          f"{type(model).__name__} has none")
    return forward_cam(batch)


@torch.inference_mode()
def multiscale_cam(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, *,
                   scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0), flip: bool = True,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   device="cpu", amp: Optional[bool] = None) -> torch.Tensor:
    """float32 (K, H, W) CAMs on ``device``: summed softmax CAMs times labels, each class / (max + 1e-5).

    K is the length of ``label``; ``model.forward_cam`` (the CAM path only: backbone + CAM head)
    must give K+1 channels, background last (ConfigError otherwise). ``amp`` (default: on for CUDA) runs the model under bf16 autocast; the
    softmax and the sums are fp32.
    """
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    h, w = image.shape[:2]
    label = np.asarray(label, np.float32).reshape(-1)
    k = label.size
    lab = torch.as_tensor(label, device=device).view(k, 1, 1)
    total = torch.zeros((k, h, w), dtype=torch.float32, device=device)
    for x in scaled_inputs(image, scales, mean, std):
        x = x.to(device)[None]
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            cam = cam_logits(model, batch)
        if cam.shape[1] != k + 1:
            raise ConfigError(f"the CAM model has {cam.shape[1]} output channels but the image labels have {k} "
                              f"classes: expected {k + 1} (K fg + background last); the model and the class set "
                              "do not belong together")
        prob = F.interpolate(cam.float().softmax(dim=1), size=(h, w), mode="bilinear", align_corners=False)
        fg = prob[:, :k]
        total += fg[0]
        if flip:
            total += fg[1].flip(-1)
    total *= lab
    return total / (total.amax(dim=(1, 2), keepdim=True) + 1e-5)


def present_classes(label: np.ndarray) -> np.ndarray:
    """Fg class indices 0..K-1 of an image (label (K,) > 1e-5), ascending."""
    return np.flatnonzero(np.asarray(label) > LABEL_PRESENT).astype(np.int64)


def cam_path(cam_dir, key: str, fmt: str = "npy") -> Path:
    return safe_join(cam_dir, f"{key}.{fmt}")


def find_cam_file(cam_dir, key: str) -> Optional[Path]:
    for fmt in ("npy", "npz"):
        p = cam_path(cam_dir, key, fmt)
        if p.is_file():
            return p
    return None


def save_cam_file(path, keys: np.ndarray, cams: np.ndarray, *, fp16: bool = False) -> None:
    """Write CAMs (K, H, W) of fg classes ``keys`` as the SEAM dict .npy, or .npz by suffix."""
    path = Path(path)
    cams = np.asarray(cams, dtype=np.float16 if fp16 else np.float32)
    if path.suffix == ".npz":
        atomic_write(path, lambda f: np.savez(f, keys=np.asarray(keys, np.int64), cams=cams))
    else:
        cam_dict = {int(k): cams[i] for i, k in enumerate(keys)}
        atomic_write(path, lambda f: np.save(f, cam_dict, allow_pickle=True))


def infer_cam_files(model: torch.nn.Module, samples: Iterable[Sample], cam_dir, cfg: SeedConfig, *,
                    fmt: str = "npy", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    device="cpu", amp: Optional[bool] = None, total: Optional[int] = None,
                    progress: bool = False, classes: Optional[ClassSet] = None) -> int:
    """Run ``multiscale_cam`` on each sample and write ``cam_dir/{id}.{fmt}``; returns the count.
    ``classes`` given: every sample's labels must have its K entries (DataError naming the id)."""
    Path(cam_dir).mkdir(parents=True, exist_ok=True)
    model.eval()
    bar = _bar(total, "cam", progress)
    n = 0
    for s in samples:
        if classes is not None and np.asarray(s.label).size != classes.num_fg:
            raise DataError(f"id {s.key!r}: image labels of length {np.asarray(s.label).size}; the class set "
                            f"{classes.name!r} has {classes.num_fg} classes")
        keys = present_classes(s.label)
        cams = multiscale_cam(model, s.image, s.label, scales=cfg.scales, flip=cfg.flip, mean=mean, std=std,
                              device=device, amp=amp)
        save_cam_file(cam_path(cam_dir, s.key, fmt), keys, cams[torch.as_tensor(keys, device=cams.device)].cpu().numpy(),
                      fp16=cfg.fp16)
        n += 1
        bar.update(1)
    bar.close()
    return n


def pending_ids(ids: Sequence[str], out_dirs_and_exts: Sequence[tuple]) -> list[str]:
    """The ids that miss at least one output (``(folder, (ext, ...))`` pairs; any of the exts counts)."""
    def done(key):
        return all(any((Path(d) / f"{key}.{e}").is_file() for e in exts) for d, exts in out_dirs_and_exts)
    return [k for k in ids if not done(k)]


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total, desc, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)


# ------------------------------------------------------------------------- seeds and CRF labels

@dataclass
class PseudoLabelParams:
    """CRF post-processing of CAMs: bg = (1 - max fg)^alpha, dense CRF (`crf`; default the
    INFERENCE preset), argmax (+ top-2 closer than uncertain_margin -> 255)."""
    alpha: float = 7.0
    crf: CrfParams = field(default_factory=CrfParams)
    backend: str = "pydensecrf"
    uncertain_margin: float = 0.0

    @classmethod
    def from_config(cls, cfg: SeedConfig, uncertain_margin: float = 0.0,
                    threshold: Optional[float] = None) -> "PseudoLabelParams":
        """`seeds.crf` as parameters; alpha "auto" needs the seed threshold (`threshold`)."""
        alpha = cfg.crf.alpha
        if alpha == "auto":
            if threshold is None:
                raise ConfigError("seeds.crf.alpha is 'auto' but no background threshold is known: run the sweep "
                                  "(--gt), set seeds.bg_threshold, or give a number for seeds.crf.alpha")
            alpha = alpha_for_threshold(threshold)
        return cls(float(alpha), CrfParams(**cfg.crf.params()), cfg.crf.backend, uncertain_margin)


AUTO_T_RANGE = (0.02, 0.98)   # thresholds outside give alphas beyond any useful CRF background


def alpha_for_threshold(t: float) -> float:
    """alpha with (1 - t)^alpha = t, i.e. alpha = ln t / ln(1 - t): the CRF's background score
    (1 - max fg)^alpha then equals the CAM exactly at the seed threshold t, so the CRF starts
    from the same foreground/background split as the best seeds (t = 0.22 gives ~6.1, near the
    authors' 7 for VOC; t = 0.5 gives 1). t is clipped to AUTO_T_RANGE."""
    t = float(np.clip(t, *AUTO_T_RANGE))
    return float(np.log(t) / np.log1p(-t))


def crf_input(keys: np.ndarray, cams: np.ndarray, alpha: float) -> np.ndarray:
    """(n+1, H, W) CRF probabilities of the n present classes' CAMs (n, H, W), background first
    (``hsc_fast.crf.cam_to_crf_probs``): the CRF sees only these channels, whatever K is."""
    from hsc_fast.crf import cam_to_crf_probs
    return cam_to_crf_probs(np.clip(np.asarray(cams, np.float32), 0.0, 1.0), alpha)


def label_from_crf(keys: np.ndarray, probs: np.ndarray, uncertain_margin: float = 0.0) -> np.ndarray:
    """CRF marginals (n+1, H, W) over [bg, the n classes ``keys``] -> uint8 labels (channel 0 -> 0,
    channel j -> keys[j-1] + 1, so fg class 79 is label 80); top-2 closer than the margin -> 255."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    if probs.shape[0] != keys.size + 1:
        raise DataError(f"label_from_crf: {probs.shape[0]} CRF channels for {keys.size} classes; "
                        f"expected {keys.size + 1} (background first)")
    if keys.size and (keys.min() < 0 or keys.max() >= IGNORE_INDEX - 1):
        raise DataError(f"label_from_crf: class keys {keys.tolist()} do not fit uint8 labels below {IGNORE_INDEX}")
    label_of_channel = np.concatenate([[0], keys + 1]).astype(np.uint8)
    label = label_of_channel[probs.argmax(axis=0)]
    if uncertain_margin > 0 and len(probs) > 1:
        top2 = np.partition(probs, len(probs) - 2, axis=0)[-2:]
        label = np.where(top2[1] - top2[0] < uncertain_margin, np.uint8(IGNORE_INDEX), label)
    return label


def crf_label(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, p: PseudoLabelParams) -> np.ndarray:
    """uint8 (H, W) labels of one image from the dense CRF over [bg, the present classes' CAMs]."""
    from hsc_fast.crf import crf_inference
    probs = crf_inference(image, crf_input(keys, cams, p.alpha), backend=p.backend, **p.crf.kwargs())
    return label_from_crf(keys, np.asarray(probs), p.uncertain_margin)


def _write_png(path: Path, label: np.ndarray, classes: ClassSet = VOC) -> None:
    data = encode_label_png(label, classes)
    atomic_write(path, lambda f: f.write(data))


def write_labels(samples: Iterable[Sample], cam_dir, out_dir, *, threshold: Optional[float] = None,
                 crf: Optional[PseudoLabelParams] = None, overlays: int = 0, workers: int = 1,
                 total: Optional[int] = None, progress: bool = False, classes: ClassSet = VOC) -> int:
    """For each sample: seeds (``threshold`` given) and/or CRF pseudo-labels, and inspection overlays.

    ``classes``: the CAM keys read must be its 0..K-1, the PNGs written hold 0..K (and 255).

    Writes ``out_dir/seeds/{id}.png``, ``out_dir/pseudo_labels/{id}.png``, ``out_dir/overlays/{id}.jpg``
    (the first ``overlays`` samples). The CRF runs through ``hsc_fast.crf.crf_imap``: ``workers``
    processes for pydensecrf, image batches for the gpu backend; results come back in order.
    """
    out_dir = Path(out_dir)
    seeds_dir, crf_dir, ov_dir = out_dir / "seeds", out_dir / "pseudo_labels", out_dir / "overlays"
    for d in (seeds_dir, crf_dir):
        d.mkdir(parents=True, exist_ok=True)
    bar = _bar(total, "labels", progress)
    pending = []   # (sample or None, keys, cams, seed) in CRF input order

    def with_seeds():
        for n, s in enumerate(samples):
            keys, cams = _read_cams_for(cam_dir, s, classes=classes)
            seed = None
            if threshold is not None:
                seed = seeds_from_cams(keys, cams, threshold, s.image.shape[:2])
                _write_png(seeds_dir / f"{s.key}.png", seed, classes)
            yield s, keys, cams, seed, n < overlays

    count = 0
    if crf is None:
        for s, keys, cams, seed, overlay in with_seeds():
            if overlay:
                _save_overlay(ov_dir, s, cams, [seed])
            count += 1
            bar.update(1)
        bar.close()
        return count

    from hsc_fast.crf import crf_imap

    def crf_pairs():
        for s, keys, cams, seed, overlay in with_seeds():
            pending.append((s, keys, cams, seed, overlay))
            yield s.image, crf_input(keys, cams, crf.alpha)

    try:
        for probs in crf_imap(crf_pairs(), workers=max(1, workers), backend=crf.backend, **crf.crf.kwargs()):
            s, keys, cams, seed, overlay = pending.pop(0)
            label = label_from_crf(keys, probs, crf.uncertain_margin)
            _write_png(crf_dir / f"{s.key}.png", label, classes)
            if overlay:
                _save_overlay(ov_dir, s, cams, [seed, label])
            count += 1
            bar.update(1)
    finally:
        bar.close()
    return count


def _read_cams_for(cam_dir, s: Sample, *, classes: ClassSet = VOC) -> tuple[np.ndarray, np.ndarray]:
    """(keys, cams) of one sample's CAM file (keys 0..K-1 of ``classes``), checked against its image size."""
    path = find_cam_file(cam_dir, s.key)
    if path is None:
        raise DataError(f"id {s.key!r}: no CAM file {cam_path(cam_dir, s.key)} (.npy/.npz); run --stage cam first")
    keys, cams = read_cam_file(path, classes=classes)
    if len(keys) == 0:
        return keys, np.zeros((0,) + s.image.shape[:2], np.float32)
    if cams.shape[1:] != s.image.shape[:2]:
        raise DataError(f"id {s.key!r}: CAM {path} is {cams.shape[1:]} but the image is {s.image.shape[:2]}")
    return keys, cams


def _save_overlay(ov_dir: Path, s: Sample, cams: np.ndarray, labels) -> None:
    from hsc_fast.eval.visualize import inspection_panel, save_rgb
    save_rgb(ov_dir / f"{s.key}.jpg", inspection_panel(s.image, cams, [lab for lab in labels if lab is not None]))


# ------------------------------------------------------------------------------------- model

def load_cam_model(model_cfg, checkpoint, device="cpu") -> torch.nn.Module:
    """``build_cam_model(model_cfg)`` with a plain state_dict checkpoint (weights_only load)."""
    from hsc_fast.models import build_cam_model
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "final" / "model.pt"
    if not path.is_file():
        raise WeightsError(f"--checkpoint {checkpoint}: no such file (expected RUN_DIR/final/model.pt or a .pt file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
        raise WeightsError(f"{path}: not a readable weights-only state_dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a plain state_dict (name -> tensor)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = build_cam_model(model_cfg, load_weights=False)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(f"{path}: does not fit the model ({model_cfg.backbone}): missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(state)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- pipeline

@dataclass
class SeedJob:
    """Everything one `make_seeds` run needs (built from the command line)."""
    cfg: RunConfig
    data: str
    out: str
    ids: list
    stage: str = "all"                 # cam | sweep | crf | all
    checkpoint: Optional[str] = None
    gt: Optional[str] = None
    cls_labels: Optional[str] = None
    sbd_root: Optional[str] = None     # folder data: SBD img/ for ids without a VOC JPEG
    fmt: str = "npy"
    workers: int = 0
    uncertain_margin: float = 0.0
    overlays: int = N_OVERLAYS
    progress: bool = True
    classes: Optional[ClassSet] = None  # the run's class set; None: the config's (data.classes; VOC for auto)

    def __post_init__(self):
        if self.classes is None:
            from hsc_fast.config import run_class_set
            self.classes = run_class_set(self.cfg)


def run_cam_stage(job: SeedJob, model: torch.nn.Module, device) -> int:
    rank, world = dist_rank_world()
    cam_dir = Path(job.out) / "cam_npy"
    mine = split_ids(job.ids, rank, world)
    todo = pending_ids(mine, [(cam_dir, ("npy", "npz"))])
    samples = open_samples(job.data, todo, cls_labels=job.cls_labels, sbd_root=job.sbd_root, workers=job.workers)
    n = infer_cam_files(model, samples, cam_dir, job.cfg.seeds, fmt=job.fmt, mean=job.cfg.data.mean,
                        std=job.cfg.data.std, device=device, total=len(todo), progress=job.progress and rank == 0,
                        classes=job.classes)
    barrier()
    return n


SWEEP_EDGE_STEPS = 2      # a best threshold this close to an end of the range extends it
SWEEP_EXTEND_STEPS = 10   # thresholds added per extension


def _range_text(a: float, b: float, step: float) -> str:
    return f"{a:.6g}:{b:.6g}:{step:.6g}"


def _next_extension(curve: list, a: float, b: float, step: float) -> Optional[tuple[float, float]]:
    """The (lo, hi) range to sweep next when the best of `curve` (sorted) lies within
    SWEEP_EDGE_STEPS of an end that can still move (thresholds live in [0, 1]), else None."""
    best = max(range(len(curve)), key=lambda i: (curve[i]["miou"], -i))   # ties: the lowest threshold
    if best >= len(curve) - SWEEP_EDGE_STEPS and b < 1.0 - step / 2:
        return b, round(min(1.0, b + SWEEP_EXTEND_STEPS * step), 6)
    if best < SWEEP_EDGE_STEPS and a > step / 2:
        return round(max(0.0, a - SWEEP_EXTEND_STEPS * step), 6), a
    return None


def sweep_to_peak(sweep, thresholds: str, log=print) -> dict:
    """Sweep `thresholds` (A:B:STEP) with `sweep(text) -> evaluate() result`, extending the range
    by SWEEP_EXTEND_STEPS steps while the best threshold is within SWEEP_EDGE_STEPS of an end,
    until the curve turns or the range reaches 0 / 1. Returns the result of the part holding the
    best threshold, with the whole "curve", its "best", and "sweep": requested and final ranges
    and the extensions made (each logged)."""
    from hsc_fast.eval.evaluate import parse_thresholds
    parse_thresholds(thresholds)  # the error names --thresholds
    a, b, step = (float(x) for x in thresholds.split(":"))
    parts = [sweep(thresholds)]
    curve = list(parts[0]["curve"])
    extensions = []
    while (ext := _next_extension(curve, a, b, step)) is not None:
        lo, hi = ext
        text = _range_text(lo, hi, step)
        log(f"[sweep] best threshold {max(curve, key=lambda c: c['miou'])['threshold']:.3f} is at an end of "
            f"{_range_text(a, b, step)}: extending with {text}")
        part = sweep(text)
        parts.append(part)
        extensions.append(text)
        curve = sorted(curve + [c for c in part["curve"] if c["threshold"] not in {d["threshold"] for d in curve}],
                       key=lambda c: c["threshold"])
        a, b = min(a, lo), max(b, hi)
    best = max(curve, key=lambda c: (c["miou"], -c["threshold"]))
    holder = next(p for p in parts if p["best"]["threshold"] == best["threshold"] and p["best"]["miou"] == best["miou"])
    return dict(holder, curve=curve, best=dict(holder["best"]),  # its fg precision / recall too
                sweep={"requested": thresholds, "range": _range_text(a, b, step), "extensions": extensions})


def run_sweep_stage(job: SeedJob) -> Optional[dict]:
    """Threshold sweep against the ground truth -> OUT/sweep.json (+ .png), extended until the
    curve turns (`sweep_to_peak`); None without ground truth."""
    if not job.gt:
        return None
    is_main = dist_rank_world()[0] == 0

    def sweep(text: str) -> dict:
        return evaluate(job.gt, cam_dir=Path(job.out) / "cam_npy", ids=job.ids, thresholds=text,
                        workers=job.workers, progress=job.progress and is_main, classes=job.classes)

    result = sweep_to_peak(sweep, job.cfg.seeds.thresholds, log=print if is_main else (lambda *_: None))
    if dist_rank_world()[0] == 0:
        print(format_table(result))
        write_outputs(result, Path(job.out) / "sweep.json")
    barrier()
    return result


def seed_threshold(job: SeedJob) -> float:
    """The configured threshold, else the best one of OUT/sweep.json."""
    if job.cfg.seeds.bg_threshold >= 0:
        return job.cfg.seeds.bg_threshold
    sweep = Path(job.out) / "sweep.json"
    if sweep.is_file():
        return float(json.loads(sweep.read_text())["best"]["threshold"])
    raise ConfigError("seeds.bg_threshold is -1 (best of the sweep) but there is no sweep result "
                      f"({sweep}): give --gt for the sweep or set --bg-threshold")


def crf_params(job: SeedJob) -> PseudoLabelParams:
    """The CRF of `seeds.crf`. alpha "auto": the best of OUT/crf_alpha.json (the alpha sweep
    against the ground truth) when there is one, else from the seed threshold (configured or
    swept; alpha_for_threshold)."""
    if job.cfg.seeds.crf.alpha != "auto":
        return PseudoLabelParams.from_config(job.cfg.seeds, job.uncertain_margin)
    swept = Path(job.out) / "crf_alpha.json"
    if swept.is_file():
        p = PseudoLabelParams.from_config(job.cfg.seeds, job.uncertain_margin, threshold=0.5)
        return dataclasses.replace(p, alpha=float(json.loads(swept.read_text())["best_alpha"]))
    return PseudoLabelParams.from_config(job.cfg.seeds, job.uncertain_margin, threshold=seed_threshold(job))


def alpha_candidates(cfg: SeedConfig, threshold: float) -> list[float]:
    """The alphas an "auto" sweep tries: seeds.crf.alpha_grid plus the threshold's own alpha."""
    return sorted({float(a) for a in cfg.crf.alpha_grid} | {round(alpha_for_threshold(threshold), 4)})


def alpha_confusions(images: Sequence[tuple], grid: Sequence[float], base: PseudoLabelParams,
                     workers: int = 1, *, classes: ClassSet = VOC) -> np.ndarray:
    """int64 (len(grid), K+1, K+2): the confusion of the CRF pseudo-labels of `images` ((image,
    keys, cams, gt) each) at every alpha of `grid`, the rest of the CRF as in `base`."""
    from hsc_fast.crf import crf_imap
    from hsc_fast.eval.evaluate import confusion_matrix, confusion_shape
    conf = np.zeros((len(grid),) + confusion_shape(classes), np.int64)
    for i, alpha in enumerate(grid):
        pairs = ((img, crf_input(keys, cams, alpha)) for img, keys, cams, _ in images)
        marginals = crf_imap(pairs, workers=max(1, workers), backend=base.backend, **base.crf.kwargs())
        for (_, keys, _, gt), q in zip(images, marginals):
            conf[i] += confusion_matrix(gt, label_from_crf(keys, q, base.uncertain_margin), classes=classes)
    return conf


def sweep_alpha(job: SeedJob, gt_dir, ids: Sequence[str]) -> dict:
    """seeds.crf.alpha "auto" with ground truth: CRF pseudo-labels of the first
    seeds.crf.alpha_sweep_images ids (ranks split them) at every candidate alpha, one confusion
    per alpha (all-reduced), the best mIoU wins (ties: the smaller alpha). Rank 0 writes
    OUT/crf_alpha.json, which crf_params then reads. Measured on the fixture photos
    (tests/eval/test_crf_alpha.py): the threshold rule alone loses up to 17 mIoU against 7."""
    from hsc_fast.data.voc import read_label_png
    from hsc_fast.eval.evaluate import _all_reduce, miou_from_confusion
    seeds_cfg = job.cfg.seeds
    grid = alpha_candidates(seeds_cfg, seed_threshold(job))
    subset = list(ids)[: seeds_cfg.crf.alpha_sweep_images]
    rank, world = dist_rank_world()
    out, cam_dir = Path(job.out), Path(job.out) / "cam_npy"
    items = [(s, *_read_cams_for(cam_dir, s, classes=job.classes),
              read_label_png(Path(gt_dir) / f"{s.key}.png", job.classes))
             for s in open_samples(job.data, split_ids(subset, rank, world), cls_labels=job.cls_labels,
                                   sbd_root=job.sbd_root)]
    base = PseudoLabelParams.from_config(seeds_cfg, job.uncertain_margin, threshold=0.5)
    images = [(s.image, keys, cams, gt) for s, keys, cams, gt in items]
    conf = _all_reduce(alpha_confusions(images, grid, base, workers=job.workers, classes=job.classes),
                       {})[0]   # summed over ranks
    mious = miou_from_confusion(conf) * 100
    best = int(np.nanargmax(mious))
    result = {"grid": grid, "miou": [float(m) for m in mious], "best_alpha": grid[best],
              "best_miou": float(mious[best]), "n_images": len(subset), "threshold": seed_threshold(job)}
    if rank == 0:
        write_json(out / "crf_alpha.json", result)
        print(f"[crf] alpha sweep on {len(subset)} images: " +
              ", ".join(f"{a:g}: {m:.2f}" for a, m in zip(grid, result["miou"])) + f" -> alpha {grid[best]:g}")
    barrier()
    return result


def run_label_stage(job: SeedJob, *, seeds: bool, crf: bool) -> int:
    rank, world = dist_rank_world()
    out = Path(job.out)
    outputs = ([(out / "seeds", ("png",))] if seeds else []) + ([(out / "pseudo_labels", ("png",))] if crf else [])
    mine = split_ids(job.ids, rank, world)
    todo = pending_ids(mine, outputs)
    samples = open_samples(job.data, todo, cls_labels=job.cls_labels, sbd_root=job.sbd_root, workers=0 if crf else job.workers)
    params = crf_params(job) if crf else None
    if params is not None and rank == 0:  # what the pseudo-labels were made with (alpha "auto" resolved)
        write_json(out / "crf_params.json", {"alpha": params.alpha, "alpha_setting": job.cfg.seeds.crf.alpha,
                                             "backend": params.backend, **params.crf.kwargs()})
    n = write_labels(samples, out / "cam_npy", out, threshold=seed_threshold(job) if seeds else None,
                     crf=params,
                     overlays=job.overlays if rank == 0 else 0, workers=job.workers, total=len(todo),
                     progress=job.progress and rank == 0, classes=job.classes)
    barrier()
    if crf and job.gt:
        result = dict(evaluate(job.gt, pred_dir=out / "pseudo_labels", ids=job.ids, workers=job.workers,
                               classes=job.classes), crf_alpha=params.alpha)
        if rank == 0:
            print(format_table(result))
            write_outputs(result, out / "crf_eval.json")
    return n


def run(job: SeedJob, device=None) -> None:
    """Run the requested stage(s): cam -> sweep (+ seeds) -> crf."""
    if job.stage not in ("cam", "sweep", "crf", "all"):
        raise ConfigError(f"--stage {job.stage!r}: expected cam, sweep, crf or all")
    device = device or torch.device("cpu")
    if job.stage in ("cam", "all"):
        if not job.checkpoint:
            raise ConfigError("--checkpoint is required for the cam stage")
        model = load_cam_model(job.cfg.model, job.checkpoint, device)
        run_cam_stage(job, model, device)
        del model
    if job.stage in ("sweep", "all"):
        run_sweep_stage(job)
    if job.stage in ("crf", "all") and job.cfg.seeds.crf.alpha == "auto" and job.gt:
        sweep_alpha(job, job.gt, job.ids)
    if job.stage in ("sweep", "crf", "all"):
        run_label_stage(job, seeds=job.stage in ("sweep", "all"), crf=job.stage in ("crf", "all"))


# ----------------------------------------------------------------------------------------- CLI
