"""The run directory: what a training run records about itself.

    RUN_DIR/config.yaml      the fully resolved config (preset + overrides), re-loadable
    RUN_DIR/classes.json     the run's class set (hsc_fast.classes: names, background, ignore label)
    RUN_DIR/env.json         versions, git sha, world size, devices, launch mode, command line
    RUN_DIR/metrics.csv      one row per optimiser step (rank 0): step, epoch, lr, loss, every
                             loss term, images/s, skipped samples, non-finite count
    RUN_DIR/tb/              TensorBoard events (rank 0)
    RUN_DIR/logs/rank{r}.log one log file per rank
    RUN_DIR/images/          CAM pictures every `train.image_every` steps (rank 0)

Rank 0 also shows a tqdm bar with the loss terms and images/s.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hsc_fast import io
from hsc_fast.classes import CLASSES_FILE
from hsc_fast.classes import save as save_classes
from hsc_fast.config import RunConfig, run_class_set, save_config

FIXED_COLUMNS = ["step", "epoch", "lr", "loss"]
TAIL_COLUMNS = ["images_per_s", "skipped_samples", "nonfinite_steps", "nonfinite_in_a_row", "time_s"]


def git_sha(repo: Optional[Path] = None) -> str:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        sha = out.stdout.strip() if out.returncode == 0 else ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:
        return "not installed"


def environment_info(world_size: int, device: torch.device, launched_by: str) -> dict:
    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "hsc_fast": _version("hsc_fast"), "git_sha": git_sha(), "python": sys.version.split()[0],
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": _version("deepspeed"),
        "triton": _version("triton"), "numpy": np.__version__, "platform": platform.platform(),
        "hostname": socket.gethostname(), "world_size": world_size, "device": str(device),
        "cuda_devices": devices, "launched_by": launched_by, "argv": sys.argv,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    io.write_json(path, data, indent=1, default=str, mkdir=False)


def setup_rank_logger(run_dir: Path, rank: int, verbose: bool = True) -> logging.Logger:
    """logs/rank{r}.log for every rank (+ stderr on rank 0). Idempotent within a process."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("hsc_fast")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):  # a previous run in the same process (tests)
        if getattr(h, "_hsc_runlog", False):
            logger.removeHandler(h)
            h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(logs / f"rank{rank}.log")
    fh.setFormatter(fmt)
    fh._hsc_runlog = True
    logger.addHandler(fh)
    if rank == 0 and verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh.setLevel(logging.WARNING)  # the tqdm bar carries the routine progress
        sh._hsc_runlog = True
        logger.addHandler(sh)
    logger.propagate = False
    return logger


class MetricsCSV:
    """metrics.csv writer. Columns are fixed by the first row (loss terms of the method);
    a later row with new terms is an error (the header would lie), missing ones stay empty."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.columns: Optional[list[str]] = None
        if self.path.is_file() and resume_step > 0:
            self._truncate_after(resume_step)
        elif self.path.is_file():
            self.path.unlink()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint (they will be recomputed)."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        self.columns = rows[0]
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def write(self, row: dict) -> None:
        if self.columns is None:
            terms = sorted(k for k in row if k not in FIXED_COLUMNS and k not in TAIL_COLUMNS)
            self.columns = FIXED_COLUMNS + terms + TAIL_COLUMNS
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        extra = set(row) - set(self.columns)
        if extra:
            raise ValueError(f"metrics.csv: new columns {sorted(extra)} after the header was written")
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in self.columns])


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)  # full precision: rows are compared bitwise in resume tests
    return str(v)


def read_metrics(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLog:
    """Everything a run writes besides checkpoints. Non-zero ranks only get their log file."""

    def __init__(self, run_dir, rank: int, world_size: int, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.is_main = rank == 0
        self.logger = setup_rank_logger(self.run_dir, rank)
        self.metrics: Optional[MetricsCSV] = None
        self.tb = None
        self.bar = None
        if not self.is_main:
            return
        self.metrics = MetricsCSV(self.run_dir / "metrics.csv", resume_step=start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, disable=None)

    def write_config(self, cfg: RunConfig) -> None:
        """config.yaml and the run's class set as classes.json (what make_seeds, evaluate and the
        later stages look for beside a run; `cfg.data.classes` is resolved by then)."""
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            save_classes(self.run_dir / CLASSES_FILE, run_class_set(cfg))

    def write_env(self, info: dict) -> None:
        if self.is_main:
            _write_json_atomic(self.run_dir / "env.json", info)

    def update_env(self, extra: dict) -> None:
        """Merge `extra` into env.json (rank 0; written atomically)."""
        if not self.is_main:
            return
        path = self.run_dir / "env.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.update(extra)
        _write_json_atomic(path, info)

    def info(self, msg: str, *args) -> None:
        self.logger.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        self.logger.warning(msg, *args)

    def error(self, msg: str, *args) -> None:
        self.logger.error(msg, *args)

    def step(self, row: dict) -> None:
        """Record one optimiser step (rank 0): CSV row, TensorBoard scalars, progress bar."""
        if not self.is_main:
            return
        self.metrics.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.bar is not None:
            self.bar.update(1)
            terms = {k: f"{v:.3g}" for k, v in row.items()
                     if k not in FIXED_COLUMNS and k not in TAIL_COLUMNS and isinstance(v, float)}
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", img_s=f"{row.get('images_per_s', 0):.1f}",
                                 **terms, refresh=False)

    def image(self, tag: str, step: int, picture_hwc_uint8: np.ndarray) -> Path:
        """Save a picture to images/ and TensorBoard (rank 0)."""
        from PIL import Image
        out = self.run_dir / "images"
        out.mkdir(exist_ok=True)
        path = out / f"{tag}_step{step:08d}.png"
        Image.fromarray(picture_hwc_uint8).save(path)
        if self.tb is not None:
            self.tb.add_image(f"cam/{tag}", picture_hwc_uint8, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        for h in list(self.logger.handlers):
            if getattr(h, "_hsc_runlog", False):
                h.flush()
