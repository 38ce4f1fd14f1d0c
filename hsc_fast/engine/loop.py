"""The step loop shared by CAM training (engine.cam_trainer.Trainer) and DeepLab
(engine.deeplab_trainer.DeeplabTrainer): engine construction, the optimiser step over micro-batches
with the non-finite guard (a step with a non-finite loss on any rank is skipped on every rank;
``train.max_nonfinite`` in a row -> checkpoint + TrainingError; HSC_FAULT_NAN_STEPS injects NaN
losses for tests), the resumable loop with its checkpoint cadence, per-step logging, kernel
self-check records, and a dead peer's failed collective turned into RankLostError. A trainer
supplies only its forward pass (``micro_losses``), its data stream and what it logs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
import numpy as np
import os
import random
import time
import torch

from hsc_fast import checkpoint as ckpt
from hsc_fast import distributed as D
from hsc_fast.config import OptimConfig, RunConfig
from hsc_fast.engine.checkpointing import Checkpointing
from hsc_fast.engine.optim import PolySchedule, build_optimizer
from hsc_fast.engine.runlog import RunLog
from hsc_fast.errors import TrainingError


class RankLostError(TrainingError):
    """A peer rank died or stopped answering; this rank cannot continue."""


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


# ----------------------------------------------------------------------------------------------
# What the CAM and DeepLab trainers share
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0                   # optimiser steps done
    epoch: int = 0                  # data epoch of the next batch
    batches_in_epoch: int = 0       # batches of that epoch already consumed by this rank
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    skipped_samples: int = 0        # bad samples skipped by the loader (all ranks, cumulative; CAM only)


@dataclass
class StepResult:
    terms: dict                     # loss terms incl. "total" (mean over micro-steps, this rank)
    nonfinite: bool                 # the step was skipped on every rank
    nonfinite_terms: list = field(default_factory=list)
    images: int = 0
    lr: float = 0.0                 # learning rate of the first group used by this step


def nan_fault_steps(rank: int) -> set[int]:
    """HSC_FAULT_NAN_STEPS="3,4" (+ optional HSC_FAULT_NAN_RANK) -> steps whose loss becomes NaN
    (fault injection for the non-finite guard of CAM and DeepLab training)."""
    text = os.environ.get("HSC_FAULT_NAN_STEPS", "").strip()
    only_rank = os.environ.get("HSC_FAULT_NAN_RANK", "").strip()
    if not text or (only_rank and int(only_rank) != rank):
        return set()
    return {int(s) for s in text.replace(" ", "").split(",") if s}


def nonfinite_terms(terms: dict) -> list[str]:
    """The names of the non-finite terms when ``terms["total"]`` is not finite (["total"] if no
    other is), else []."""
    if bool(torch.isfinite(terms["total"].detach()).all()):
        return []
    bad = [k for k, v in terms.items() if k != "total" and not bool(torch.isfinite(torch.as_tensor(v)).all())]
    return bad or ["total"]


def restore_buffers(module: torch.nn.Module, saved: list) -> None:
    """Put back the buffers (BatchNorm running stats) of a skipped step."""
    with torch.no_grad():
        for b, old in zip(module.buffers(), saved):
            b.copy_(old)


def record_kernel_checks(log: RunLog, seen: int) -> int:
    """New kernel self-check verdicts (hsc_fast.ops.check: first use of a kernel at a new dtype /
    feature dim / arch) go into env.json ("kernel_checks"); fallbacks are logged. Returns the count."""
    from hsc_fast.ops import check as kernel_check
    reports = kernel_check.report()
    if len(reports) == seen:
        return seen
    for r in reports[seen:]:
        if not r["ok"]:
            log.warning("kernel %s (%s, dim %d, %s) falls back to its reference: %s", r["op"], r["dtype"],
                        r["dim"], r["arch"], r["error"])
    log.update_env({"kernel_checks": reports})
    return len(reports)


class EngineSetup:
    """Construction shared by the trainers: determinism, seeds, SGD + poly schedule (ours, not
    DeepSpeed's) inside a DeepSpeed engine, the fault-injection steps."""

    def _setup(self, cfg: RunConfig, run_dir, info: D.DistInfo, ds_config: dict, log: Optional[RunLog]) -> None:
        self.cfg, self.info, self.log = cfg, info, log
        self.run_dir = Path(run_dir)
        self.device = info.device
        self.ds_config = ds_config
        self.gas = int(ds_config["gradient_accumulation_steps"])
        self.state = TrainState()
        self.nan_steps = nan_fault_steps(info.rank)
        set_determinism(cfg.train.deterministic)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank

    def _wrap_engine(self, model: torch.nn.Module, optim_cfg: OptimConfig) -> None:
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

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module


class StepLogging:
    """Per-step records shared by the trainers: metrics rows, log lines, non-finite counters,
    kernel self-check verdicts."""

    def _log_info(self, msg: str, *args) -> None:
        if self.log is not None:
            self.log.info(msg, *args)

    def _record_kernel_checks(self) -> None:
        if self.log is not None:
            self._kernel_reports_seen = record_kernel_checks(self.log, getattr(self, "_kernel_reports_seen", 0))

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


class StepLoop(EngineSetup, StepLogging, Checkpointing):
    """The trainer skeleton shared by CAM training (`cam_trainer.Trainer`) and DeepLab
    (`deeplab_trainer.DeeplabTrainer`): the optimiser step over micro-batches with the non-finite
    guard, the resumable loop with its checkpoint cadence and non-finite limit, checkpoints (incl.
    ZeRO / bf16 optimizer partitions) and a dead peer's failed collective turned into RankLostError.

    A subclass calls `_setup` and `_wrap_engine` and implements `micro_losses` (one micro-batch ->
    loss terms with "total"), `make_stream` (an object with next(), epoch, batches_in_epoch),
    `_record`, `_nonfinite_message` and `_finish`; `_begin_step` / `_micro_done` / `_end_step`
    keep the trainer's own state in step with the guard (CAM: the prototype banks);
    `_checkpoint_extra` / `_restore_extra` add its own entries to the shared checkpoint file.
    """

    # -- subclass hooks ------------------------------------------------------------------------------
    def micro_losses(self, raw: dict, step_no: int, last: bool) -> tuple[dict, int]:
        """One micro-batch forward: (loss terms with the "total" to back-propagate, images)."""
        raise NotImplementedError

    def make_stream(self):
        raise NotImplementedError

    def _record(self, result: StepResult, stream, seconds: float, heartbeat) -> None:
        """Update the non-finite counters of `state` from `result`; log the step."""
        raise NotImplementedError

    def _nonfinite_message(self, result: StepResult, path: Path) -> str:
        raise NotImplementedError

    def _finish(self) -> dict:
        """After the last checkpoint: the final model; returns the summary."""
        raise NotImplementedError

    def _begin_step(self) -> None:
        pass

    def _micro_done(self, any_bad: bool) -> None:
        pass

    def _end_step(self, nonfinite: bool) -> None:
        pass

    def _checkpoint_extra(self) -> dict:
        return {}

    def _restore_extra(self, shared: dict, ckpt_dir: Path) -> None:
        pass

    # -- one optimiser step --------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimiser step over `gas` micro-batches (collective: every rank calls it). A
        non-finite loss on any rank skips the update everywhere (parameters and momentum untouched)."""
        if len(micro_batches) != self.gas:
            raise ValueError(f"train_step: expected {self.gas} micro-batches, got {len(micro_batches)}")
        step_no = self.state.step + 1
        lr = float(self.optimizer.param_groups[0]["lr"])
        # BatchNorms in train mode update running stats in forward: put them back if the step is skipped.
        saved_buffers = [b.detach().clone() for b in self.module.buffers()]
        self._begin_step()
        sums: dict[str, float] = {}
        nonfinite, bad_terms, images = False, [], 0
        for i, raw in enumerate(micro_batches):
            terms, n_images = self.micro_losses(raw, step_no, last=i == self.gas - 1)
            if step_no in self.nan_steps:
                terms = dict(terms, total=terms["total"] * float("nan"))
            bad_now = nonfinite_terms(terms)
            bad_terms += bad_now
            any_bad = D.all_reduce_max_flag(bool(bad_now), self.device)
            self.engine.backward(terms["total"])
            nonfinite = nonfinite or any_bad
            self._micro_done(any_bad)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(torch.as_tensor(v).detach().float())
            images += n_images
            if i == self.gas - 1:
                self.optimizer.skip_next = nonfinite
            self.engine.step()
        if nonfinite:
            restore_buffers(self.module, saved_buffers)
        self._end_step(nonfinite)
        return StepResult(terms={k: v / self.gas for k, v in sums.items()}, nonfinite=nonfinite,
                          nonfinite_terms=sorted(set(bad_terms)), images=images, lr=lr)

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

