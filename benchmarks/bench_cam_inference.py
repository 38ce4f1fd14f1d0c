"""Multi-scale CAM inference: the CAM path only (``forward_cam``) vs the whole training forward.

    python benchmarks/bench_cam_inference.py [--quick] [--width-div 8] [--threads 2] [--out PATH]

Both variants run ``hsc_fast.eval.seeds.multiscale_cam`` (scales 0.5/1.0/1.5/2.0, image + flip as
one batch per scale) on a real VOC photo with the same randomly initialised CamNet (ResNet-38 with
every width divided by ``--width-div``, PCM and both projectors built, as the official preset):

  * ``whole_forward``: ``model(batch)["cam"]`` -- what inference ran before issue 25: PCM (an HW x HW
    affinity per image) and the two projectors run and are thrown away;
  * ``forward_cam``: ``model.forward_cam(batch)`` -- backbone + the 1x1 CAM head, as the authors.

Each variant runs in its own fresh subprocess, one after the other, in one invocation, so the
ratios compare like with like. Columns: wall-clock ms per image (median, p20, p80 of ``--reps``
calls after one warm-up; on a shared CPU wall time depends on the load, so ``cpu_s_per_image``, the
process's user + system CPU seconds per call, warm-up included, is recorded too), and memory:
  * CPU: ``peak_rss_mib`` = the subprocess's peak resident set size (``ru_maxrss``: Python, torch,
    the model, allocator caches included) and ``inference_rss_mib`` = how far that high-water mark
    rose during inference (its value after the runs minus its value after loading the model and the
    image). The rise is the honest part to compare: it is what the inference itself needed beyond
    what the process already held, at page granularity, including memory freed again;
  * CUDA: ``peak_alloc_mib`` = torch's peak allocated bytes during one call (caching allocator
    statistics), ``inference_alloc_mib`` = that minus the bytes allocated before the call.
The CAMs of the two variants are compared too (``max_abs_diff_vs_whole``; 0 expected: the CAM head
output does not depend on PCM or the projectors). Writes ``<out>.json`` (records + device,
versions, shapes, git sha) and ``<out>.md``; default out: benchmarks/results/cam-inference-<device>-<date>.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from _benchmeta import collect_meta, default_result_path, markdown_table, time_cpu, write_results  # noqa: E402

PHOTO = REPO.parent / "shared" / "fixtures" / "voc" / "JPEGImages" / "2007_000033.jpg"
SCALES = (0.5, 1.0, 1.5, 2.0)
VARIANTS = ("whole_forward", "forward_cam")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


class _WholeForward:
    """The pre-issue-25 inference: the whole training forward, only its "cam" output used."""

    def __init__(self, net):
        self.net = net

    def forward_cam(self, x):
        return self.net(x)["cam"]


def _load_photo(image_long: int):
    import numpy as np
    from PIL import Image
    photo = Image.open(PHOTO).convert("RGB")
    if image_long and image_long != max(photo.size):
        k = image_long / max(photo.size)
        photo = photo.resize((round(photo.width * k), round(photo.height * k)), Image.BICUBIC)
    return np.asarray(photo)


def worker(variant: str, args) -> dict:
    """One variant in this (fresh) process: time and memory of multiscale_cam."""
    import numpy as np
    import torch
    from hsc_fast.eval.seeds import multiscale_cam
    from hsc_fast.models.backbones import build_backbone
    from hsc_fast.models.cam_net import CamNet
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = CamNet(build_backbone("resnet38", width_div=args.width_div), pcm=True, projectors=True).eval().to(device)
    model = net if variant == "forward_cam" else _WholeForward(net)
    image = _load_photo(args.image_long[0])   # a worker gets one size
    label = np.zeros(20, np.float32)
    label[[14]] = 1   # a person: every class costs the same, the labels only mask the sum

    def run():
        out = multiscale_cam(model, image, label, scales=SCALES, flip=True, device=device, amp=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    rec = {"variant": variant, "image_hw": list(image.shape[:2]), "scales": list(SCALES), "flip": True,
           "width_div": args.width_div, "threads": args.threads, "device": device.type}
    try:
        if device.type == "cuda":
            from _benchmeta import peak_memory_cuda, time_cuda
            peak, before = peak_memory_cuda(run)
            med, p20, p80 = time_cuda(run, rep_ms=args.reps * 200)
            rec.update(peak_alloc_mib=peak / 2**20, inference_alloc_mib=(peak - before) / 2**20)
        else:
            rss0, cpu0 = _maxrss_mib(), _cpu_seconds()
            med, p20, p80 = time_cpu(run, reps=args.reps, warmup=1)
            rss1, cpu1 = _maxrss_mib(), _cpu_seconds()
            rec.update(peak_rss_mib=rss1, inference_rss_mib=rss1 - rss0,
                       cpu_s_per_image=(cpu1 - cpu0) / (args.reps + 1))
        rec.update(ms_median=med, ms_p20=p20, ms_p80=p80)
        np.save(args.cams_out, run().cpu().numpy())
    except torch.OutOfMemoryError as e:
        rec.update(error=f"out of memory: {str(e).splitlines()[0][:160]}")
    return rec


def run_variant(variant: str, image_long: int, args, tmp: Path) -> dict:
    out, cams = tmp / f"{variant}.json", tmp / f"{variant}.npy"
    cmd = [sys.executable, __file__, "--worker", variant, "--record-out", str(out), "--cams-out", str(cams),
           "--width-div", str(args.width_div), "--threads", str(args.threads), "--reps", str(args.reps),
           "--image-long", str(image_long), "--device", args.device]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.read_text())


def compare(args, image_long: int, mem: str) -> tuple[list, dict]:
    """Both variants at one image size: their records (with the CAM difference) and the ratios."""
    import numpy as np
    with tempfile.TemporaryDirectory() as tmp:
        records = [run_variant(v, image_long, args, Path(tmp)) for v in VARIANTS]
        cams = {v: Path(tmp) / f"{v}.npy" for v in VARIANTS}
        whole = np.load(cams["whole_forward"]) if cams["whole_forward"].exists() else None
        for rec, v in zip(records, VARIANTS):
            if whole is not None and cams[v].exists():
                rec["max_abs_diff_vs_whole"] = float(np.abs(np.load(cams[v]) - whole).max())
    base, new = records
    if "error" in base or "error" in new:
        return records, {}
    ratios = {"speedup_wall": base["ms_median"] / new["ms_median"],
              "memory_ratio_whole_over_cam": base[mem] / max(new[mem], 1e-9)}
    if "cpu_s_per_image" in new:
        ratios["speedup_cpu_time"] = base["cpu_s_per_image"] / new["cpu_s_per_image"]
    return records, {f"long{image_long}_{k}": v for k, v in ratios.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 timed rep, the photo at 160 px long side")
    p.add_argument("--width-div", type=int, default=8, help="ResNet-38 width divisor (1 = the real network)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads per variant")
    p.add_argument("--reps", type=int, default=1, help="timed calls per variant (after one warm-up)")
    p.add_argument("--image-long", type=int, nargs="+", default=[250, 500],
                   help="long sides the photo is resized to first, one pair of rows each (500 = as stored: PCM's "
                        "HW x HW affinity grows with the 4th power of the side)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", help="result path without extension")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--record-out", help=argparse.SUPPRESS)
    p.add_argument("--cams-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.record_out).write_text(json.dumps(worker(args.worker, args)))
        return
    if args.quick:
        args.reps, args.image_long = 1, [160]
    meta = collect_meta(benchmark="cam_inference", photo=PHOTO.name)   # the commit the run started on
    mem = "inference_alloc_mib" if args.device.startswith("cuda") else "inference_rss_mib"
    records, summary = [], {}
    for image_long in args.image_long:
        rows, ratios = compare(args, image_long, mem)
        records += rows
        summary.update(ratios)
    meta.update(memory_column=mem, **summary)
    out = Path(args.out) if args.out else default_result_path("cam-inference")
    md = "\n\n" + "\n".join(f"- {k}: {v:.3g}" for k, v in summary.items()) + "\n"
    write_results(records, out.with_suffix(".json"), md_path=out.with_suffix(".md"), meta=meta, md_extra=md)
    print(markdown_table(records) + md)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
