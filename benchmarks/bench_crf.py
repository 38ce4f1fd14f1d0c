"""Dense-CRF benchmark: pydensecrf (1 core, N-process pool) vs the ``gpu`` lattice backend, and the
16x16 training CRF per training step (``loss.crf.backend``: pydensecrf per-image loop, dense
batched, lattice batched; on CUDA also dense and lattice on the GPU).

    python benchmarks/bench_crf.py [--quick] [--workers N] [--out benchmarks/results/crf]

Inputs: the real VOC/SBD fixture photos with their ground truth (../shared/fixtures) and, when
hsc_fast.data.synth is present, synthetic VOC-like scenes. Scores are made from the ground truth so
that mIoU means something: "seeds" = CAM-like blurred, noisy fg maps of the classes present plus
bg = (1 - max)^alpha (2-4 labels, the INFERENCE preset); "deeplab" = a 21-way softmax of blurred
one-hot + smooth noise (the DEEPLAB_TEST preset).

Columns: seconds per image (pydensecrf on 1 core, pydensecrf over a pool of N processes as
throughput, gpu backend -- torch CPU path with 1 thread here, CUDA when present), pixel agreement
of the gpu backend's argmax with pydensecrf's, and mIoU against ground truth of no CRF / each
backend. Training-CRF records (case train_crf_16x16, one per backend and device): median seconds
per training step (2 views x 12 images, one call per view as the Trainer makes them) and the
pixels that differ from pydensecrf's labels. Writes ``<out>.json`` (records + device, versions,
shapes, git sha) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsc_fast.classes import IGNORE_INDEX, VOC  # noqa: E402

NUM_CLASSES = VOC.num_classes  # the benchmark scores VOC-like label maps
from hsc_fast.crf import DEEPLAB_TEST, INFERENCE, TRAIN, cam_to_crf_probs, crf_batch  # noqa: E402
from hsc_fast.eval.evaluate import confusion_matrix, miou_from_confusion# noqa: E402
from hsc_fast.data.voc import read_label_png, read_sbd_mat  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures"
SEED_ALPHA = 7          # bg = (1 - max fg)^alpha, the authors' VOC value (docs: stages/seeds.md; t=8, alpha=7)


# ------------------------------------------------------------------------------------- inputs

def fixture_samples() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, rgb uint8 HxWx3, gt uint8 HxW with 255 ignore) for every fixture photo with ground truth."""
    out = []
    for jpg in sorted((FIXTURES / "voc" / "JPEGImages").glob("*.jpg")):
        png = FIXTURES / "voc" / "SegmentationClass" / f"{jpg.stem}.png"
        if png.exists():
            out.append((jpg.stem, np.array(Image.open(jpg).convert("RGB")), read_label_png(png)))
    for jpg in sorted((FIXTURES / "sbd" / "img").glob("*.jpg")):
        mat = FIXTURES / "sbd" / "cls" / f"{jpg.stem}.mat"
        if mat.exists():
            out.append((jpg.stem, np.array(Image.open(jpg).convert("RGB")), read_sbd_mat(mat)))
    return out


