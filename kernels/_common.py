"""Small helpers shared by the Triton kernels in this package.

Triton decides at *definition* time whether kernels run in its CPU interpreter
(TRITON_INTERPRET=1), so `INTERPRET` is read once at import, exactly like Triton does.
"""
from __future__ import annotations

import os

import torch

from hsc_fast.errors import HscError

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Widths the kernels accept for their float inputs (they always accumulate in float32).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if device.type != "cuda" and not INTERPRET:
        raise HscError(f"{op}: the Triton kernel needs CUDA tensors (got {device}); on CPU run it "
                       "under TRITON_INTERPRET=1 or use impl='torch'")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise HscError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def lowp_dot(dtype: torch.dtype) -> bool:
    """Use 16-bit tensor-core dots for 16-bit inputs on a GPU. Never in the interpreter, whose
    bf16 tl.dot returns garbage (it then computes the same math in float32)."""
    return dtype in (torch.bfloat16, torch.float16) and not INTERPRET


def row_major(t: torch.Tensor) -> torch.Tensor:
    """`t` with a unit stride on its last dimension (a no-op for the usual contiguous inputs);
    the kernels take the other strides as arguments."""
    return t if t.stride(-1) == 1 else t.contiguous()
