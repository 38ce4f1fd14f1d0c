"""Helpers of the reliability tests: tiny synthetic data, tiny configs, multi-process launches.

Trainings run as real processes (`launch/train_cam.py`) so that a rank can be SIGKILLed; a
2-rank run is two processes started with the launcher variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) that `deepspeed`/`torchrun` would export. `run_python_with_faults` starts the
training in a process whose checkpoint writer is booby-trapped (see `TRAP_SOURCE`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train_cam.py"

# Tiny but complete: HSC-SEAM (every loss term, banks, the in-training CRF) on a ResNet-18 at 32 px.
# Self-contained (no `base:` preset), so that edits to the shipped presets cannot change it mid-session.
TINY = {
    "preset": "reliability",
    "data": {"batch_size": 2, "workers": 0, "shuffle_buffer": 4, "resize_long": [32, 48], "crop_size": 32,
             "view2_size": 32},
    "model": {"backbone": "resnet18", "weights": "", "allow_random_init": True, "frozen_bn": False,
              "freeze_stem": False, "rsc_dim": 16, "psc_dim": 8},
    "loss": {"method": "hsc_seam", "contrast_size": 4, "csc_topk": 8, "csc_update_topk": 4, "psc_topk": 4,
             "crf": {"iters": 2}},
    "optim": {"lr": 0.01, "official_momentum_quirk": False, "momentum": 0.9, "poly_steps": 100},
    "train": {"max_steps": 6, "save_every": 2, "keep_last": 5, "deterministic": True, "tensorboard": False,
              "image_every": 0, "dist_timeout_s": 20, "log_every": 1},
}


_CACHE: dict = {}


def cached(key: str, make):
    """One value per test session (e.g. the shards and the uninterrupted reference run shared by
    test_faults and test_two_hosts): a 2-rank run costs ~30 s on 2 CPU cores."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def reference_run(tmp_path_factory, config: Path) -> dict:
    """Final weights of an uninterrupted 2-rank run of `config` (once per session and config)."""
    def make():
        run = tmp_path_factory.mktemp("reference") / "run"
        codes = run_ranks(config, run, 2)
        assert codes == [0, 0], output_of(run, 0)[-3000:] + output_of(run, 1)[-3000:]
        return final_weights(run)
    return cached(f"reference:{config}", make)


def make_shards(root: Path, n_train: int = 16, shard_size: int = 4, size: int = 64, saliency: bool = False) -> Path:
    """Synthetic VOC/SBD tree -> shards; returns the shard folder (holding index.json)."""
    from hsc_fast.data.shard import shard_dataset
    from hsc_fast.data.synth import generate
    root = Path(root)
    generate(root, n_train, 0, seed=1, size=size)
    extra = {"saliency_root": root / "SaliencyMaps"} if saliency else {}
    shard_dataset(root / "VOC2012", root / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt",
                  root / "shards", sbd_root=root / "SBD", cls_labels=root / "cls_labels.npy",
                  shard_size=shard_size, progress=False, **extra)
    return root / "shards"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, data: str, **sections) -> Path:
    """TINY + `data.train=data` + per-section overrides, as a YAML file."""
    cfg = _merge(TINY, {"data": {"train": str(data)}})
    cfg = _merge(cfg, sections)
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


def clean_env(**extra) -> dict:
    """The environment of a training process: no launcher variables inherited from the test."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith(("TORCHELASTIC", "HSC_FAULT"))}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_cmd(config: Path, run_dir: Path, *args: str, entry: Optional[list] = None) -> list:
    """`python launch/train_cam.py ...` (or `entry + ...`, e.g. the trapped entry point)."""
    return (entry or [sys.executable, str(TRAIN)]) + ["--config", str(config), "--run-dir", str(run_dir),
                                                      "--no-progress", *args]


def launch_ranks(config: Path, run_dir: Path, world: int, args: Sequence[str] = (), env_extra: Optional[dict] = None,
                 rank_env: Optional[dict] = None, entry: Optional[list] = None) -> list:
    """Start `world` ranks on this host; stdout+stderr of rank r go to RUN_DIR.r.out."""
    from hsc_fast.distributed import free_port
    port = free_port()
    procs = []
    for r in range(world):
        env = clean_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        **(env_extra or {}), **((rank_env or {}).get(r, {})))
        out = open(f"{run_dir}.{r}.out", "ab")
        procs.append(subprocess.Popen(train_cmd(config, run_dir, *args, entry=entry), env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        out.close()
    return procs


def output_of(run_dir: Path, rank: int) -> str:
    p = Path(f"{run_dir}.{rank}.out")
    return p.read_text(errors="replace") if p.is_file() else ""


def wait_all(procs: list, timeout: float) -> list:
    """Exit codes; processes still alive after `timeout` seconds are killed and reported as None."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    kill_all(procs)
    return codes


