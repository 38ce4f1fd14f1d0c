"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without one.

    python -m kernels.aot [--arch 80,90] [--json OUT] [--markdown OUT] [--workers N] [--no-cache]

What is compiled is what the launchers would launch: each case below calls the launchers'
forward and backward functions on meta tensors (shapes and dtypes, no data) under
`_common.recording(target)`, so the block sizes, warps, constexprs and integer specialisations
are the ones the launcher picks for that target. Every recorded launch is specialised exactly
as Triton's JIT does (its binder and argument packing: pointer dtypes, 16-divisible integers,
integers equal to 1), de-duplicated, and compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))` through the ptxas that ships with Triton. The report per
kernel and target: shared memory (and the target's limit), registers, spill stores/loads (from
ptxas -v), ptxas seconds, total compile seconds, and the error if any. The CUDA C source of the CRF
lattice's CuPy hash build (`kernels.lattice_hash`) is compiled too, with NVRTC (the venv's
nvidia-cuda-nvrtc wheel) to a cubin per target, its registers and local memory read back with
the cuobjdump that ships with Triton.

Cases: the official shapes (N=12 images at 16x16), full resolution (N=8 at 56x56) and the large
case (N=16 at 112x112); D = 128 and 256; C = 21 (VOC: 20 foreground rows for CSC) and, at D = 128
C = 81 (MS COCO: 243 PSC logit columns in chunks, 80 foreground rows for CSC); float32 and bf16.

Results are cached per specialisation in ~/.cache/hsc-fast/aot (HSC_AOT_CACHE overrides), keyed
by Triton's own hash of the kernel source and specialisation plus the Triton version and target,
so `make test` recompiles only what changed. Triton's compile cache is pointed at a temporary
folder so that every miss really runs ptxas (and is timed).

Needs TRITON_INTERPRET unset or 0 (the interpreter replaces @triton.jit functions); `compile_all`
runs this module in a subprocess for callers that live under the interpreter (the test suite).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ._common import AOT_TARGETS, INTERPRET, Target, recording

SHAPES = {"official": (12, 16, 16), "fullres": (8, 56, 56), "large": (16, 112, 112)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_CLASSES = 21     # VOC: 20 foreground classes + background
COCO_CLASSES = 81    # MS COCO 2014: 80 + background
CACHE_ENV = "HSC_AOT_CACHE"


# ------------------------------------------------------------------------------------------
# Cases: what the launchers launch at the real training shapes
# ------------------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _roi_pool_case(n, pixels, dim, dtype):
    from .roi_pool import roi_pool_backward, roi_pool_forward
    feats, masks = _meta(n, dim, pixels, dtype=dtype), _meta(n, 2, pixels)
    out, norms, counts = roi_pool_forward(feats, masks, 1e-5, 1e-5)
    roi_pool_backward(_meta(n, 2, dim), masks, out, norms, counts, feats.shape, dtype, 1e-5, 1e-5)


def _topk_proto_case(rows, pixels, dim, dtype, k, k_denom):
    from .topk_proto import clip_k, topk_proto_backward, topk_proto_forward
    scores, feats = _meta(rows, pixels, dtype=dtype), _meta(pixels, dim, dtype=dtype)
    k, k_denom = clip_k(k, k_denom, pixels)
    out, cand, den, norm = topk_proto_forward(scores, feats, k, k_denom, True, 1e-12)
    topk_proto_backward(_meta(rows, dim), out, cand, scores, den, norm, pixels, k, True, 1e-12)


def _psc_case(pixels, dim, dtype, classes=None):
    """The training call: forward (keeping its log-sum-exps where the layout needs them), then
    backward. `classes` = C, the rows of each prototype set (21: VOC, one block; 81: COCO, chunked)."""
    from .psc import psc_backward, psc_forward
    f1, f2 = _meta(pixels, dim, dtype=dtype), _meta(pixels, dim, dtype=dtype)
    y1, y2 = _meta(pixels, dtype=torch.int64), _meta(pixels, dtype=torch.int64)
    protos = [_meta(classes or NUM_CLASSES, dim) for _ in range(4)]
    _, lse = psc_forward(f1, f2, y1, y2, *protos, 0.1, 1e-12, save_lse=True)
    psc_backward(_meta(4), f1, f2, y1, y2, *protos, 0.1, 1e-12, lse=lse)


def cases() -> list[tuple[str, Callable[[], None]]]:
    """(label, thunk) per op, shape, feature dim and dtype; each thunk launches fwd + bwd."""
    out = []
    for shape_name, (n, h, w) in SHAPES.items():
        pixels = n * h * w
        for dname, dtype in DTYPES.items():
            for dim in (128, 256):
                tag = f"{shape_name} N={n} {h}x{w} D={dim} {dname}"
                out.append((f"roi_pool {tag}", lambda n=n, p=h * w, d=dim, t=dtype: _roi_pool_case(n, p, d, t)))
                out.append((f"psc_terms {tag}", lambda p=pixels, d=dim, t=dtype: _psc_case(p, d, t)))
            # CSC: 20 class rows, D=256, class vector k=128 and bank update k=16 / k_denom=128;
            # PSC: 21 rows, D=128, k=16 (official); the paper's k_p = 32 at full resolution.
            for rows, dim, k, k_denom, what in ((20, 256, 128, None, "csc"), (20, 256, 16, 128, "csc update"),
                                                (21, 128, 16, None, "psc"), (21, 128, 32, None, "psc paper")):
                tag = f"{shape_name} M={pixels} C={rows} D={dim} k={k}/{k_denom or k} {dname} ({what})"
                out.append((f"topk_proto {tag}", lambda r=rows, p=pixels, d=dim, t=dtype, k=k, kd=k_denom:
                            _topk_proto_case(r, p, d, t, k, kd)))
            out += _coco_cases(shape_name, n, h, w, dname, dtype)
    return out


def _coco_cases(shape_name, n, h, w, dname, dtype):
    """MS COCO (C = COCO_CLASSES = 81): PSC with 243 logit columns (the chunked-column kernels)
    at D = 128 (its embedding width) and 256, CSC over 80 foreground rows and PSC's top-k over 81."""
    pixels, out = n * h * w, []
    for dim in (128, 256):
        tag = f"{shape_name} N={n} {h}x{w} D={dim} C={COCO_CLASSES} {dname}"
        out.append((f"psc_terms {tag}", lambda p=pixels, d=dim, t=dtype: _psc_case(p, d, t, COCO_CLASSES)))
    for rows, dim, k, k_denom, what in ((COCO_CLASSES - 1, 256, 128, None, "coco csc"),
                                        (COCO_CLASSES - 1, 256, 16, 128, "coco csc update"),
                                        (COCO_CLASSES, 128, 16, None, "coco psc")):
        tag = f"{shape_name} M={pixels} C={rows} D={dim} k={k}/{k_denom or k} {dname} ({what})"
        out.append((f"topk_proto {tag}", lambda r=rows, p=pixels, d=dim, t=dtype, k=k, kd=k_denom:
                    _topk_proto_case(r, p, d, t, k, kd)))
    return out


# ------------------------------------------------------------------------------------------
# Specialisation (as Triton's JIT) and compilation
# ------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """One distinct compile: kernel, target and Triton's specialisation of the arguments."""
    module: str
    kernel: str
    arch: int
    args: list                  # tensors as ["tensor", dtype], others as values
    meta: dict
    target: dict = field(default_factory=dict)   # the Target's fields (name, arch, sms, max_shared)
    key: str = ""
    cases: list = field(default_factory=list)


@dataclass
class Report:
    kernel: str
    target: str
    arch: int
    constexprs: dict
    ok: bool
    inputs: str = ""
    shared_bytes: int = 0
    shared_limit: int = 0
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    ptxas_s: float = 0.0
    compile_s: float = 0.0
    error: str = ""
    cases: list = field(default_factory=list)
    cached: bool = False


def _encode_args(args) -> list:
    return [["tensor", str(a.dtype).replace("torch.", "")] if isinstance(a, torch.Tensor) else a for a in args]


def _decode_args(args) -> list:
    from triton.runtime.jit import MockTensor
    return [MockTensor(getattr(torch, a[1])) if isinstance(a, list) and a and a[0] == "tensor" else a for a in args]


def _jit_function(module: str, kernel: str):
    import importlib
    return getattr(importlib.import_module(module), kernel)


def _specialize(spec: Spec):
    """(GPUTarget, ASTSource, options) exactly as `kernel[grid](*args, **meta)` would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(spec.module, spec.kernel)
    target = GPUTarget("cuda", spec.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(spec.meta)
    bound, specialization, options = binder(*_decode_args(spec.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(fn, signature, constexprs, attrs), options


def spec_key(spec: Spec) -> str:
    import triton
    _, src, options = _specialize(spec)
    text = json.dumps([triton.__version__, spec.target, src.hash(), sorted(options.__dict__.items(), key=str)],
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_PTXAS = {}
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _patch_ptxas_timer() -> None:
    """Time the cubin stage and keep its `ptxas -v` log (Triton prints it when asked)."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nv

    if getattr(nv.CUDABackend.make_cubin, "_hsc_timed", False):
        return
    original = nv.CUDABackend.make_cubin

    def timed(self, *args, **kwargs):
        buf = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            out = original(self, *args, **kwargs)
        _PTXAS.update(seconds=time.perf_counter() - start, log=buf.getvalue())
        return out

    timed._hsc_timed = True
    nv.CUDABackend.make_cubin = timed
    knobs.nvidia.dump_ptxas_log = True


@contextlib.contextmanager
def _stderr_to(path: str):
    """Redirect fd 2 (MLIR prints its reproducers there from C++) into a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _input_dtypes(spec: Spec) -> str:
    """The float dtypes among the kernel's tensor arguments ('int64' for key-only kernels)."""
    dtypes = [a[1] for a in spec.args if isinstance(a, list) and a and a[0] == "tensor"]
    floats = sorted({d for d in dtypes if d.startswith(("float", "bfloat"))})
    return ",".join(floats) or ",".join(sorted(set(dtypes)))


def _readable_constexprs(spec: Spec) -> dict:
    return {k: v for k, v in spec.meta.items()}


def compile_spec(spec: Spec) -> dict:
    """Compile one specialisation (in a worker process); returns a Report as a dict."""
    import triton

    _patch_ptxas_timer()
    target = Target(**spec.target)
    report = Report(spec.kernel, target.name, spec.arch, _readable_constexprs(spec), ok=False,
                    inputs=_input_dtypes(spec), shared_limit=target.max_shared, cases=spec.cases)
    _PTXAS.clear()
    err_file = tempfile.NamedTemporaryFile(prefix="hsc-aot-", suffix=".log", delete=False).name
    start = time.perf_counter()
    try:
        gpu, src, options = _specialize(spec)
        with _stderr_to(err_file):
            compiled = triton.compile(src, target=gpu, options=options.__dict__)
        report.shared_bytes = int(compiled.metadata.shared)
        report.ok = report.shared_bytes <= target.max_shared
        if not report.ok:
            report.error = f"needs {report.shared_bytes} B of shared memory, {target.name} allows {target.max_shared} B"
    except Exception as e:  # noqa: BLE001 - the report carries it
        tail = Path(err_file).read_text(errors="replace").strip().splitlines()
        hint = next((line for line in tail if "Assertion" in line or "error:" in line), "")
        report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if hint:
            report.error += f" ({hint.strip()[:300]})"
    finally:
        Path(err_file).unlink(missing_ok=True)
    report.compile_s = time.perf_counter() - start
    log = _PTXAS.get("log", "")
    report.ptxas_s = float(_PTXAS.get("seconds", 0.0))
    for name, pattern in _PTXAS_RE.items():
        found = pattern.findall(log)
        if found:
            setattr(report, name, max(int(x) for x in found))
    return asdict(report)


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


# ------------------------------------------------------------------------------------------
# Driving it: record, de-duplicate, compile what the cache lacks
# ------------------------------------------------------------------------------------------
def collect_specs(targets=AOT_TARGETS) -> list[Spec]:
    """Every distinct specialisation the cases launch, per target."""
    specs: dict[str, Spec] = {}
    for target in targets:
        for label, thunk in cases():
            with recording(target) as launches:
                thunk()
            for lau in launches:
                fn = lau.kernel
                spec = Spec(fn.fn.__module__, fn.fn.__name__, target.arch, _encode_args(lau.args), dict(lau.meta),
                            target=asdict(target))
                spec.key = spec_key(spec)
                specs.setdefault(spec.key, spec).cases.append(label)
    return list(specs.values())


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hsc-fast" / "aot"))


def _run_pool(specs: list[Spec], workers: int, triton_cache: str) -> dict[str, dict]:
    """Compile in worker processes. A worker that dies (an assertion in the compiler aborts the
    process) breaks the pool: the specs in flight are then retried one per fresh process, so the
    crash is pinned on its own specialisation."""
    results: dict[str, dict] = {}
    pending = list(specs)
    if workers > 1 and pending:
        try:
            with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(triton_cache,)) as pool:
                futures = {spec.key: pool.submit(compile_spec, spec) for spec in pending}
                for key, fut in futures.items():
                    try:
                        results[key] = fut.result()
                    except BrokenProcessPool:
                        pass
        except BrokenProcessPool:
            pass
        pending = [s for s in pending if s.key not in results]
    for spec in pending:
        try:
            with ProcessPoolExecutor(1, initializer=_worker_init, initargs=(triton_cache,)) as pool:
                results[spec.key] = pool.submit(compile_spec, spec).result()
        except BrokenProcessPool as e:
            results[spec.key] = asdict(Report(spec.kernel, spec.target["name"], spec.arch, dict(spec.meta), ok=False,
                                              error=f"compiler process crashed: {e}", cases=spec.cases))
    return results


def compile_specs(specs: list[Spec], workers: int = 2, use_cache: bool = True) -> list[dict]:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict] = {}
    missing = []
    for spec in specs:
        path = cache / f"{spec.key}.json"
        if use_cache and path.is_file():
            cached = json.loads(path.read_text())
            cached.update(cached=True, cases=spec.cases)
            reports[spec.key] = cached
        else:
            missing.append(spec)
    with tempfile.TemporaryDirectory(prefix="hsc-aot-triton-") as triton_cache:
        fresh = _run_pool(missing, workers, triton_cache)
    for key, rep in fresh.items():
        if "crashed" not in rep.get("error", ""):
            tmp = cache / f".{key}.json.tmp"
            tmp.write_text(json.dumps(rep))
            os.replace(tmp, cache / f"{key}.json")
        reports[key] = rep
    return [reports[s.key] for s in specs]


# ------------------------------------------------------------------------------------------
# CUDA C sources (the CRF lattice's CuPy kernels) through NVRTC
# ------------------------------------------------------------------------------------------
def find_nvrtc() -> Optional[Path]:
    """libnvrtc from the venv's NVIDIA wheels (nvidia/*/lib), CUDA_HOME, or the system."""
    import ctypes.util
    import importlib.util
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(root).glob("*/lib/libnvrtc.so*"))
    for home in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if home:
            candidates += sorted(Path(home, "lib64").glob("libnvrtc.so*"))
    candidates = [c for c in candidates if ".alt." not in c.name and "builtins" not in c.name]
    if candidates:
        return candidates[0]
    found = ctypes.util.find_library("nvrtc")
    return Path(found) if found else None


def _nvrtc_cubin(source: str, name: str, arch: int) -> bytes:
    """NVRTC: CUDA C source -> cubin for sm_<arch> (raises RuntimeError with the compile log)."""
    import ctypes
    lib_path = find_nvrtc()
    if lib_path is None:
        raise RuntimeError("libnvrtc not found (the venv's nvidia-cuda-nvrtc wheel, CUDA_HOME or the system)")
    lib = ctypes.CDLL(str(lib_path))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()

    def check(status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    try:
        options = (ctypes.c_char_p * 1)(f"--gpu-architecture=sm_{arch}".encode())
        status = lib.nvrtcCompileProgram(prog, 1, options)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"nvrtcCompileProgram: {lib.nvrtcGetErrorString(status).decode()}\n"
                               f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _resource_usage(cubin: bytes) -> dict[str, dict]:
    """Per-function REG / LOCAL (spill) / SHARED from `cuobjdump -res-usage` (shipped with Triton)."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    usage, current = {}, None
    for line in text.splitlines():
        fn = re.search(r"Function (\w+):", line)
        if fn:
            current = fn.group(1)
            continue
        if current and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[current] = {k: int(v) for k, v in fields.items()}
    return usage


def compile_cuda_source(source: str, name: str, kernels: tuple, target: Target) -> list[dict]:
    """One report per `kernels` function of a CUDA C source compiled with NVRTC for `target`."""
    start = time.perf_counter()
    try:
        cubin = _nvrtc_cubin(source, name, target.arch)
        usage = _resource_usage(cubin)
        error = ""
    except Exception as e:  # noqa: BLE001 - the report carries it
        usage, error = {}, f"{type(e).__name__}: {str(e)[:600]}"
    seconds = time.perf_counter() - start
    reports = []
    for fn in kernels:
        use = usage.get(fn, {})
        missing = "" if error or use else f"{fn} not in the cubin"
        shared = use.get("SHARED", 0)
        rep = Report(f"{name}:{fn}", target.name, target.arch, {"compiler": "nvrtc"}, ok=not (error or missing),
                     inputs="int64", shared_bytes=shared, shared_limit=target.max_shared,
                     registers=use.get("REG", -1), spill_stores=use.get("LOCAL", -1), spill_loads=use.get("LOCAL", -1),
                     ptxas_s=seconds, compile_s=seconds, error=error or missing, cases=["crf lattice hash build"])
        rep.ok = rep.ok and shared <= target.max_shared
        reports.append(asdict(rep))
    return reports


def cuda_source_reports(targets) -> list[dict]:
    from .lattice_hash import CUDA_SOURCE, KERNEL_NAMES
    return [r for t in targets for r in compile_cuda_source(CUDA_SOURCE, "lattice_hash.cu", KERNEL_NAMES, t)]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(reports: list[dict]) -> str:
    import triton
    lines = [f"Ahead-of-time compile of every kernel specialisation the launchers use (`python -m kernels.aot`; "
             f"triton {triton.__version__}, torch {torch.__version__}, commit {_git_commit()}, "
             f"{time.strftime('%Y-%m-%d')}, compiled on a CPU-only machine with Triton's ptxas). "
             "shared = bytes of shared memory per block (limit of the target); ptxas s was measured when the "
             "specialisation was first compiled (cached since); cases = the training shapes that launch it.", "",
             "| kernel | target | inputs | constexprs | ok | regs | spill st/ld (B) | shared (limit) | ptxas s | cases |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(reports, key=lambda r: (r["kernel"], r["arch"], r.get("inputs", ""),
                                            json.dumps(r["constexprs"], default=str))):
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        ok = "yes" if r["ok"] else f"**no**: {r['error'][:120]}"
        lines.append(f"| {r['kernel']} | {r['target']} | {r.get('inputs', '')} | {consts} | {ok} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} ({r['shared_limit']}) | "
                     f"{r['ptxas_s']:.1f} | {len(r['cases'])} |")
    return "\n".join(lines) + "\n"


def compile_all(archs=(80, 90), workers: int = 2, use_cache: bool = True, timeout: float = 3000.0) -> list[dict]:
    """Run `python -m kernels.aot` in a subprocess (safe under the interpreter) -> reports.
    `archs`: compute capabilities x10 and/or 'local'."""
    with tempfile.TemporaryDirectory(prefix="hsc-aot-") as tmp:
        out = Path(tmp) / "aot.json"
        env = dict(os.environ, TRITON_INTERPRET="0")
        cmd = [sys.executable, "-m", "kernels.aot", "--arch", ",".join(map(str, archs)), "--json", str(out),
               "--workers", str(workers)] + ([] if use_cache else ["--no-cache"])
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if not out.is_file():
            raise RuntimeError(f"kernels.aot exited {proc.returncode} without a report:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def resolve_targets(text: str) -> list[Target]:
    """'80,90' -> the A100 / H100 targets; 'local' -> the GPU of this machine (its SM count and
    shared-memory limit)."""
    targets = []
    for item in (a.strip() for a in text.split(",") if a.strip()):
        if item == "local":
            if not torch.cuda.is_available():
                raise ValueError("'local' needs a CUDA device")
            from ._common import cuda_target
            targets.append(cuda_target(torch.device("cuda", torch.cuda.current_device())))
            continue
        known = {str(t.arch): t for t in AOT_TARGETS}
        if item not in known:
            raise ValueError(f"unknown target {item!r}: known are {', '.join(known)} and 'local'")
        targets.append(known[item])
    return targets


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="targets, comma-separated: 80 (A100), 90 (H100/H200) or "
                                                   "'local' (this machine's GPU); default 80,90")
    p.add_argument("--json", default="", help="write the reports as JSON to this file")
    p.add_argument("--markdown", default="", help="write the reports as a markdown table to this file")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="compiler processes (default: min(4, cores))")
    p.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: ${CACHE_ENV} or "
                                                           "~/.cache/hsc-fast/aot)")
    args = p.parse_args(argv)
    if INTERPRET:
        print("kernels.aot: TRITON_INTERPRET is on; run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    try:
        targets = resolve_targets(args.arch)
    except ValueError as e:
        print(f"kernels.aot: --arch {args.arch}: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    specs = collect_specs(targets)
    reports = compile_specs(specs, workers=args.workers, use_cache=not args.no_cache)
    reports += cuda_source_reports(targets)
    table = markdown(reports)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    failed = [r for r in reports if not r["ok"]]
    print(f"{len(reports)} specialisations, {len(failed)} failed, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
