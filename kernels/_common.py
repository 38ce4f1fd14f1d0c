"""Small helpers shared by the Triton kernels in this package: the launch target, one launch
function that every launcher goes through, and input checks.

Triton decides at *definition* time whether kernels run in its CPU interpreter
(TRITON_INTERPRET=1), so `INTERPRET` is read once at import, exactly like Triton does.

Targets. A launcher picks block sizes and warps from a `Target` (compute capability, SM count,
shared-memory limit), never from the device directly, so that `kernels.aot` can ask it which
specialisations it would launch on an A100 or an H100 without owning one: under
`recording(target)` every `launch()` is recorded instead of run, and the launchers accept
meta tensors (shapes and dtypes only).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from hsc_fast.errors import HscError

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Widths the kernels accept for their float inputs (they always accumulate in float32).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What a launcher may depend on. `arch` is the compute capability x 10 (80: A100,
    90: H100/H200), 0 in the interpreter; `max_shared` is the opt-in shared memory per block."""
    name: str
    arch: int
    sms: int
    max_shared: int

    @property
    def interpreter(self) -> bool:
        return self.arch == 0


INTERPRETER = Target("interpreter", 0, 1, 1 << 30)
# CUDA occupancy tables: sm_80 allows 163 KB (166,912 B) of opt-in shared memory per block,
# sm_90 227 KB (232,448 B). SM counts of the SXM parts (A100 108, H100/H200 132).
SM80 = Target("sm_80", 80, 108, 166912)
SM90 = Target("sm_90", 90, 132, 232448)
AOT_TARGETS = (SM80, SM90)


def cuda_target(device: torch.device) -> Target:
    props = torch.cuda.get_device_properties(device)
    shared = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return Target(f"sm_{props.major}{props.minor}", props.major * 10 + props.minor,
                  int(props.multi_processor_count), shared)


def target_of(device: torch.device) -> Target:
    """The target a launch on `device` compiles for (the recorded one under `recording`)."""
    rec = _recorder()
    if rec is not None:
        return rec.target
    if INTERPRET:
        return INTERPRETER
    return cuda_target(device)


# ------------------------------------------------------------------------------------------
# Launching and recording
# ------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch as a launcher asked for it: the @triton.jit function, its grid, its
    positional arguments (tensors, ints, floats) and its constexprs / launch options."""
    kernel: Any
    grid: tuple
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


@dataclass
class _Recorder:
    target: Target
    launches: list = field(default_factory=list)


_STATE = threading.local()


def _recorder() -> Optional[_Recorder]:
    return getattr(_STATE, "recorder", None)


def is_recording() -> bool:
    return _recorder() is not None


@contextmanager
def recording(target: Target) -> Iterator[list]:
    """Record the launches made inside (nothing runs) as if on `target`: yields the list."""
    if _recorder() is not None:
        raise HscError("kernels: recording() does not nest")
    _STATE.recorder = _Recorder(target)
    try:
        yield _STATE.recorder.launches
    finally:
        _STATE.recorder = None


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """`kernel[grid](*args, **meta)`, except that an empty grid launches nothing (CUDA refuses a
    zero-size grid) and that under `recording` the launch is only recorded."""
    rec = _recorder()
    if rec is not None:
        rec.launches.append(Launch(kernel, tuple(grid), args, dict(meta)))
        return
    if any(int(g) == 0 for g in grid):
        return
    kernel[tuple(grid)](*args, **meta)


# ------------------------------------------------------------------------------------------
# Checks and small helpers
# ------------------------------------------------------------------------------------------
def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (Triton block sizes must be powers of two)."""
    n = max(int(n), int(minimum))
    return 1 << (n - 1).bit_length()


def check_runnable(op: str, *tensors: torch.Tensor) -> None:
    """Fail clearly where Triton would fail obscurely: CPU tensors without the interpreter,
    tensors on different devices, or float widths the kernels were not written for."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise HscError(f"{op}: all inputs must be on one device, got {device} and {t.device}")
    if is_recording():
        return  # meta tensors: only shapes and dtypes matter
    if device.type != "cuda" and not INTERPRET:
        raise HscError(f"{op}: the Triton kernel needs CUDA tensors (got {device}); on CPU run it "
                       "under TRITON_INTERPRET=1 or use impl='torch'")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise HscError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def lowp_dot(dtype: torch.dtype) -> bool:
    """16-bit dots (tensor cores on a GPU) for 16-bit inputs. In the interpreter, whose bf16
    casts truncate and whose bf16 tl.dot returns garbage, `emulate_bf16` replaces them."""
    return dtype in (torch.bfloat16, torch.float16)


def emulate_bf16(dtype: torch.dtype, target: Target) -> bool:
    """Interpreter only: bf16 operands are rounded to nearest-even on their float32 bits and
    multiplied with float32 dots -- the same products a tensor core forms (8-bit x 8-bit
    mantissas are exact in float32), so the 16-bit branch of a kernel is tested on a CPU."""
    return target.interpreter and dtype == torch.bfloat16


def row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` with a unit stride on its last dimension (a no-op for the usual contiguous inputs);
    the kernels take the other strides as arguments."""
    return t if t.stride(-1) == 1 else t.contiguous()


def deterministic() -> bool:
    """torch.use_deterministic_algorithms(True) is on: kernels with float atomics take their
    deterministic path."""
    return torch.are_deterministic_algorithms_enabled()
