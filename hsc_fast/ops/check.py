"""Self-check of the fused Triton kernels on the machine that runs them, with a safe fallback.

A kernel that compiles and passes the test suite on one GPU / driver / Triton can still fail on
another (a compiler assertion, a miscompile, a shared-memory limit). So the first time an op meets
a new (dtype, feature dim, arch, case) key on CUDA, `usable()` runs the kernel and its torch reference
once on a small slice (`Probe`: the op's own awkward inputs, forward and backward) and compares
them at the CUDA test tolerances (`TOLERANCES`, relative to the tensor's scale: `scaled_error`).
`case` names a shape property that selects another kernel variant (psc_terms: "C=21" runs all 63
logit columns in one block, "C=81" the chunked columns of MS COCO), so each variant a run uses is
checked on its own, with a probe of that shape.

* `loss.impl: auto`: a compile error, a runtime error or a mismatch warns once (naming the op,
  the error and the versions), the op uses its reference for that key from then on, and the
  result is kept for the run's env.json and log (`report()`; the trainer records it).
* `loss.impl: triton`: the same check, but a failure raises `KernelCheckError`.

The check runs where kernels really run (CUDA), or anywhere when HSC_KERNEL_SELFCHECK=1 (CPU tests
under TRITON_INTERPRET=1). It draws its inputs from a private generator: the training RNG streams
(and so bitwise resume) are untouched. Each rank checks for itself (a fallback on one rank only
changes that rank's loss by float32 round-off; it is logged in that rank's log).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from hsc_fast.errors import HscError
from hsc_fast.precision import no_autocast

log = logging.getLogger("hsc_fast.kernels")

# Elementwise |kernel - reference| <= tol * (|reference| + max|reference|), per input dtype: the
# tolerances of the CUDA tests (tests/kernels/test_kernels.py imports them). The kernels accumulate in
# float32 whatever the input; 16-bit inputs use hi/lo-split 16-bit dots and return 16-bit gradients.
TOLERANCES = {
    "fwd": {torch.float32: 1e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4},
    "grad": {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2},
}


class KernelCheckError(HscError):
    """A Triton kernel failed its self-check and `loss.impl: triton` forbids the fallback."""


@dataclass
class Probe:
    """Small awkward inputs for one op: `make(dtype, dim, device, generator)` returns
    (differentiable inputs, call) where call(fn, *inputs) runs one implementation."""
    make: Callable


@dataclass
class CheckResult:
    op: str
    dtype: str
    dim: int
    arch: str
    ok: bool
    fwd_error: float = float("nan")
    grad_error: float = float("nan")
    error: str = ""
    seconds: float = 0.0
    versions: str = ""
    case: str = ""          # e.g. "C=81": the kernel variant's shape (empty: one variant)

    def key(self) -> tuple:
        return _key(self.op, self.dtype, self.dim, self.arch, self.case)

    def variant(self) -> str:
        """'float32, dim 128' (+ ', C=81' where the op has shape variants)."""
        return f"{self.dtype}, dim {self.dim}" + (f", {self.case}" if self.case else "")

    def describe(self) -> str:
        what = "ok" if self.ok else f"FAILED ({self.error})"
        return (f"{self.op} [{self.variant()}, {self.arch}]: {what}; fwd error {self.fwd_error:.2e}, "
                f"grad error {self.grad_error:.2e} ({self.seconds:.2f} s; {self.versions})")


def _key(op: str, dtype: str, dim: int, arch: str, case: str) -> tuple:
    """The verdict key: one check per (op, dtype, feature dim, arch, kernel variant)."""
    return (op, dtype, int(dim), arch, case)


_RESULTS: dict[tuple, CheckResult] = {}
_LOCK = threading.Lock()


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / (|e| + max|e|): the error relative to the tensor's scale that the kernel
    tests bound (entries that are round-off-sized next to the largest need no exact match)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-30)
    return float(((actual - expected).abs() / (expected.abs() + scale)).max())


def arch_of(device: torch.device) -> str:
    """'sm_90 (NVIDIA H100 80GB HBM3)' for a CUDA device; the check key's arch part."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return _arch_name(device.type, index)


@functools.lru_cache(maxsize=None)
def _arch_name(device_type: str, index: int) -> str:
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return f"sm_{major}{minor} ({torch.cuda.get_device_name(index)})"
    return f"{device_type} (Triton interpreter)"


def versions() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not raised
        triton_version = "not importable"
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}"


def enabled(tensor: torch.Tensor) -> bool:
    """Self-checks run on CUDA, and on any device when HSC_KERNEL_SELFCHECK=1."""
    return tensor.is_cuda or os.environ.get("HSC_KERNEL_SELFCHECK", "") == "1"


def compare(probe: Probe, kernel: Callable, reference: Callable, dtype: torch.dtype, dim: int,
            device: torch.device) -> tuple[float, float]:
    """(forward error, gradient error) of kernel vs reference on the probe's inputs."""
    generator = torch.Generator().manual_seed(1234)
    inputs, call = probe.make(dtype, dim, device, generator)
    outs = []
    with torch.enable_grad(), no_autocast():
        for fn in (kernel, reference):
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            out = call(fn, *leaves)
            weight = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).reshape(out.shape)
            grads = torch.autograd.grad(out, leaves, weight)
            outs.append((out.detach(), [g.detach() for g in grads]))
    (out_k, grads_k), (out_r, grads_r) = outs
    grad_error = max((scaled_error(a, b) for a, b in zip(grads_k, grads_r)), default=0.0)
    return scaled_error(out_k, out_r), grad_error


