"""The step loop shared by CAM training (engine.cam_trainer.Trainer) and DeepLab
(engine.deeplab_trainer.DeeplabTrainer): engine construction, the resumable loop with its checkpoint
cadence, the non-finite guard (a step with a non-finite loss on any rank is skipped on every rank;
``train.max_nonfinite`` in a row -> checkpoint + TrainingError), per-step logging, kernel
self-check records, and a dead peer's failed collective turned into RankLostError."""
from __future__ import annotations

from pathlib import Path
from typing import Callable
from typing import Optional
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


class StepLoop(Checkpointing):
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

