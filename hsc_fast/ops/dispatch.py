"""What every op shares: the impl choice, the lazy kernel import with self-check and fallback, shape checks.

``dispatch(op, "module.function", impl, tensor, dim, reference, probe, case)`` returns the function
that serves one call: ``kernels.<module>.<function>`` when Triton is chosen (see hsc_fast.ops) and has
passed its self-check (hsc_fast.ops.check) for this (dtype, dim, device, case), else ``reference``.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F

from hsc_fast.errors import ConfigError, HscError

IMPLS = ("auto", "triton", "torch")


class LossInputError(HscError, ValueError):
    """A loss or primitive got tensors of the wrong shape (the message names the argument)."""


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return True


def _interpreted_cpu_allowed(tensor: torch.Tensor) -> bool:
    return (tensor.device.type == "cpu" and os.environ.get("HSC_AUTO_TRITON_CPU", "") == "1"
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


def use_triton(impl: str, tensor: torch.Tensor) -> bool:
    """Decide the implementation before any self-check: see the module docstring."""
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    if impl == "auto":
        return (tensor.is_cuda or _interpreted_cpu_allowed(tensor)) and triton_available()
    raise ConfigError(f"loss.impl: {impl!r} is not one of {', '.join(IMPLS)}")


def import_kernel(kernel: str):
    module, function = kernel.rsplit(".", 1)
    return getattr(importlib.import_module(f"kernels.{module}"), function)


def dispatch(op: str, kernel: str, impl: str, tensor: torch.Tensor, dim: int, reference, probe, case: str = ""):
    """The function serving this call: `kernels.<module>.<function>` (kernel = "module.function")
    when Triton is chosen and passes its self-check, else `reference`. Imported lazily: CPU-only
    users never import triton. Under "auto" a kernel that raises on a real call is recorded as
    failed and the call is served by the reference. `case`: the kernel variant this call takes
    (checked on its own, with `probe` of that shape; see hsc_fast.ops.check)."""
    from hsc_fast.ops import check as kernel_check

    if not use_triton(impl, tensor):
        return reference
    try:
        fn = import_kernel(kernel)
    except Exception as e:  # noqa: BLE001 - a broken triton install must not stop "auto"
        kernel_check.fail(op, tensor, dim, e, impl, case)
        return reference
    if not kernel_check.enabled(tensor):
        return fn
    if not kernel_check.usable(op, impl, tensor, dim, probe, fn, reference, case):
        return reference
    if impl == "triton":
        return fn

    def guarded(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded and warned about in kernel_check
            kernel_check.fail(op, tensor, dim, e, impl, case)
            return reference(*args)
    return guarded


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float64 stays (gradcheck), everything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||_2, eps) along `dim` (F.normalize, named for readability)."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def check_dims(op: str, **named):
    for name, (t, ndim) in named.items():
        if t.dim() != ndim:
            raise LossInputError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