def synthetic_samples(n: int, size: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        from hsc_fast.data.synth import make_image# noqa: PLC0415 - optional module of another helper
    except ImportError:
        return []
    out = []
    for i in range(n):
        rgb, mask, _ = make_image(np.random.default_rng([seed, i]), size)
        out.append((f"synth_{i}", rgb, mask))
    return out


def _smooth_noise(rng, shape, sigma):
    noise = gaussian_filter(rng.normal(size=shape), sigma)
    return noise / (noise.std() + 1e-8)


def seed_scores(gt: np.ndarray, rng) -> tuple[np.ndarray, list[int]]:
    """CAM-like fg scores in [0,1] for the classes present -> ((K+1,H,W) probs, VOC id per channel)."""
    classes = [int(c) for c in np.unique(gt) if c not in (0, IGNORE_INDEX)]
    cams = []
    for c in classes:
        blurred = gaussian_filter((gt == c).astype(np.float32), sigma=10)
        cam = np.clip(blurred * rng.uniform(0.6, 1.0) + 0.12 * _smooth_noise(rng, gt.shape, 15), 0, None)
        cams.append(cam / (cam.max() + 1e-5))
    return cam_to_crf_probs(np.stack(cams).astype(np.float32), SEED_ALPHA), [0] + classes


def deeplab_scores(gt: np.ndarray, rng) -> np.ndarray:
    """21-way softmax of blurred one-hot ground truth plus smooth noise: (21, H, W) float32."""
    target = np.where(gt == IGNORE_INDEX, 0, gt)
    logits = np.stack([4.0 * gaussian_filter((target == c).astype(np.float32), 6) for c in range(NUM_CLASSES)])
    logits += 0.6 * np.stack([_smooth_noise(rng, gt.shape, 12) for _ in range(NUM_CLASSES)])
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


# ------------------------------------------------------------------------------------ measuring

def miou(gts, preds) -> float:
    conf = sum(confusion_matrix(g, p) for g, p in zip(gts, preds))
    return round(float(miou_from_confusion(conf)) * 100, 2)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _gpu_device() -> str:
    import torch  # noqa: PLC0415
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_case(case: str, samples, preset, workers: int, gpu_batch: int, pool_repeat: int, batched: bool) -> list[dict]:
    import torch  # noqa: PLC0415

    rng = np.random.default_rng(0)
    images, probs, id_maps, gts, sets = [], [], [], [], []
    for name, rgb, gt in samples:
        if case == "seeds":
            p, ids = seed_scores(gt, rng)
        else:
            p, ids = deeplab_scores(gt, rng), list(range(NUM_CLASSES))
        images.append(np.ascontiguousarray(rgb))
        probs.append(p)
        id_maps.append(np.array(ids))
        gts.append(gt)
        sets.append("synth" if name.startswith("synth") else "fixtures")
    kw = preset.kwargs()
    to_voc = lambda k, lab: id_maps[k][lab]  # noqa: E731
    ref, t_ref = timed(lambda: crf_batch(images, probs, workers=1, return_labels=True, **kw))
    _, t_pool = timed(lambda: crf_batch(images * pool_repeat, probs * pool_repeat, workers=workers,
                                        return_labels=True, **kw))
    torch.set_num_threads(1)
    crf_batch(images[:1], probs[:1], backend="gpu", **kw)                        # warm-up (CUDA init, kernels)
    gpu1, t_gpu1 = timed(lambda: [crf_batch([im], [p], backend="gpu", return_labels=True, **kw)[0]
                                  for im, p in zip(images, probs)])
    # Batching pays on CUDA; on the CPU path it only adds memory traffic, so --quick skips it there.
    if batched:
        gpub, t_gpub = timed(lambda: crf_batch(images, probs, backend="gpu", gpu_batch=gpu_batch,
                                               return_labels=True, **kw))
    else:
        gpub, t_gpub = gpu1, float("nan")
    n = len(images)
    agree = [float((a == b).mean()) for a, b in zip(gpu1, ref)]
    agree_b = [float((a == b).mean()) for a, b in zip(gpub, ref)]
    records = []
    for subset in sorted(set(sets)):
        idx = [k for k in range(n) if sets[k] == subset]
        g = [gts[k] for k in idx]
        base = {"case": case, "subset": subset, "n_images": len(idx), "preset": kw,
                "shapes": sorted({images[k].shape[:2] for k in idx}), "n_labels": sorted({probs[k].shape[0] for k in idx}),
                "miou_no_crf": miou(g, [to_voc(k, probs[k].argmax(0)) for k in idx]),
                "miou_pydensecrf": miou(g, [to_voc(k, ref[k]) for k in idx]),
                "miou_gpu_backend": miou(g, [to_voc(k, gpu1[k]) for k in idx]),
                "agreement_gpu_vs_pydensecrf_mean": round(float(np.mean([agree[k] for k in idx])), 6),
                "agreement_gpu_vs_pydensecrf_min": round(float(np.min([agree[k] for k in idx])), 6),
                "agreement_gpu_batched_vs_pydensecrf_min":
                    round(float(np.min([agree_b[k] for k in idx])), 6) if batched else None}
        records.append(base)
    timing = {"case": case, "subset": "all", "n_images": n, "preset": kw,
              "mean_pixels": int(np.mean([im.shape[0] * im.shape[1] for im in images])),
              "n_labels": sorted({p.shape[0] for p in probs}),
              "pydensecrf_1core_s_per_image": round(t_ref / n, 4),
              f"pydensecrf_pool{workers}_s_per_image": round(t_pool / (n * pool_repeat), 4),
              "gpu_backend_device": _gpu_device(),
              "gpu_backend_s_per_image_batch1": round(t_gpu1 / n, 4),
              f"gpu_backend_s_per_image_batch{gpu_batch}": round(t_gpub / n, 4) if batched else None}
    return records + [timing]


def _train_crf_inputs(samples, n_images: int):
    """n_images 16x16 (image, noisy label map) pairs from the fixture/synthetic photos."""
    rng = np.random.default_rng(1)
    imgs, labs = [], []
    for k in range(n_images):
        _, rgb, gt = samples[k % len(samples)]
        small = np.array(Image.fromarray(rgb).resize((16, 16), Image.BILINEAR))
        lab = np.array(Image.fromarray(np.where(gt == IGNORE_INDEX, 0, gt).astype(np.uint8)).resize((16, 16), Image.NEAREST))
        present = np.unique(lab)
        lab = np.where(rng.random((16, 16)) < 0.2, rng.choice(present, (16, 16)), lab).astype(np.int64)
        imgs.append(small)
        labs.append(lab)
    return np.stack(imgs), np.stack(labs)


def _median_time(fn, repeats: int, sync) -> tuple[object, float]:
    out, times = None, []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def run_train_crf(samples, n_images: int, repeats: int) -> list[dict]:
    """HSC's per-step 16x16 CRF (loss.crf.backend): 2 views x batch 12 = 24 label maps, run as
    the Trainer does (one call per view, 12 images each) through hsc_fast.crf.train.train_crf_fn.
    One record per backend and device: median seconds per training step over `repeats` steps,
    pixel agreement with pydensecrf (the authors' per-image loop)."""
    import torch  # noqa: PLC0415
    from hsc_fast.crf.lattice import cupy_available, lattice_crf_labels  # noqa: PLC0415
    from hsc_fast.crf.train import train_crf_fn  # noqa: PLC0415
    from hsc_fast.registry import TRAIN_CRF_BACKENDS  # noqa: PLC0415

    torch.set_num_threads(1)
    imgs, labs = _train_crf_inputs(samples, n_images)
    kw = dict(n_labels=NUM_CLASSES, gt_prob=0.7, **TRAIN.kwargs())
    img_t = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    lab_t = torch.from_numpy(labs)
    half = n_images // 2
    # every registered training-CRF backend; pydensecrf (the reference) first, the batched ones on CUDA too
    names = sorted(TRAIN_CRF_BACKENDS, key=lambda n: n != "pydensecrf")
    variants = [(n, "cpu", train_crf_fn(n)) for n in names]
    if torch.cuda.is_available():
        variants += [(n, "cuda", train_crf_fn(n)) for n in names if TRAIN_CRF_BACKENDS.get(n).batched]
        variants += [("lattice_sort_build", "cuda", lambda i, lab, **p: lattice_crf_labels(i, lab, build="sort", **p))]
    ref = None
    records = []
    for backend, dev, fn in variants:
        img_d, lab_d = img_t.to(dev), lab_t.to(dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def step():  # one call per view, as contrast_inputs does
            return torch.cat([fn(img_d[:half], lab_d[:half], **kw), fn(img_d[half:], lab_d[half:], **kw)]).cpu()

        step()                                                                   # warm-up (CUDA init, kernels)
        out, t = _median_time(step, repeats, sync)
        out = out.numpy()
        ref = out if ref is None else ref                                          # pydensecrf comes first
        rec = {"case": "train_crf_16x16", "subset": "mixed", "n_images": n_images, "preset": TRAIN.kwargs(),
               "backend": backend, "device": dev, "calls_per_step": 2, "images_per_call": half,
               "s_per_step": round(t, 5), "ms_per_image": round(1000 * t / n_images, 3),
               "agreement_vs_pydensecrf": round(float((out == ref).mean()), 6),
               "pixels_differing_from_pydensecrf": int((out != ref).sum()), "pixels": int(out.size),
               "labels_changed_by_crf": int((out != labs).sum())}
        if backend.startswith("lattice") and dev == "cuda":
            rec["lattice_build"] = "sort" if backend.endswith("sort_build") else ("hash" if cupy_available() else "sort")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------- meta

def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def collect_meta(args) -> dict:
    import torch  # noqa: PLC0415
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"benchmark": "crf", "args": vars(args), "git_sha": sha, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pydensecrf2": _version("pydensecrf2"), "cupy": _version("cupy-cuda12x") if _version("cupy-cuda12x") != "absent"
            else _version("cupy-cuda13x"), "cpu": cpu, "cpu_count": os.cpu_count(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_at_start": os.getloadavg()}


def write_markdown(records: list[dict], meta: dict, path: Path) -> None:
    lines = [f"# CRF benchmark ({meta['time_utc']}, git {meta['git_sha'][:10]})", "",
             f"CPU: {meta['cpu']} x{meta['cpu_count']}; CUDA: {meta['cuda_device']}; torch {meta['torch']}; "
             f"pydensecrf2 {meta['pydensecrf2']}; load average at start {meta['load_avg_at_start']}", ""]
    for rec in records:
        lines.append("- " + ", ".join(f"{k}={v}" for k, v in rec.items() if k != "preset")
                     + f" (preset {rec.get('preset')})")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer synthetic images and repeats (~1-2 min on 2 cores)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pydensecrf pool size")
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--synth", type=int, default=None, help="synthetic images (default 2 quick / 12 full)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "crf"), help="output path stem")
    args = ap.parse_args(argv)
    n_synth = args.synth if args.synth is not None else (2 if args.quick else 12)
    samples = fixture_samples() + synthetic_samples(n_synth, 384, seed=0)
    if not samples:
        print(f"no inputs: fixtures missing at {FIXTURES} and hsc_fast.data.synth unavailable", file=sys.stderr)
        return 1
    meta = collect_meta(args)
    records = []
    for case, preset in (("seeds", INFERENCE), ("deeplab", DEEPLAB_TEST)):
        records += run_case(case, samples, preset, args.workers, args.gpu_batch, pool_repeat=1 if args.quick else 3,
                            batched=not args.quick or _gpu_device() == "cuda")
        print(json.dumps(records[-1]), flush=True)
    train_records = run_train_crf(samples, 24, repeats=5 if args.quick else 20)
    records += train_records
    for rec in train_records:
        print(json.dumps(rec), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str) + "\n")
    write_markdown(records, meta, out.with_suffix(".md"))
    for rec in records:
        print(json.dumps(rec, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
