"""Float32 loss math whatever the caller's autocast state.

The engine runs the network under bf16 autocast on CUDA (`train.bf16_autocast`). The losses must
not follow it: in bf16 a cosine of nearly collinear features rounds to 1.0, SimMinLoss' clamp
0.9995 rounds to 1.0 as well, and RSC becomes -log(0) = inf (measured: 1.677 in float32, inf under
autocast); CSC and PSC move by 2e-4 and 3e-3 relative. `fp32_losses` makes a loss function run
with autocast off on every device and its 16-bit tensor arguments upcast to float32, so it returns
exactly what it returns in a float32 program (tests/test_precision.py asserts equality).
"""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_AUTOCAST_DEVICES = ("cpu", "cuda")


@contextmanager
def no_autocast() -> Iterator[None]:
    """Disable autocast on every device where it is on (and only there: no warnings on CPU-only
    builds, no cost when nothing is on)."""
    with ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def to_fp32(value: Any) -> Any:
    """16-bit float tensors -> float32 (differentiably); dicts, lists and tuples one level deep."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW_PRECISION else value
    if isinstance(value, dict):
        return {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype in _LOW_PRECISION else v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(to_fp32(v) if isinstance(v, torch.Tensor) else v for v in value)
    return value


def fp32_losses(fn: Callable) -> Callable:
    """Decorator: `fn` computes in float32 with autocast off; see the module docstring."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast():
            return fn(*(to_fp32(a) for a in args), **{k: to_fp32(v) for k, v in kwargs.items()})
    wrapper.fp32_losses = True
    return wrapper
