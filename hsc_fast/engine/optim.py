"""The CAM-training optimiser: poly-decayed SGD over the model's official learning-rate groups.

Two recipes, selected by `OptimConfig`:

* **official** (`official_momentum_quirk: true`, `poly_steps: 13215`) -- what the authors' code
  runs. Their `PolyOptimizer(params, lr, weight_decay, max_step)` calls `SGD(params, lr, weight_decay)`
  positionally, so the weight-decay value (5e-4) lands in SGD's *momentum* slot; the real weight
  decay comes from each lr group (`model.param_groups(lr, wd)`). The poly factor
  `(1 - step / poly_steps) ** power` is recomputed only while `step < poly_steps`, so after step
  13,215 the learning rate freezes at its last (tiny) value while training goes on to 20,000.
* **corrected** (`official_momentum_quirk: false`, `poly_steps` = `train.max_steps`) -- SGD with
  the intended momentum `optim.momentum` (0.9) and a schedule that decays over the whole run.

The schedule is a small object with `step()` / `state_dict()` so that DeepSpeed drives it after each
optimiser step and our checkpoints store it (plain ints/floats: loadable with weights_only=True).
"""
from __future__ import annotations

import torch

from hsc_fast.config import OptimConfig
from hsc_fast.errors import ConfigError


def effective_momentum(cfg: OptimConfig) -> float:
    """The momentum SGD really uses: the weight-decay value under the official quirk."""
    return cfg.weight_decay if cfg.official_momentum_quirk else cfg.momentum


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> "SkippableSGD":
    """SGD over `model.param_groups(lr, wd, backbone_lr_mult)` (1x/2x/10x/20x groups, each with its weight
    decay; optim.backbone_lr_mult scales the backbone's)."""
    if not hasattr(model, "param_groups"):
        raise ConfigError("optim: the model must expose param_groups(lr, weight_decay, backbone_lr_mult) "
                          "(the official 1x/2x/10x/20x learning-rate groups)")
    groups = model.param_groups(cfg.lr, cfg.weight_decay, backbone_lr_mult=cfg.backbone_lr_mult)
    groups = [g for g in groups if list(g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("weight_decay", cfg.weight_decay)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("optim: the model has no trainable parameters")
    return SkippableSGD(groups, lr=cfg.lr, momentum=effective_momentum(cfg))


class PolySchedule:
    """lr_g(step) = initial_lr_g * (1 - min(step, poly_steps - 1) / poly_steps) ** power.

    `step` counts optimiser steps already taken. Freezing at `poly_steps - 1` reproduces the
    official optimiser, which stops updating the rate once its global step reaches `max_step`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, power: float, poly_steps: int):
        if poly_steps <= 0:
            raise ConfigError(f"config key 'optim.poly_steps': must be positive, got {poly_steps}")
        self.optimizer = optimizer
        self.power = float(power)
        self.poly_steps = int(poly_steps)
        self.initial_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        return (1.0 - min(step, self.poly_steps - 1) / self.poly_steps) ** self.power

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, lr0 in zip(self.optimizer.param_groups, self.initial_lrs):
            g["lr"] = lr0 * f

    def step(self, *_args, **_kw) -> None:
        """Called once after every optimiser step: sets the rate of the next step."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "initial_lrs": list(self.initial_lrs),
                "power": self.power, "poly_steps": self.poly_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.initial_lrs = [float(x) for x in state["initial_lrs"]]
        self.power = float(state["power"])
        self.poly_steps = int(state["poly_steps"])
        self._apply()


class SkippableSGD(torch.optim.SGD):
    """SGD whose next `step()` becomes a no-op when `skip_next` is set.

    DeepSpeed must still run `engine.step()` when a step is skipped for a non-finite loss (it
    advances its micro-step counters, zeroes the gradients and drives the schedule); the
    parameters and momentum buffers stay untouched.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)
