"""`python -m hsc_fast.doctor` (console script `hsc-doctor`): the first command on a new cluster.

Checks, in order (each PASS, FAIL or SKIP with the reason):
  versions  python, torch + CUDA, triton, cupy (+ its CUDA), deepspeed, NCCL, pydensecrf, the GPUs;
            a CuPy built for another CUDA major than torch's is a FAIL naming the extra to install
  kernels   every Triton kernel against its torch reference (forward and gradient, float32 and
            bf16, the training feature widths) at the self-check tolerances -- compiled on CUDA,
            in the interpreter on a CPU
  compile   ahead-of-time compile of every kernel specialisation for this machine's GPU
            (`kernels.aot --arch local`: shared memory, registers, spills)
  crf       the lattice CRF (sort build, and the CuPy hash build on CUDA) against pydensecrf on a
            synthetic photo: argmax agreement and max |dQ|
  train     a 2-step CAM training on a generated 8-image set on this machine's device
  bench     a short side-by-side benchmark: fused kernels vs eager references (CUDA), lattice CRF
            vs pydensecrf
Exit status: 0 when nothing failed, 1 when a check failed, 2 for bad arguments.
`--json FILE` writes everything (versions, verdicts, measurements) for bug reports.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

# The interpreter must be chosen before any kernel module is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch
    os.environ["TRITON_INTERPRET"] = "0" if _torch.cuda.is_available() else "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("versions", "kernels", "compile", "crf", "train", "bench")
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Check:
    section: str
    name: str
    status: str
    detail: str = ""
    data: dict = field(default_factory=dict)
    seconds: float = 0.0


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "installed"))
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"not available ({type(e).__name__})"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------------
# versions
# ------------------------------------------------------------------------------------------
def cupy_cuda_major() -> Optional[int]:
    """The CUDA major version the installed CuPy wheel was built for (None without CuPy)."""
    try:
        from importlib import metadata
        names = [d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"]]
    except Exception:  # noqa: BLE001
        return None
    for name in names:
        low = name.lower()
        if low.startswith("cupy-cuda"):
            digits = "".join(ch for ch in low[len("cupy-cuda"):] if ch.isdigit())
            return int(digits[:2]) if digits else None
    return None


def check_versions() -> list[Check]:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "triton": _version("triton"), "cupy": _version("cupy"),
            "deepspeed": _version("deepspeed"), "pydensecrf": _version("pydensecrf"), "numpy": np.__version__,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if torch.cuda.is_available():
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"unavailable ({type(e).__name__})"
        info["gpus"] = [dict(name=torch.cuda.get_device_name(i), capability=".".join(map(str, torch.cuda.get_device_capability(i))),
                             memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2 ** 30, 1),
                             sms=torch.cuda.get_device_properties(i).multi_processor_count)
                        for i in range(torch.cuda.device_count())]
    else:
        info["gpus"] = []
    checks = [Check("versions", "environment", PASS, ", ".join(f"{k} {v}" for k, v in info.items() if k != "gpus"),
                    data=info)]
    checks.append(_cupy_extra_check(info))
    return checks


def _cupy_extra_check(info: dict) -> Check:
    cupy_major = cupy_cuda_major()
    torch_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    if cupy_major is None:
        return Check("versions", "cupy extra", SKIP, "CuPy not installed: the CRF lattice uses its sort build "
                     f"(for the hash build: pip install 'hsc-fast[gpu-cu{torch_major or 13}]')")
    if torch_major is None:
        return Check("versions", "cupy extra", SKIP, "torch is a CPU build: CuPy is not used")
    if cupy_major != torch_major:
        return Check("versions", "cupy extra", FAIL,
                     f"cupy-cuda{cupy_major}x next to torch built for CUDA {torch.version.cuda}: its NVRTC will not "
                     f"be found; pip uninstall cupy-cuda{cupy_major}x && pip install 'hsc-fast[gpu-cu{torch_major}]'")
    return Check("versions", "cupy extra", PASS, f"cupy-cuda{cupy_major}x matches torch's CUDA {torch.version.cuda}")


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
KERNEL_CASES = (("roi_pool", "roi_pool.roi_pool_triton", "roi_pool_reference", (256,)),
                ("topk_proto", "topk_proto.topk_proto_triton", "topk_proto_reference", (256, 128)),
                ("psc_terms", "psc.psc_terms_triton", "psc_terms_reference", (128,)))
# psc_terms has a kernel variant per class count: VOC's 21 classes (63 logit columns, one block)
# and MS COCO's 81 (243 columns in chunks); the doctor checks both.
PSC_CLASS_COUNTS = (21, 81)


def kernel_variants(op: str):
    """[(case, probe)] for one op: its shape variants, or its one probe."""
    from hsc_fast import ops
    if op == "psc_terms":
        return [ops.psc_variant(c) for c in PSC_CLASS_COUNTS]
    return [("", ops.PROBES[op])]


def check_kernels() -> list[Check]:
    from hsc_fast import ops
    from hsc_fast.ops import check as kernel_check
    dev = device()
    if not ops.triton_available():
        return [Check("kernels", "triton", FAIL, "triton does not import: loss.impl auto uses the torch references")]
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return [Check("kernels", "all", SKIP, "no CUDA device and TRITON_INTERPRET is not 1")]
    checks = []
    for op, kernel, reference, dims in KERNEL_CASES:
        fn = ops.import_kernel(kernel)
        ref = getattr(ops, reference)
        for dtype in (torch.float32, torch.bfloat16):
            for dim in dims:
                for case, probe in kernel_variants(op):
                    r = kernel_check.run_check(op, probe, fn, ref, dtype, dim, dev, case)
                    name = f"{op} {r.dtype} D={dim}" + (f" {case}" if case else "")
                    checks.append(Check("kernels", name, PASS if r.ok else FAIL,
                                        r.describe(), data=asdict(r), seconds=r.seconds))
    return checks


# ------------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------------
def check_compile() -> list[Check]:
    if not torch.cuda.is_available():
        return [Check("compile", "local GPU", SKIP, "no CUDA device; `python -m kernels.aot` compiles every kernel "
                      "for sm_80/sm_90 without one (make test does)")]
    from kernels.aot import compile_all
    start = time.perf_counter()
    reports = compile_all(archs=("local",), workers=max(1, min(4, os.cpu_count() or 1)))
    failed = [r for r in reports if not r["ok"]]
    spills = sorted({(r["kernel"], r["spill_stores"]) for r in reports if r["spill_stores"] > 0})
    detail = (f"{len(reports)} specialisations for {reports[0]['target'] if reports else '?'}, {len(failed)} failed; "
              f"max ptxas {max((r['ptxas_s'] for r in reports), default=0):.1f} s; spills: {spills or 'none'}")
    if failed:
        detail += "; " + "; ".join(f"{r['kernel']}: {r['error']}" for r in failed[:5])
    return [Check("compile", "local GPU", FAIL if failed else PASS, detail, data={"reports": reports},
                  seconds=time.perf_counter() - start)]


# ------------------------------------------------------------------------------------------
# crf
# ------------------------------------------------------------------------------------------
def crf_fixture(size: int = 96, seed: int = 3):
    """A synthetic photo (hsc_fast.data.synth) and CAM-like probabilities from its mask."""
    from hsc_fast.data.synth import render_scene
    scene = render_scene(np.random.default_rng(seed), size=size)
    image, seg = np.ascontiguousarray(scene.rgb), scene.seg
    labels = np.unique(seg[seg != 255])
    rng = np.random.default_rng(seed)
    probs = np.stack([(seg == c).astype(np.float32) * 0.6 + 0.2 for c in labels])
    probs += rng.uniform(0, 0.3, probs.shape).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    return image, probs


def check_crf() -> list[Check]:
    from hsc_fast.crf import INFERENCE, crf_inference
    from hsc_fast.crf.lattice import cupy_available
    try:
        import pydensecrf  # noqa: F401
    except ImportError:
        return [Check("crf", "pydensecrf", SKIP, "pydensecrf (pydensecrf2) not installed: nothing to compare with")]
    image, probs = crf_fixture()
    start = time.perf_counter()
    reference = crf_inference(image, probs, backend="pydensecrf", **INFERENCE.kwargs())
    ref_s = time.perf_counter() - start
    builds = ["sort"] + (["hash"] if torch.cuda.is_available() and cupy_available() else [])
    checks = []
    for build in builds:
        checks.append(_crf_build_check(build, image, probs, reference, ref_s))
    if "hash" not in builds:
        why = "no CUDA device" if not torch.cuda.is_available() else "CuPy missing or failed its self-check"
        checks.append(Check("crf", "lattice hash build", SKIP, f"{why}: the sort build is used"))
    return checks


def _crf_build_check(build, image, probs, reference, ref_s) -> Check:
    from hsc_fast.crf import INFERENCE, unary_from_probs
    from hsc_fast.crf.lattice import lattice_crf_batch
    unary = unary_from_probs(probs)
    start = time.perf_counter()
    q = lattice_crf_batch([image], [unary], device=device(), build=build, **INFERENCE.kwargs())[0]
    seconds = time.perf_counter() - start
    agree = float((q.argmax(0) == reference.argmax(0)).mean())
    dq = float(np.abs(q - reference).max())
    status = PASS if agree >= 0.99 and dq < 1e-3 else FAIL
    return Check("crf", f"lattice {build} build vs pydensecrf", status,
                 f"{agree * 100:.2f} % argmax agreement, max |dQ| {dq:.1e} on {image.shape[1]}x{image.shape[0]}, "
                 f"{probs.shape[0]} labels", data=dict(agreement=agree, max_dq=dq, seconds=seconds,
                                                        pydensecrf_seconds=ref_s), seconds=seconds)


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------
def smoke_config(data_dir: Path):
    from hsc_fast.config import load_config
    sets = [f"data.train={data_dir / 'VOC2012'}", f"data.train_list={data_dir / 'VOC2012/ImageSets/Segmentation/train_aug.txt'}",
            f"data.sbd_root={data_dir / 'SBD'}", f"data.cls_labels={data_dir / 'cls_labels.npy'}",
            "data.batch_size=2", "data.workers=0", "data.crop_size=64", "data.resize_long=[64,80]",
            "data.view2_size=32", "loss.contrast_size=4", "loss.csc_topk=16", "loss.csc_update_topk=4",
            "loss.psc_topk=1", "loss.crf.iters=3", "loss.impl=auto", "model.allow_random_init=true",
            "model.frozen_bn=false", "model.freeze_stem=false", "pretrain.enabled=false",
            "train.max_steps=2", "train.save_every=2", "train.tensorboard=false", "train.dist_timeout_s=60"]
    return load_config("demo", sets)


def check_train() -> list[Check]:
    from hsc_fast.engine.session import train
    from hsc_fast.engine.runlog import read_metrics
    from hsc_fast.data.synth import generate
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hsc-doctor-") as tmp:
        data, run = Path(tmp) / "synth", Path(tmp) / "run"
        generate(data, 8, 2, 0, 64)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
        try:
            summary = train(smoke_config(data), run, progress=False)
        except Exception as e:  # noqa: BLE001 - the check reports it
            return [Check("train", "2-step CAM training", FAIL, f"{type(e).__name__}: {e}",
                          data={"traceback": traceback.format_exc()[-3000:]}, seconds=time.perf_counter() - start)]
        rows = read_metrics(run / "metrics.csv")
        env = json.loads((run / "env.json").read_text())
    losses = [float(r["loss"]) for r in rows]
    ok = len(rows) == 2 and all(np.isfinite(losses)) and summary.get("nonfinite_total") == 0
    kernel_fallbacks = [r["op"] for r in env.get("kernel_checks", []) if not r["ok"]]
    detail = (f"{len(rows)} steps on {device()}, losses {', '.join(f'{x:.4g}' for x in losses)}; kernel self-checks: "
              f"{len(env.get('kernel_checks', []))} ({'fallbacks: ' + ', '.join(kernel_fallbacks) if kernel_fallbacks else 'no fallback'})")
    return [Check("train", "2-step CAM training", PASS if ok else FAIL, detail,
                  data={"losses": losses, "kernel_checks": env.get("kernel_checks", [])},
                  seconds=time.perf_counter() - start)]


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------
def _time(fn: Callable, reps: int) -> float:
    """Median seconds of fn() (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check_bench() -> list[Check]:
    from hsc_fast.crf import INFERENCE, crf_inference, unary_from_probs
    from hsc_fast.crf.lattice import lattice_crf_batch
    checks = []
    if torch.cuda.is_available():
        checks += _bench_kernels()
    else:
        checks.append(Check("bench", "fused kernels", SKIP, "no CUDA device (interpreter timings mean nothing)"))
    image, probs = crf_fixture(size=192)
    unary = unary_from_probs(probs)
    try:
        import pydensecrf  # noqa: F401
        ref = _time(lambda: crf_inference(image, probs, backend="pydensecrf", **INFERENCE.kwargs()), 3)
    except ImportError:
        ref = float("nan")
    ours = _time(lambda: lattice_crf_batch([image], [unary], device=device(), **INFERENCE.kwargs()), 3)
    checks.append(Check("bench", "CRF 192x192", PASS, f"pydensecrf {ref * 1e3:.1f} ms, lattice on {device()} "
                        f"{ours * 1e3:.1f} ms (x{ref / ours:.2f})", data=dict(pydensecrf_s=ref, lattice_s=ours)))
    return checks


def _bench_kernels() -> list[Check]:
    from hsc_fast import ops
    dev = device()
    g = torch.Generator().manual_seed(0)
    m, d = 8 * 56 * 56, 128
    f1, f2 = (torch.randn(m, d, generator=g).to(dev).requires_grad_(True) for _ in range(2))
    y1, y2 = (torch.randint(0, 21, (m,), generator=g).to(dev) for _ in range(2))
    protos = [torch.nn.functional.normalize(torch.randn(21, d, generator=g), dim=1).to(dev) for _ in range(4)]
    feats = torch.randn(8, 256, 56 * 56, generator=g).to(dev).requires_grad_(True)
    masks = torch.nn.functional.one_hot(torch.randint(0, 2, (8, 56 * 56), generator=g), 2).permute(0, 2, 1).float().to(dev)
    scores, pix = torch.rand(20, m, generator=g).to(dev), torch.randn(m, 256, generator=g).to(dev).requires_grad_(True)
    cases = {"psc_terms": lambda impl: ops.psc_terms(f1, f2, y1, y2, *protos, impl=impl).sum().backward(),
             "roi_pool": lambda impl: ops.roi_pool(feats, masks, impl=impl).sum().backward(),
             "topk_proto": lambda impl: ops.topk_proto(scores, pix, 128, impl=impl).sum().backward()}
    checks = []
    for name, run in cases.items():
        fused, eager = _time(lambda: run("triton"), 20), _time(lambda: run("torch"), 20)
        checks.append(Check("bench", f"{name} fwd+bwd full-res", PASS,
                            f"fused {fused * 1e3:.3f} ms, eager {eager * 1e3:.3f} ms (x{eager / fused:.2f})",
                            data=dict(fused_s=fused, eager_s=eager)))
    return checks


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
RUNNERS = {"versions": check_versions, "kernels": check_kernels, "compile": check_compile, "crf": check_crf,
           "train": check_train, "bench": check_bench}


def run(sections=SECTIONS, echo: Callable[[str], None] = print) -> list[Check]:
    checks = []
    for section in sections:
        start = time.perf_counter()
        try:
            found = RUNNERS[section]()
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            found = [Check(section, "section", FAIL, f"{type(e).__name__}: {e}",
                           data={"traceback": traceback.format_exc()[-3000:]})]
        for c in found:
            c.seconds = c.seconds or (time.perf_counter() - start) / max(len(found), 1)
            echo(f"[{c.status}] {c.section:8s} {c.name}: {c.detail}")
        checks += found
    return checks


def build_parser() -> argparse.ArgumentParser:
    """The hsc-doctor command line (the exit-status table ends --help)."""
    # Imported here: the TRITON_INTERPRET choice above must come before anything imports the engine.
    from hsc_fast.cli.common import with_exit_codes
    p = argparse.ArgumentParser(prog="hsc-doctor", description=__doc__.split("\n\n")[0],
                                epilog=with_exit_codes(failed="a check failed"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, in this order: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--json", default="", metavar="FILE", help="write every check with its data as JSON (bug reports)")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"hsc-doctor: --only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    checks = run(sections)
    failed = [c for c in checks if c.status == FAIL]
    skipped = [c for c in checks if c.status == SKIP]
    print(f"hsc-doctor: {len(checks) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": [asdict(c) for c in checks],
                                               "failed": len(failed)}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