def kill_all(procs: list) -> None:
    """SIGKILL the process groups we started (tests never leave trainings behind)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_ranks(config: Path, run_dir: Path, world: int, args: Sequence[str] = (), timeout: float = 180,
              **kw) -> list:
    procs = launch_ranks(config, run_dir, world, args, **kw)
    try:
        return wait_all(procs, timeout)
    finally:
        kill_all(procs)


def metrics_steps(run_dir: Path) -> int:
    """Optimiser steps recorded in metrics.csv so far (rank 0 writes one row per step)."""
    p = Path(run_dir) / "metrics.csv"
    if not p.is_file():
        return 0
    return max(0, len(p.read_text().strip().splitlines()) - 1)


def wait_for_step(run_dir: Path, step: int, procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while metrics_steps(run_dir) < step:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"training did not reach step {step} (at {metrics_steps(run_dir)}); "
                                 f"exit codes {[p.poll() for p in procs]}:\n{output_of(run_dir, 0)[-3000:]}")
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "final" / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"


# A process whose checkpoint writer dies (SIGKILL, no clean-up) in the middle of one file.
# HSC_TRAP_STEP: the step whose checkpoint is hit; HSC_TRAP_FILE: the file name (state.pt,
# rank0.pt, COMPLETE, meta.json); HSC_TRAP_RANK: the rank that dies (default 0).
TRAP_SOURCE = r"""
import os, signal, sys
from pathlib import Path
import torch
import hsc_fast.checkpoint as C

step, name = int(os.environ["HSC_TRAP_STEP"]), os.environ["HSC_TRAP_FILE"]
rank = os.environ.get("HSC_TRAP_RANK", "0")
armed = os.environ.get("RANK", "0") == rank

def hit(path):
    path = Path(path)
    return armed and path.parent.name == f"step_{step:08d}" and path.name == name

def die_half_written(path, data):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

real_save, real_text = C.atomic_torch_save, C.atomic_write_text

def trapped_save(obj, path):
    if hit(path):
        import io
        buf = io.BytesIO()
        torch.save(obj, buf)
        die_half_written(Path(path), buf.getvalue())
    return real_save(obj, path)

def trapped_text(path, text):
    if hit(path):
        die_half_written(Path(path), text.encode())
    return real_text(path, text)

C.atomic_torch_save, C.atomic_write_text = trapped_save, trapped_text
from hsc_fast.cli.train_cam import main
sys.exit(main(sys.argv[1:]))
"""


def trap_entry() -> list:
    """The booby-trapped entry point, in place of `python launch/train_cam.py`."""
    return [sys.executable, "-c", TRAP_SOURCE]


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def single_rank_group(timeout_s: int = 60):
    """A one-rank process group for in-process tests (a pytest fixture body: ``yield from``): the
    launcher variables are set aside while it lives and restored after it."""
    from hsc_fast import distributed as D
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    info = D.init_distributed(timeout_s)
    yield info
    D.shutdown(info)
    for k in LAUNCHER_ENV:
        os.environ.pop(k, None)
    os.environ.update(saved)


def read_shard_members(out) -> dict:
    """{key: {member: bytes}} over every shard of the shard folder ``out`` (read with tarfile)."""
    import json
    import tarfile
    found = {}
    for entry in json.loads((Path(out) / "index.json").read_text())["shards"]:
        with tarfile.open(Path(out) / entry["file"]) as tf:
            for info in tf:
                key, _, ext = info.name.partition(".")
                found.setdefault(key, {})[ext] = tf.extractfile(info).read()
    return found
