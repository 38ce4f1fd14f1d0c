"""The CAM training loop (HSC and its baselines) on top of a DeepSpeed engine.

One optimiser step = `gradient_accumulation_steps` micro-steps (from the DeepSpeed JSON). Each
micro-step: a batch of view-1 crops from `hsc_fast.data.build_train_loader`; view 2 made on the
device (`make_view2`); both views through the same network; the method losses
(`hsc_fast.losses.method_losses`, which runs the in-training CRF through `crf_fn` and combines
batch-wide statistics across ranks through a `DistContext`) -> `engine.backward`. Prototype banks
(`PrototypeBanks`) are chained through the micro-steps and committed only if the whole step was
finite; they stay identical on every rank because their updates use global statistics only.

Faults:
  * non-finite loss on any rank (agreed by one all-reduce): the step is skipped on every rank --
    DeepSpeed still runs `engine.step()` (counters, zero_grad, schedule) but the optimizer's
    `skip_next` makes it a no-op and the banks are not updated. `train.max_nonfinite` skipped
    steps in a row -> checkpoint + `TrainingError`. Test hook: HSC_FAULT_NAN_STEPS="3,4" makes
    the loss of those steps NaN (1-based step numbers as in metrics.csv; HSC_FAULT_NAN_RANK=r
    restricts it to one rank).
  * a dead rank: a failed collective or the heartbeat monitor (`distributed.Heartbeat`) ends
    every survivor within `train.dist_timeout_s` naming the lost rank (`RankLostError`).
  * bad samples: skipped by the loader, counted (its SkipCounter) in metrics.csv, never fatal.

Resume: `--resume auto|PATH` restores model, optimizer (incl. momentum), schedule, banks, RNG of
every rank and the data position; with `train.deterministic` on CPU the continued run is bitwise
equal to an uninterrupted one.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from hsc_fast import checkpoint as ckpt
from hsc_fast import distributed as D
from hsc_fast.config import OptimConfig, RunConfig, to_dict
from hsc_fast.errors import ConfigError, TrainingError, WeightsError
from hsc_fast.engine.optim import PolySchedule, build_optimizer
from hsc_fast.engine.runlog import RunLog, environment_info

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


class RankLostError(TrainingError):
    """A peer rank died or stopped answering; this rank cannot continue."""


# ----------------------------------------------------------------------------------------------
# Configuration checks and the DeepSpeed JSON
# ----------------------------------------------------------------------------------------------
def feature_size(pixels: int) -> int:
    """Feature-map side of an output-stride-8 network."""
    return math.ceil(pixels / 8)


def check_geometry(cfg: RunConfig) -> None:
    """Cross-field checks of the contrast maps (before any work): view 2 at 1/8 must match the
    contrast size, and the batch-wide top-k sizes must fit in the pixels of one batch."""
    loss, data = cfg.loss, cfg.data
    if data.view2_size > data.crop_size:
        raise ConfigError(f"config key 'data.view2_size': {data.view2_size} exceeds data.crop_size {data.crop_size}")
    side2 = feature_size(data.view2_size)
    if loss.contrast_size < 0:
        raise ConfigError("config key 'loss.contrast_size': must be >= 0")
    if loss.contrast_size and loss.contrast_size != side2:
        raise ConfigError(
            f"config key 'loss.contrast_size': {loss.contrast_size} must equal view 2's feature size "
            f"data.view2_size/8 = {side2} (official: 128 px -> 16), or 0 for feature resolution")
    side = loss.contrast_size or side2
    pixels = data.batch_size * side * side
    uses_hsc = loss.method.startswith("hsc")
    per_image = loss.formulation == "paper"  # eq. 6: the top-k_c pixels of each image; no update top-k
    image_side = loss.contrast_size or feature_size(data.crop_size)   # 0: view 1's feature resolution
    if uses_hsc and loss.use_csc and per_image and loss.csc_topk > image_side ** 2:
        raise ConfigError(f"config key 'loss.csc_topk': {loss.csc_topk} exceeds the {image_side}x{image_side} contrast "
                          "pixels of one image (loss.formulation paper takes the top-k_c pixels per image, eq. 6)")
    if uses_hsc and loss.use_csc and loss.csc_topk > pixels:
        raise ConfigError(f"config key 'loss.csc_topk': {loss.csc_topk} exceeds the {pixels} contrast pixels "
                          f"of a batch (data.batch_size {data.batch_size} x {side}x{side})")
    if uses_hsc and loss.use_csc and not per_image and loss.csc_update_topk > loss.csc_topk:
        raise ConfigError(f"config key 'loss.csc_update_topk': {loss.csc_update_topk} exceeds loss.csc_topk {loss.csc_topk}")
    if uses_hsc and loss.use_psc and loss.psc_topk > pixels:
        raise ConfigError(f"config key 'loss.psc_topk': {loss.psc_topk} exceeds the {pixels} contrast pixels of a batch")
    if cfg.train.save_every <= 0 or cfg.train.keep_last <= 0 or cfg.train.max_nonfinite <= 0:
        raise ConfigError("config keys 'train.save_every', 'train.keep_last', 'train.max_nonfinite': must be positive")
    if cfg.train.dist_timeout_s <= 0:
        raise ConfigError("config key 'train.dist_timeout_s': must be positive")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def check_inputs(cfg: RunConfig) -> None:
    """Every file the config names exists: checked before any process group, model or log is made,
    so a typo costs seconds, not a queue wait plus a model build."""
    from hsc_fast.data import is_shard_source
    source = cfg.data.train
    if not source:
        raise ConfigError("config key 'data.train' is empty: give a shard index.json / brace URL or a VOC root folder")
    if is_shard_source(source) and not _is_remote(source):
        if source.endswith(".json"):
            found = Path(source).is_file()
        elif Path(source).is_dir():
            found = True  # is_shard_source saw its index.json
        else:
            import webdataset as wds
            found = any(Path(u).is_file() for u in wds.shardlists.expand_urls(source))
        if not found:
            raise ConfigError(f"config key 'data.train': '{source}' does not exist (expected a shard index.json, "
                              "a folder holding one, or a brace URL of existing .tar shards)")
    elif not is_shard_source(source):
        if not Path(source).is_dir():
            raise ConfigError(f"config key 'data.train': '{source}' does not exist (expected a shard index.json, "
                              "a folder holding one, a brace URL of .tar shards or a VOC root folder)")
        for key in ("train_list", "sbd_root", "cls_labels", "saliency_root"):  # used by folder sources only
            value = getattr(cfg.data, key)
            if value and not Path(value).exists():
                raise ConfigError(f"config key 'data.{key}': '{value}' does not exist")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"config key 'model.weights': file '{cfg.model.weights}' does not exist")


def check_resume_world_size(resume_from: Optional[Path], world_size: int) -> None:
    """RNG streams, data positions and ZeRO partitions are per rank: resume with the same world size."""
    if resume_from is None:
        return
    meta = Path(resume_from) / "meta.json"
    saved = json.loads(meta.read_text()).get("world_size") if meta.is_file() else None
    if saved is not None and saved != world_size:
        raise ConfigError(f"--resume {resume_from}: written with world size {saved}, this run has world size "
                          f"{world_size}; resume with {saved} ranks (or start a new run from its state.pt weights)")


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


def autocast_device(cfg: RunConfig, device: torch.device) -> Optional[str]:
    """Device type whose bf16 autocast wraps the forward pass (train.bf16_autocast on CUDA,
    train.cpu_bf16_autocast on CPU), or None for fp32."""
    if device.type == "cuda" and cfg.train.bf16_autocast:
        return "cuda"
    if device.type == "cpu" and cfg.train.cpu_bf16_autocast:
        return "cpu"
    return None


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def nan_fault_steps(rank: int) -> set[int]:
    """HSC_FAULT_NAN_STEPS="3,4" (+ optional HSC_FAULT_NAN_RANK) -> steps whose loss becomes NaN."""
    text = os.environ.get("HSC_FAULT_NAN_STEPS", "").strip()
    only_rank = os.environ.get("HSC_FAULT_NAN_RANK", "").strip()
    if not text or (only_rank and int(only_rank) != rank):
        return set()
    return {int(s) for s in text.replace(" ", "").split(",") if s}


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0                   # optimiser steps done
    epoch: int = 0                  # data epoch of the next batch
    batches_in_epoch: int = 0       # batches of that epoch already consumed by this rank
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    skipped_samples: int = 0        # bad samples skipped by the loader (all ranks, cumulative)


@dataclass
class StepResult:
    terms: dict                     # loss terms (mean over micro-steps, this rank)
    nonfinite: bool                 # the step was skipped on every rank
    nonfinite_terms: list = field(default_factory=list)
    images: int = 0
    lr: float = 0.0                 # learning rate of the first group used by this step


class EpochStream:
    """Endless batches with a resumable position (epoch, batches of it consumed): a subclass's
    `_start_epoch(skip_batches)` sets `_it` to the rest of epoch `self.epoch` and
    `batches_in_epoch`; when an epoch runs out the next one starts."""
    empty_message = "the training loader yields no batches"

    def next(self) -> dict:
        for _ in range(2):
            try:
                batch = next(self._it)
                self.batches_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch += 1
                self._start_epoch()
        raise TrainingError(self.empty_message)


class DataStream(EpochStream):
    """Endless batches from a `TrainLoader` with a resumable position (epoch, batches consumed).

    Each epoch is one pass of the loader after `set_epoch(epoch, skip_batches)`; the loader
    re-creates an epoch's stream exactly from (seed, epoch, rank), so resuming mid-epoch skips
    the consumed batches without decoding them.
    """

    empty_message = "the training loader yields no batches (empty dataset or every sample skipped)"

    def __init__(self, loader, epoch: int = 0, batches_in_epoch: int = 0):
        self.loader = loader
        self.epoch = epoch
        self._start_epoch(batches_in_epoch)

    def _start_epoch(self, skip_batches: int = 0) -> None:
        self.loader.set_epoch(self.epoch, skip_batches)
        self._it: Iterator = iter(self.loader)
        self.batches_in_epoch = skip_batches

    def skipped(self) -> int:
        """Corrupt samples the loader skipped so far on this rank."""
        counter = getattr(self.loader, "skip_counter", None)
        return int(counter.count) if counter is not None else 0


# ----------------------------------------------------------------------------------------------
# What the CAM and DeepLab trainers share
# ----------------------------------------------------------------------------------------------
class StepLoop:
    """The DeepSpeed trainer skeleton shared by CAM training (`Trainer`) and DeepLab
    (`deeplab_train.DeeplabTrainer`): engine construction, the resumable step loop with its
    checkpoint cadence and non-finite limit, checkpoints (incl. ZeRO / bf16 optimizer partitions)
    and turning a dead peer's failed collective into RankLostError.

    A subclass calls `_setup` and `_wrap_engine`, sets `state` (step, epoch, batches_in_epoch,
    nonfinite_total, nonfinite_in_a_row) and implements `make_stream` (an object with next(),
    epoch, batches_in_epoch), `train_step`, `_record`, `_nonfinite_message` and `_finish`;
    `_checkpoint_extra` / `_restore_extra` add its own entries to the shared checkpoint file.
    """

    def _setup(self, cfg: RunConfig, run_dir, info: D.DistInfo, ds_config: dict, log: Optional[RunLog]) -> None:
        self.cfg, self.info, self.log = cfg, info, log
        self.run_dir = Path(run_dir)
        self.device = info.device
        self.ds_config = ds_config
        self.gas = int(ds_config["gradient_accumulation_steps"])
        set_determinism(cfg.train.deterministic)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank

    def _wrap_engine(self, model: torch.nn.Module, optim_cfg: OptimConfig) -> None:
        """SGD + poly schedule (ours, not DeepSpeed's) inside a DeepSpeed engine."""
        import deepspeed
        self.optimizer = build_optimizer(model, optim_cfg)
        self.schedule = PolySchedule(self.optimizer, optim_cfg.poly_power, optim_cfg.poly_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                    lr_scheduler=self.schedule, config=self.ds_config,
                                                    dist_init_required=False)
        self.engine_bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))

    def _seed_rank_streams(self) -> None:
        """Rank-specific RNG streams from here on (dropout, CRF and data may draw)."""
        seed_everything(self.cfg.train.seed + 1000 * self.info.rank + 1)

    def _log_info(self, msg: str, *args) -> None:
        if self.log is not None:
            self.log.info(msg, *args)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    # -- subclass hooks ------------------------------------------------------------------------------
    def make_stream(self):
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict]):
        raise NotImplementedError

    def _record(self, result, stream, seconds: float, heartbeat) -> None:
        """Update the non-finite counters of `state` from `result`; log the step."""
        raise NotImplementedError

    def _nonfinite_message(self, result, path: Path) -> str:
        raise NotImplementedError

    def _finish(self) -> dict:
        """After the last checkpoint: the final model; returns the summary."""
        raise NotImplementedError

    def _checkpoint_extra(self) -> dict:
        return {}

    def _restore_extra(self, shared: dict, ckpt_dir: Path) -> None:
        pass

    def _record_kernel_checks(self) -> None:
        """New kernel self-check verdicts (hsc_fast.ops.check: first use of a kernel at a new
        dtype / feature dim / arch) go into env.json ("kernel_checks"); fallbacks are logged."""
        from hsc_fast.ops import check as kernel_check
        reports = kernel_check.report()
        if len(reports) == getattr(self, "_kernel_reports_seen", 0) or self.log is None:
            return
        for r in reports[getattr(self, "_kernel_reports_seen", 0):]:
            if not r["ok"]:
                self.log.warning("kernel %s (%s, dim %d, %s) falls back to its reference: %s", r["op"], r["dtype"],
                                 r["dim"], r["arch"], r["error"])
        self._kernel_reports_seen = len(reports)
        self.log.update_env({"kernel_checks": reports})

    def _count_nonfinite(self, nonfinite: bool, what: str) -> None:
        """Counters (and a warning) of a step that every rank skipped, or a finite one."""
        st = self.state
        if not nonfinite:
            st.nonfinite_in_a_row = 0
            return
        st.nonfinite_total += 1
        st.nonfinite_in_a_row += 1
        if self.log is not None:
            self.log.warning("step %d: non-finite %s; step skipped (%d in a row)", st.step, what, st.nonfinite_in_a_row)

    def _log_step(self, row: dict, images: float, skipped_samples: int, seconds: float) -> None:
        """metrics.csv row (+ the periodic log line) of the step just done; `row` starts with
        step, epoch, lr, loss (and loss terms); `images` over all ranks."""
        st = self.state
        row = {**row, "images_per_s": images / max(seconds, 1e-9), "skipped_samples": skipped_samples,
               "nonfinite_steps": st.nonfinite_total, "nonfinite_in_a_row": st.nonfinite_in_a_row,
               "time_s": seconds}
        self.log.step(row)
        if st.step % max(self.cfg.train.log_every, 1) == 0:
            self.log.info("step %d loss %.6g lr %.3g %.1f img/s", st.step, row["loss"], row["lr"], row["images_per_s"])

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, max_steps: int, save_every: int, resume_from: Optional[Path] = None,
            heartbeat: Optional[D.Heartbeat] = None) -> dict:
        rng_state = None
        if resume_from is not None:
            rng_state = self.load(resume_from)["rng"]
            self._log_info("resumed from %s at step %d", resume_from, self.state.step)
        stream = self.make_stream()
        if rng_state is not None:
            ckpt.restore_rng(rng_state)  # after the data fast-forward, which may draw numbers
        last_save = self.state.step if resume_from is not None else -1
        while self.state.step < max_steps:
            t0 = time.perf_counter()
            micro = [stream.next() for _ in range(self.gas)]
            result = self._guarded(lambda: self.train_step(micro), heartbeat)
            self.state.step += 1
            self.state.epoch, self.state.batches_in_epoch = stream.epoch, stream.batches_in_epoch
            self._record(result, stream, time.perf_counter() - t0, heartbeat)
            self._record_kernel_checks()
            # nonfinite_in_a_row > 0 only right after a skipped step (max_nonfinite is positive)
            if self.state.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
                path = self._guarded(self.save, heartbeat)
                raise TrainingError(self._nonfinite_message(result, path))
            if self.state.step % save_every == 0 or self.state.step == max_steps:
                self._guarded(self.save, heartbeat)
                last_save = self.state.step
        if last_save != self.state.step:
            self._guarded(self.save, heartbeat)
        return self._finish()

    def _guarded(self, fn: Callable, heartbeat: Optional[D.Heartbeat]):
        """Run a collective-bearing call; a failure caused by a dead peer becomes RankLostError."""
        try:
            return fn()
        except TrainingError:
            raise
        except Exception as e:
            lost = heartbeat.lost_ranks() if heartbeat is not None and self.info.world_size > 1 else []
            if not lost:
                raise
            raise RankLostError(f"rank {', '.join(map(str, lost))} lost (collective failed on rank "
                                f"{self.info.rank}: {type(e).__name__}: {str(e)[:200]})") from e

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        partitioned = optimizer_is_partitioned(self.ds_config)
        per_rank = {"rng": ckpt.capture_rng(), "data": {"epoch": self.state.epoch,
                                                        "batches_in_epoch": self.state.batches_in_epoch}}
        if partitioned:
            per_rank["optimizer"] = self._partitioned_optimizer_state()
        shared = None
        if self.info.is_main:
            shared = {"model": self.module.state_dict(), "schedule": self.schedule.state_dict(),
                      "state": asdict(self.state), "config": to_dict(self.cfg), "world_size": self.info.world_size,
                      "optimizer_partitioned": partitioned, **self._checkpoint_extra()}
            if not partitioned:
                shared["optimizer"] = self.optimizer.state_dict()
        return ckpt.save_checkpoint(self.run_dir, self.state.step, self.info.rank, self.info.world_size,
                                    per_rank, shared, self.cfg.train.keep_last, barrier=D.barrier)

    def load(self, ckpt_dir: Path) -> dict:
        """Restore model, optimizer, schedule, counters, data position; returns this rank's file
        (its RNG states are applied by the caller once the data stream exists)."""
        shared = ckpt.load_shared(ckpt_dir)
        mine = ckpt.load_rank(ckpt_dir, self.info.rank, self.info.world_size)
        self._restore_extra(shared, ckpt_dir)
        self.module.load_state_dict(shared["model"])
        if shared.get("optimizer_partitioned"):
            if "optimizer" not in mine:
                raise WeightsError(f"checkpoint {ckpt_dir}: rank{self.info.rank}.pt has no optimizer partition")
            self._load_partitioned_optimizer_state(mine["optimizer"])
        else:
            self.optimizer.load_state_dict(shared["optimizer"])
        self.schedule.load_state_dict(shared["schedule"])
        self.state = type(self.state)(**shared["state"])
        self.state.epoch = int(mine["data"]["epoch"])
        self.state.batches_in_epoch = int(mine["data"]["batches_in_epoch"])
        return mine

    def _partitioned_optimizer_state(self) -> dict:
        """The ZeRO / bf16 wrapper's state for this rank, minus its LossScaler object (a static
        scale of 1 without fp16, which we refuse): a plain marker keeps the file weights_only-safe."""
        state = dict(self.engine.optimizer.state_dict())
        if "loss_scaler" in state:
            state["loss_scaler"] = "static"
        return state

    def _load_partitioned_optimizer_state(self, state: dict) -> None:
        """ZeRO-1/2 and bf16 wrappers take a list indexed by data-parallel rank; restoring the fp32
        master partition from the file (not from the bf16 weights) keeps the resume exact."""
        wrapper = self.engine.optimizer
        state = dict(state)
        if "loss_scaler" in state:  # stored as a marker: see _partitioned_optimizer_state
            state["loss_scaler"] = getattr(wrapper, "loss_scaler", None)
        if "load_from_fp32_weights" not in inspect.signature(wrapper.load_state_dict).parameters:
            wrapper.load_state_dict(state)  # e.g. FP16_UnfusedOptimizer (bf16, ZeRO 0): one dict
            return
        per_rank = [None] * self.info.world_size
        per_rank[self.info.rank] = state
        wrapper.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)

    def save_final(self) -> Optional[Path]:
        if self.info.is_main:
            return ckpt.save_final_model(self.run_dir, self.module.state_dict())
        return None


