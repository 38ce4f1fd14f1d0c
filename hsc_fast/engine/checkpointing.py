"""Checkpoints of a StepLoop: what is saved, how it is restored (exactly)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional
import inspect

from hsc_fast import checkpoint as ckpt
from hsc_fast import distributed as D
from hsc_fast.config import to_dict
from hsc_fast.engine.deepspeed import optimizer_is_partitioned
from hsc_fast.errors import WeightsError


class Checkpointing:
    """Save / restore of a StepLoop's whole training state (model, optimizer incl. ZeRO / bf16
    partitions, schedule, counters, per-rank RNG and data position) through hsc_fast.checkpoint:
    atomic, weights_only-safe, resumed exactly."""

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