def run_check(op: str, probe: Probe, kernel: Callable, reference: Callable, dtype: torch.dtype, dim: int,
              device: torch.device, case: str = "") -> CheckResult:
    """Compile, run and compare once; never raises (the verdict is in the result). `probe`
    must be the one for `case`."""
    result = CheckResult(op, str(dtype).replace("torch.", ""), int(dim), arch_of(device), ok=False,
                         versions=versions(), case=case)
    start = time.perf_counter()
    try:
        result.fwd_error, result.grad_error = compare(probe, kernel, reference, dtype, dim, device)
        fwd_tol, grad_tol = TOLERANCES["fwd"][dtype], TOLERANCES["grad"][dtype]
        result.ok = result.fwd_error <= fwd_tol and result.grad_error <= grad_tol
        if not result.ok:
            result.error = (f"mismatch: forward error {result.fwd_error:.3g} (tolerance {fwd_tol:g}), "
                            f"gradient error {result.grad_error:.3g} (tolerance {grad_tol:g})")
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel here
        result.error = f"{type(e).__name__}: {_first_lines(str(e))}"
        log.debug("self-check of %s raised:\n%s", op, traceback.format_exc())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    return result


LATTICE_HASH_TOL = 1e-5  # the hash and sort builds number vertices differently: round-off only


def run_lattice_hash_check(device: torch.device, compare_builds: Callable[[torch.device], float]) -> CheckResult:
    """The CRF lattice's CuPy hash build against its sort build (`compare_builds` returns the
    relative max difference of one filter on a small random lattice); never raises."""
    result = CheckResult("lattice_hash", "int64", 0, arch_of(device), ok=False, versions=_cupy_versions())
    start = time.perf_counter()
    try:
        result.fwd_error = compare_builds(device)
        result.grad_error = 0.0
        result.ok = result.fwd_error <= LATTICE_HASH_TOL
        if not result.ok:
            result.error = f"mismatch: hash vs sort build differ by {result.fwd_error:.3g} (tolerance {LATTICE_HASH_TOL:g})"
    except Exception as e:  # noqa: BLE001 - e.g. NVRTC of another CUDA major: use the sort build
        result.error = f"{type(e).__name__}: {_first_lines(str(e))}"
    result.seconds = time.perf_counter() - start
    return result


def _cupy_versions() -> str:
    try:
        import cupy
        cupy_version = f"cupy {cupy.__version__} (CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()})"
    except Exception:  # noqa: BLE001 - reported, not raised
        cupy_version = "cupy not importable"
    return f"{versions()}, {cupy_version}"


def _first_lines(text: str, lines: int = 3, chars: int = 400) -> str:
    short = " | ".join(line.strip() for line in text.strip().splitlines()[:lines] if line.strip())
    return short[:chars]


def record(result: CheckResult) -> None:
    """Keep a verdict; a failure is warned about once (Python warning + the hsc_fast log)."""
    key = result.key()
    with _LOCK:
        known = key in _RESULTS
        _RESULTS[key] = result
    if not result.ok and not known:
        fallback = "the sort build" if result.op == "lattice_hash" else "the torch reference"
        kind = "CuPy kernel" if result.op == "lattice_hash" else "Triton kernel"
        message = (f"hsc_fast: {kind} '{result.op}' failed its self-check for {result.variant()} "
                   f"on {result.arch}: {result.error} ({result.versions}); using {fallback} for it")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
    elif result.ok and not known:
        log.info("kernel self-check: %s", result.describe())


def lookup(op: str, tensor: torch.Tensor, dim: int, case: str = "") -> Optional[CheckResult]:
    return _RESULTS.get(_key(op, str(tensor.dtype).replace("torch.", ""), dim, arch_of(tensor.device), case))


def usable(op: str, impl: str, tensor: torch.Tensor, dim: int, probe: Probe, kernel: Callable,
           reference: Callable, case: str = "") -> bool:
    """May `kernel` serve this call? Checks once per (op, dtype, dim, arch, case); see module docstring."""
    result = lookup(op, tensor, dim, case)
    if result is None:
        result = run_check(op, probe, kernel, reference, tensor.dtype, dim, tensor.device, case)
        record(result)
    if not result.ok and impl == "triton":
        raise KernelCheckError(f"loss.impl=triton: kernel '{op}' failed its self-check for {result.variant()} "
                               f"on {result.arch}: {result.error} ({result.versions}); "
                               "use loss.impl=auto (falls back to the torch reference) or loss.impl=torch")
    return result.ok


def fail(op: str, tensor: torch.Tensor, dim: int, error: BaseException, impl: str, case: str = "") -> None:
    """A kernel that passed its check raised on a real call: record the fallback (auto) or re-raise."""
    if impl == "triton":
        raise error
    record(CheckResult(op, str(tensor.dtype).replace("torch.", ""), int(dim), arch_of(tensor.device), ok=False,
                       error=f"{type(error).__name__} on a training call: {_first_lines(str(error))}",
                       versions=versions(), case=case))


def report() -> list[dict]:
    """Every verdict so far (for env.json and bug reports), oldest first."""
    with _LOCK:
        return [asdict(r) for r in _RESULTS.values()]


def fallbacks() -> list[CheckResult]:
    with _LOCK:
        return [r for r in _RESULTS.values() if not r.ok]


def reset() -> None:
    """Forget every verdict (tests)."""
    with _LOCK:
        _RESULTS.clear()


def summarize(results: Sequence[dict]) -> str:
    ok = sum(1 for r in results if r["ok"])
    return f"{ok}/{len(results)} kernel self-checks passed"