# ----------------------------------------------------------------------------------------------
# The CAM trainer
# ----------------------------------------------------------------------------------------------
class Trainer(StepLoop):
    """Builds model, optimizer, schedule, DeepSpeed engine and banks; runs and checkpoints steps."""

    def __init__(self, cfg: RunConfig, run_dir, info: D.DistInfo, ds_config: Optional[dict] = None,
                 log: Optional[RunLog] = None):
        from hsc_fast.models import build_cam_model
        from hsc_fast.losses.prototypes import DistContext, PrototypeBanks

        check_geometry(cfg)
        self._setup(cfg, run_dir, info, ds_config if ds_config is not None else build_ds_config(cfg, info.world_size),
                    log)
        model = build_cam_model(cfg.model)
        if cfg.model.weights:
            report = model.load_pretrained(cfg.model.weights)
            self._log_info("pretrained weights: %s", getattr(report, "summary", lambda: report)())
        elif not cfg.model.allow_random_init:
            raise ConfigError("config key 'model.weights' is empty: give ImageNet weights or set "
                              "model.allow_random_init=true to train from random init")
        model.train()  # CamNet.train keeps frozen BatchNorms in eval mode
        model.to(self.device)
        self.channels_last = bool(cfg.model.channels_last and self.device.type == "cuda")
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._wrap_engine(model, cfg.optim)
        if cfg.train.compile:
            self.engine.compile()
        self.banks = PrototypeBanks(seed=cfg.train.seed, rsc_dim=cfg.model.rsc_dim,
                                    psc_dim=cfg.model.psc_dim).to(self.device)
        self.dist_ctx = DistContext() if info.world_size > 1 else None
        self.state = TrainState()
        self.nan_steps = nan_fault_steps(info.rank)
        self.autocast_device = autocast_device(cfg, self.device)
        self._kernel_reports_seen = 0  # kernel self-check verdicts already written to env.json
        self._last_visual: Optional[tuple] = None
        self._skipped_before = 0  # loader skips already recorded (this rank)
        self._seed_rank_streams()

    # -- helpers ---------------------------------------------------------------------------------
    def build_loader(self):
        from hsc_fast.data import build_train_loader
        return build_train_loader(self.cfg.data, self.info.rank, self.info.world_size, self.cfg.train.seed,
                                  self.device)

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            out[k] = v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        if self.engine_bf16:  # DeepSpeed bf16 keeps bf16 weights: feed bf16 images
            out["img"] = out["img"].to(torch.bfloat16)
        if self.channels_last:
            out["img"] = out["img"].contiguous(memory_format=torch.channels_last)
        return out

    # -- one optimiser step ------------------------------------------------------------------------
    def forward_losses(self, batch: dict, banks: dict) -> tuple[dict, dict, dict]:
        """Both views through the network and the method losses -> (terms, new banks, view-1 out)."""
        from hsc_fast.data import make_view2
        from hsc_fast.losses import method_losses
        img1 = batch["img"]
        batch = dict(batch, img2=make_view2(img1, self.cfg.data.view2_size))
        # The network runs in bf16 under autocast; method_losses switches it off (hsc_fast.precision).
        amp = torch.autocast(self.autocast_device, dtype=torch.bfloat16) if self.autocast_device else nullcontext()
        with amp:
            out1 = self.engine(img1)
            out2 = self.engine(batch["img2"])
            # The in-training CRF runs inside (loss.train_crf, loss.train_crf_backend: hsc_fast.crf.train).
            terms, new_banks = method_losses(out1, out2, batch, banks, self.cfg.loss, dist_ctx=self.dist_ctx,
                                             img_mean=tuple(self.cfg.data.mean), img_std=tuple(self.cfg.data.std))
        return terms, new_banks, out1

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimiser step over `gas` micro-batches (collective: every rank calls it)."""
        if len(micro_batches) != self.gas:
            raise ValueError(f"train_step: expected {self.gas} micro-batches, got {len(micro_batches)}")
        step_no = self.state.step + 1
        lr = float(self.optimizer.param_groups[0]["lr"])
        pending = {k: v.clone() for k, v in self.banks.as_dict().items()}
        # Trainable BatchNorms update running stats in forward: undo them if the step is skipped.
        saved_buffers = None if self.cfg.model.frozen_bn else [b.detach().clone() for b in self.module.buffers()]
        sums: dict[str, float] = {}
        nonfinite, bad_terms, images = False, [], 0
        for i, raw in enumerate(micro_batches):
            batch = self._to_device(raw)
            terms, new_banks, out1 = self.forward_losses(batch, pending)
            loss = terms["total"]
            if step_no in self.nan_steps:
                loss = loss * float("nan")
            local_bad = not bool(torch.isfinite(loss.detach()).all())
            if local_bad:
                bad_terms += [k for k, v in terms.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())] or ["total"]
            any_bad = D.all_reduce_max_flag(local_bad, self.device)
            self.engine.backward(loss)
            if any_bad:
                nonfinite = True
            else:
                pending = new_banks
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).detach().float())
            sums["total"] = sums.get("total", 0.0) - float(terms["total"].detach().float()) + float(loss.detach().float())
            images += int(batch["img"].shape[0])
            if i == self.gas - 1:
                self.optimizer.skip_next = nonfinite
                if self._wants_picture(step_no):
                    self._last_visual = (batch["img"][0].detach(), out1["cam"][0].detach().float(),
                                         batch["label"][0].detach())
            self.engine.step()
        if not nonfinite:
            self.banks.update_(pending)
        elif saved_buffers is not None:
            with torch.no_grad():
                for b, old in zip(self.module.buffers(), saved_buffers):
                    b.copy_(old)
        return StepResult(terms={k: v / self.gas for k, v in sums.items()}, nonfinite=nonfinite,
                          nonfinite_terms=sorted(set(bad_terms)), images=images, lr=lr)

    def _wants_picture(self, step_no: int) -> bool:
        every = self.cfg.train.image_every
        return bool(every) and self.info.is_main and step_no % every == 0

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint_extra(self) -> dict:
        return {"banks": self.banks.state_dict()}

    def _restore_extra(self, shared: dict, ckpt_dir: Path) -> None:
        self.banks.load_state_dict(shared["banks"])

    # -- pictures -----------------------------------------------------------------------------------
    def write_picture(self, step_no: int) -> Optional[Path]:
        if self._last_visual is None or self.log is None:
            return None
        from hsc_fast.data import denormalize
        from hsc_fast.eval.visualize import overlay_cam
        img, cam, label = self._last_visual
        self._last_visual = None
        image = denormalize(img[None].float().cpu(), self.cfg.data.mean, self.cfg.data.std)[0]
        image = image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else np.asarray(image)
        fg = torch.relu(cam[:-1].cpu()) * label.cpu().float()[:, None, None]
        heat = fg.max(dim=0).values
        heat = heat / (heat.max() + 1e-5)
        heat = torch.nn.functional.interpolate(heat[None, None], size=image.shape[:2], mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        return self.log.image("cam", step_no, overlay_cam(image, heat))

    # -- the loop (StepLoop.fit) ---------------------------------------------------------------------
    def make_stream(self) -> DataStream:
        self._skipped_before = 0
        return DataStream(self.build_loader(), self.state.epoch, self.state.batches_in_epoch)

    def _nonfinite_message(self, result: StepResult, path: Path) -> str:
        st = self.state
        return (f"loss was non-finite for {st.nonfinite_in_a_row} optimiser steps in a row "
                f"(steps {st.step - st.nonfinite_in_a_row + 1}..{st.step}; "
                f"non-finite terms on this rank: {', '.join(result.nonfinite_terms) or 'none (another rank)'}); "
                f"train.max_nonfinite={self.cfg.train.max_nonfinite}. Parameters and banks are those of "
                f"the last finite step, saved in {path}")

    def _finish(self) -> dict:
        final = self.save_final()
        return {"step": self.state.step, "nonfinite_total": self.state.nonfinite_total,
                "skipped_samples": self.state.skipped_samples, "final_model": str(final) if final else None}

    def _record(self, result: StepResult, stream: DataStream, seconds: float, heartbeat) -> None:
        skipped_now = stream.skipped()
        skipped, self._skipped_before = skipped_now - self._skipped_before, skipped_now
        st = self.state
        self._count_nonfinite(result.nonfinite, f"loss (terms: {', '.join(result.nonfinite_terms) or 'on another rank'})")
        local = dict(result.terms)
        local["_skipped"] = float(skipped) * self.info.world_size  # mean x world = sum over ranks
        local["_images"] = float(result.images) * self.info.world_size
        glob = self._guarded(lambda: D.all_reduce_mean(local, self.device), heartbeat)
        st.skipped_samples += int(round(glob.pop("_skipped")))
        images = glob.pop("_images")
        if skipped and self.log is not None:
            self.log.warning("step %d: %d bad sample(s) skipped by the loader on this rank", st.step, skipped)
        if self.log is None:
            return
        row = {"step": st.step, "epoch": st.epoch, "lr": result.lr, "loss": glob.pop("total"), **glob}
        self._log_step(row, images, st.skipped_samples, seconds)
        self.write_picture(st.step)


# ----------------------------------------------------------------------------------------------
# One training run's process-group session (CAM training and DeepLab)
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainingSession:
    """What `training_session` made: process group, DeepSpeed settings, checkpoint to resume, log."""
    cfg: RunConfig
    info: D.DistInfo
    ds_config: dict
    resume_from: Optional[Path]
    log: RunLog
    stage: str
    max_steps: int
    heartbeat: Optional[D.Heartbeat] = None

    def run(self, make_trainer: Callable[["TrainingSession"], StepLoop], save_every: int) -> dict:
        """Start the heartbeat, make the trainer, fit, and leave together. Returns the summary."""
        self.heartbeat = D.Heartbeat(self.info.rank, self.info.world_size, self.cfg.train.dist_timeout_s,
                                     namespace=D.stage_namespace(self.stage)).start()
        trainer = make_trainer(self)
        summary = trainer.fit(self.max_steps, save_every, self.resume_from, self.heartbeat)
        self.log.info("finished: %s", summary)
        # Stop watching before the last barrier: rank 0 (often the store's host) may exit first.
        self.heartbeat.stop(finished=True)
        D.barrier()
        return summary


@contextmanager
def training_session(cfg: RunConfig, run_dir: Path, *, stage: str, resume: str, max_steps: int,
                     ds_config: Callable[[int], dict], local_rank: Optional[int] = None, progress: bool = True,
                     env: Optional[dict] = None, title: str = ""):
    """Join or make the process group; DeepSpeed settings (`ds_config(world_size)`); the run dir
    (made by rank 0, then by everyone: nodes without a shared filesystem); the checkpoint to
    resume; the RunLog with config.yaml and env.json (+ `env`). Yields a TrainingSession; on the
    way out logs a failure, stops the heartbeat, closes the log and leaves the group.
    `title` prefixes the log lines ("DeepLab ")."""
    info = D.init_distributed(cfg.train.dist_timeout_s, local_rank_arg=local_rank)
    log = session = None
    try:
        ds_cfg = ds_config(info.world_size)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = ckpt.resolve_resume(resume, run_dir)
        start_step = ckpt.step_of(resume_from) if resume_from is not None else 0
        log = RunLog(run_dir, info.rank, info.world_size, max_steps, start_step=start_step,
                     tensorboard=cfg.train.tensorboard, progress=progress)
        log.write_config(cfg)
        env_info = environment_info(info.world_size, info.device, info.launched_by)
        env_info["deepspeed_config"] = ds_cfg
        env_info.update(env or {})
        log.write_env(env_info)
        log.info("%srank %d/%d on %s (%s, launched by %s)", title, info.rank, info.world_size, info.device,
                 info.backend, info.launched_by)
        session = TrainingSession(cfg, info, ds_cfg, resume_from, log, stage, max_steps)
        yield session
    except Exception as e:
        if log is not None:
            log.error("%straining failed: %s: %s", title, type(e).__name__, e)
        raise
    finally:
        if session is not None and session.heartbeat is not None:
            session.heartbeat.stop(finished=False)
        if log is not None:
            log.close()
        D.shutdown(info)


def train(cfg: RunConfig, run_dir, resume: str = "", ds_config_path: Optional[str] = None,
          local_rank: Optional[int] = None, progress: bool = True) -> dict:
    """Set up the process group, run the whole training, tear down. Returns a summary dict."""
    check_geometry(cfg)
    check_inputs(cfg)
    run_dir = Path(run_dir)
    # Before any work: the launcher's WORLD_SIZE (plain python: 1) against the checkpoint's.
    check_resume_world_size(ckpt.resolve_resume(resume, run_dir), int(os.environ.get("WORLD_SIZE", "1")))
    with training_session(cfg, run_dir, stage="train_cam", resume=resume, max_steps=cfg.train.max_steps,
                          ds_config=lambda world: build_ds_config(cfg, world, ds_config_path),
                          local_rank=local_rank, progress=progress) as session:
        return session.run(lambda s: Trainer(cfg, run_dir, s.info, s.ds_config, s.log), cfg.train.save_every)
