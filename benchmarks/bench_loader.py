"""Training data-path throughput: shards vs folders, 0/1/2 loader workers, full two-view transform.

    python benchmarks/bench_loader.py [--quick] [--json PATH] [--size PX] [--images N]

Builds a synthetic VOC/SBD tree (hsc_fast.data.synth, VOC-like image sizes) and its shards in a temp
folder, then times ``build_train_loader`` batches (JPEG decode, random resize/crop/flip, colour
jitter, normalisation, collation, worker transfer) plus ``make_view2`` on the batch. Reported:
images/s after the first batch (steady state) and including worker start-up, steady-state
images/s per worker core (workers=0 counts as one core), and images per CPU-second (CPU time of
the main process and the workers, start-up included; and of the workers alone): the per-core
cost, which hardly depends on how busy a shared machine is. Wall-clock numbers on a shared
machine are lower bounds; the load average at the start of each run is recorded next to them.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _benchmeta import collect_meta, default_result_path, write_results  # noqa: E402
from hsc_fast.config import DataConfig  # noqa: E402
from hsc_fast.data import build_train_loader, make_view2  # noqa: E402
from hsc_fast.data.shard import shard_dataset# noqa: E402


def make_dataset(root: Path, n_images: int, size: int) -> dict:
    from hsc_fast.data.synth import generate
    generate(root, n_images, 0, seed=0, size=size)
    voc = root / "VOC2012"
    lst = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    common = dict(sbd_root=root / "SBD", cls_labels=root / "cls_labels.npy", saliency_root=root / "SaliencyMaps")
    t0 = time.perf_counter()
    shard_dataset(voc, lst, root / "shards", shard_size=max(1, n_images // 8), progress=False, **common)
    return {"voc": voc, "list": lst, "shards": root / "shards", "common": common,
            "shard_seconds": time.perf_counter() - t0}


def _cpu_seconds() -> tuple[float, float]:
    """(CPU time of this process, of its finished children): the loader workers are joined at the
    end of an epoch. Images per CPU-second hardly depends on how busy a shared machine is."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def time_loader(cfg: DataConfig, n_samples: int, view2: int) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    loader = build_train_loader(cfg, 0, 1, seed=0, epoch_samples=n_samples)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    t_first, images, first_images = None, 0, 0
    for batch in loader:
        make_view2(batch["img"], view2)
        images += len(batch["key"])
        if t_first is None:
            t_first, first_images = time.perf_counter(), images
    end = time.perf_counter()
    del loader
    main_cpu, worker_cpu = (b - a for a, b in zip(cpu0, _cpu_seconds()))
    cpu = main_cpu + worker_cpu
    steady = (images - first_images) / max(end - t_first, 1e-9)
    cores = max(1, cfg.workers)
    return {"workers": cfg.workers, "images": images, "seconds": round(end - t0, 3),
            "images_per_s_total": round(images / (end - t0), 1), "images_per_s_steady": round(steady, 1),
            "images_per_s_per_core": round(steady / cores, 1), "cpu_seconds": round(cpu, 2),
            "images_per_cpu_s": round(images / max(cpu, 1e-9), 1),
            # the per-worker-core figure: workers' CPU only (the main process's share -- receiving,
            # CPU normalisation and view 2, which run on the GPU in training -- left out)
            "images_per_worker_cpu_s": round(images / worker_cpu, 1) if cfg.workers and worker_cpu > 0 else None,
            "loadavg_1min_at_start": load}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small dataset and short runs")
    ap.add_argument("--json", default="", help="output JSON (default benchmarks/results/loader-<device>-<date>.json, "
                    "with .csv and .md beside it)")
    ap.add_argument("--size", type=int, default=432, help="synthetic image side (432^2 ~ a 500x375 VOC image)")
    ap.add_argument("--images", type=int, default=0, help="images per timed run (default 48 quick / 192)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.images or (48 if args.quick else 192)
    results = []
    with tempfile.TemporaryDirectory(prefix="hsc-bench-loader-") as tmp:
        t0 = time.perf_counter()
        data = make_dataset(Path(tmp), n, args.size)
        print(f"dataset: {n} images {args.size}px in {time.perf_counter() - t0:.1f} s "
              f"(sharding {data['shard_seconds']:.1f} s)")
        sources = {"shards": dict(train=str(data["shards"])),
                   "folders": dict(train=str(data["voc"]), train_list=str(data["list"]),
                                   **{k: str(v) for k, v in data["common"].items()})}
        for workers in (0, 1, 2):
            for name, src in sources.items():
                cfg = DataConfig(batch_size=args.batch_size, workers=workers, shuffle_buffer=64, **src)
                r = dict(source=name, **time_loader(cfg, n, cfg.view2_size))
                results.append(r)
                print(f"{name:8s} workers={workers}: {r['images_per_s_steady']:7.1f} img/s steady "
                      f"({r['images_per_s_per_core']:.1f}/core), {r['images_per_s_total']:.1f} img/s incl. start-up, "
                      f"{r['images_per_cpu_s']:.1f} img per CPU-second, {r['images_per_worker_cpu_s']} per worker "
                      f"CPU-second (load {r['loadavg_1min_at_start']:.1f})")
    import PIL
    import webdataset
    meta = collect_meta(benchmark="loader", pillow=PIL.__version__, webdataset=getattr(webdataset, "__version__", "?"),
                        shapes={"image": [args.size, args.size], "crop": 448, "view2": 128, "batch": args.batch_size,
                                "resize_long": [448, 768]},
                        config={"quick": args.quick, "images_per_run": n, "torch_threads": 1, "saliency": True})
    base = default_result_path("loader")
    json_path = Path(args.json) if args.json else base.with_suffix(".json")
    print("wrote", write_results(results, json_path, json_path.with_suffix(".csv"), json_path.with_suffix(".md"),
                                 meta=meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
