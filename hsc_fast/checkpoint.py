"""Training checkpoints: atomic, complete-marked, keep-last-K, loaded with weights_only=True.

Layout (one folder per saved step, inside the run dir):

    RUN_DIR/checkpoints/step_00001000/
        state.pt      rank 0: model state_dict, optimizer (unless partitioned), schedule,
                      prototype banks, step counters, non-finite/skip counters, config dict
        rank{r}.pt    every rank: RNG states (python, numpy, torch, cuda), data position
                      (epoch, batches consumed), and its optimizer partition when ZeRO >= 1 or
                      bf16 master weights make the optimizer state rank-specific
        meta.json     step, world size, file list (human-readable)
        COMPLETE      written LAST by rank 0, after every rank has finished its files

We write our own files instead of DeepSpeed's `save_checkpoint` so that loading never unpickles
arbitrary objects: every file is read with `torch.load(..., weights_only=True)` and holds only
tensors, numbers, strings, lists, tuples and dicts (DeepSpeed's optimizer wrappers keep a few
small non-tensor values; `to_safe` turns them into plain ones). Each file goes to a temporary
name and is renamed into place (atomic on POSIX), so a crash never leaves a half-written file
under its final name, and a folder without COMPLETE is never resumed from. `--resume auto`
picks the newest complete folder. Multi-node runs need the run dir on a shared filesystem.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from hsc_fast import io
from hsc_fast.errors import WeightsError

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
SHARED_FILE = "state.pt"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir(run_dir, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:08d}"


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"rank{rank}.pt"


# ----------------------------------------------------------------------------------------------
# Atomic writes and safe loads
# ----------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path) -> None:
    """torch.save to a temporary sibling, then rename into place."""
    io.atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


def atomic_write_text(path, text: str) -> None:
    io.atomic_write_text(path, text, fsync=True)


def safe_load(path, map_location="cpu") -> Any:
    """torch.load with weights_only=True; a missing/corrupt/unsafe file raises WeightsError."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, disallowed globals
        raise WeightsError(f"checkpoint file '{path}' could not be loaded with weights_only=True: "
                           f"{type(e).__name__}: {e}") from e


def to_safe(obj: Any) -> Any:
    """Recursively turn a state structure into types `weights_only=True` accepts.

    Enums become their value, sets/namedtuples become lists/tuples, dataclasses become dicts,
    numpy scalars/arrays become Python numbers/tensors; other objects raise (we never want to
    silently drop state).
    """
    if isinstance(obj, enum.Enum):  # before int: IntEnum-like classes (ZeroStageEnum) are ints too
        return to_safe(obj.value)
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):
        return {to_safe(k): to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [to_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # e.g. DeepSpeed's fragment_address in ZeRO's param_slice_mappings (informational only)
        return {f.name: to_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} safely ({obj!r:.80})")


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Python, numpy, torch (and CUDA) generator states as weights_only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------
def is_complete(ckpt_dir) -> bool:
    return (Path(ckpt_dir) / COMPLETE_MARKER).is_file()


def step_of(ckpt_dir) -> int:
    m = _STEP_RE.match(Path(ckpt_dir).name)
    if not m:
        raise WeightsError(f"'{ckpt_dir}' is not a checkpoint folder (expected step_NNNNNNNN)")
    return int(m.group(1))


def list_checkpoints(run_dir, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=step_of)


def find_latest(run_dir) -> Optional[Path]:
    """The newest COMPLETE checkpoint of a run, or None."""
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_resume(resume: str, run_dir) -> Optional[Path]:
    """`--resume` value -> checkpoint folder (or None for a fresh start).

    "" / "none": fresh. "auto": newest complete checkpoint of RUN_DIR, or fresh if there is none.
    A path: a checkpoint folder (must be complete) or a run dir (its newest complete checkpoint).
    """
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return find_latest(run_dir)
    p = Path(resume)
    if p.is_dir() and _STEP_RE.match(p.name):
        if not is_complete(p):
            raise WeightsError(f"--resume {p}: checkpoint is incomplete (no {COMPLETE_MARKER} marker)")
        return p
    if p.is_dir():
        latest = find_latest(p)
        if latest is None:
            raise WeightsError(f"--resume {p}: no complete checkpoint under {checkpoint_root(p)}")
        return latest
    raise WeightsError(f"--resume {resume}: expected 'auto', a run dir or a checkpoint folder")


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------
def save_checkpoint(run_dir, step: int, rank: int, world_size: int, per_rank: dict,
                    shared: Optional[dict], keep_last: int,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Collective: every rank writes its file, rank 0 the shared file, then COMPLETE, then prunes.

    `shared` must be given on rank 0 (ignored elsewhere). Returns the checkpoint folder.
    """
    d = step_dir(run_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        if shared is None:
            raise ValueError("save_checkpoint: rank 0 must pass the shared state")
        # A crash may have left this folder complete from an earlier attempt: un-mark first.
        (d / COMPLETE_MARKER).unlink(missing_ok=True)
    barrier()
    atomic_torch_save(to_safe(per_rank), rank_file(d, rank))
    if rank == 0:
        atomic_torch_save(to_safe(shared), d / SHARED_FILE)
    barrier()  # every rank's file is in place
    if rank == 0:
        files = [SHARED_FILE] + [rank_file(d, r).name for r in range(world_size)]
        missing = [f for f in files if not (d / f).is_file()]
        if missing:  # e.g. nodes without a shared filesystem
            raise WeightsError(f"checkpoint {d}: files {missing} not visible on rank 0 "
                               "(multi-node runs need the run dir on a shared filesystem)")
        atomic_write_text(d / "meta.json", json.dumps(
            {"step": step, "world_size": world_size, "files": files}, indent=1))
        atomic_write_text(d / COMPLETE_MARKER, f"{step}\n")
        prune(run_dir, keep_last)
    barrier()
    return d


def prune(run_dir, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete folders older
    than the newest complete one (left by crashes). Returns what was deleted."""
    done = list_checkpoints(run_dir)
    if not done:
        return []
    doomed = done[:-keep_last] if keep_last > 0 else []
    newest = step_of(done[-1])
    doomed += [p for p in list_checkpoints(run_dir, complete_only=False)
               if not is_complete(p) and step_of(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def load_shared(ckpt_dir) -> dict:
    return safe_load(Path(ckpt_dir) / SHARED_FILE)


def load_rank(ckpt_dir, rank: int, world_size: int) -> dict:
    """This rank's file; the world size must match the one the checkpoint was written with."""
    meta_path = Path(ckpt_dir) / "meta.json"
    if meta_path.is_file():
        saved_world = json.loads(meta_path.read_text()).get("world_size")
        if saved_world is not None and saved_world != world_size:
            raise WeightsError(
                f"checkpoint {ckpt_dir} was written by {saved_world} ranks, this run has {world_size}: "
                "resume with the same number of ranks (RNG streams, data positions and ZeRO optimizer "
                "partitions are per rank), or start a new run from its state.pt 'model' weights")
    return safe_load(rank_file(ckpt_dir, rank))


def save_final_model(run_dir, state_dict: dict) -> Path:
    """RUN_DIR/final/model.pt: a plain fp32 state_dict (loadable with weights_only=True)."""
    out = Path(run_dir) / "final"
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
             for k, v in state_dict.items()}
    atomic_torch_save(plain, out / "model.pt")
    return out / "model.pt"
