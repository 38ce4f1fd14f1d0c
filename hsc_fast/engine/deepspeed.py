"""The DeepSpeed JSON: engine settings only; the keys our config owns are refused."""
from __future__ import annotations

from pathlib import Path
from typing import Optional
import json

from hsc_fast.config import RunConfig
from hsc_fast.errors import ConfigError


DEFAULT_DS_CONFIG = {
    "zero_optimization": {"stage": 0},
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,
    "bf16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10 ** 9,
    "wall_clock_breakdown": False,
}


# Keys our own config owns: a DeepSpeed JSON holding them would silently disagree with it.
_DS_FORBIDDEN = {
    "train_batch_size": "data.batch_size (per rank) x gradient_accumulation_steps x ranks",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "optimizer": "optim.* (our SGD is passed to deepspeed.initialize)",
    "scheduler": "optim.poly_power / optim.poly_steps",
}


def load_ds_json(path: str) -> dict:
    if not path:
        return json.loads(json.dumps(DEFAULT_DS_CONFIG))
    p = Path(path)
    if not p.is_file():
        from hsc_fast.config import REPO_ROOT
        if (REPO_ROOT / path).is_file():
            p = REPO_ROOT / path
        else:
            raise ConfigError(f"DeepSpeed config '{path}' not found (configs/ds_zero0.json, ds_zero1.json, "
                              "ds_zero2.json, ds_bf16.json ship with hsc-fast)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config '{p}': not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config '{p}': expected a JSON object")
    return data


def build_ds_config(cfg: RunConfig, world_size: int, path: Optional[str] = None) -> dict:
    """Engine settings from the JSON + the batch sizes from our config (set here, not in the JSON)."""
    source = path if path is not None else cfg.train.ds_config
    ds = load_ds_json(source)
    for key, owner in _DS_FORBIDDEN.items():
        if key in ds:
            raise ConfigError(f"DeepSpeed config '{source}': remove '{key}'; hsc-fast sets it from {owner}")
    gas = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or isinstance(gas, bool) or gas < 1:
        raise ConfigError(f"DeepSpeed config '{source}': gradient_accumulation_steps must be an integer >= 1, got {gas!r}")
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"DeepSpeed config '{source}': fp16 is not supported (use bf16: configs/ds_bf16.json)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config '{source}': zero_optimization.stage must be 0, 1 or 2, got {stage!r}")
    ds["gradient_accumulation_steps"] = gas
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["train_batch_size"] = cfg.data.batch_size * gas * world_size
    ds.setdefault("zero_allow_untested_optimizer", True)  # SGD under ZeRO
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def optimizer_is_partitioned(ds_cfg: dict) -> bool:
    """ZeRO >= 1 and bf16 master weights make the optimizer state rank-specific."""
    return ds_cfg.get("zero_optimization", {}).get("stage", 0) > 0 or ds_cfg.get("bf16", {}).get("enabled", False)
