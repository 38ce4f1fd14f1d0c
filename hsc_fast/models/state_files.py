"""Reading a .pth state dict of tensors (weights_only), for every model loader."""
from __future__ import annotations

from pathlib import Path

import torch

from hsc_fast.errors import WeightsError


def _unwrap_torch_checkpoint(obj, path: str) -> dict:
    """A plain state dict, or one nested under 'state_dict' / 'model' / 'module'."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file '{path}': expected a state dict of tensors "
                           f"(optionally under 'state_dict' or 'model'), got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_torch_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(f"weights file '{path}': cannot load it with torch.load(weights_only=True): {e}") from e
    return _unwrap_torch_checkpoint(obj, str(path))
