"""Momentum prototype banks of HSC and the cross-rank statistics behind them.

`PrototypeBanks` holds the six banks of the official recipe as buffers (so they are saved in
the state_dict and move with `.to(device)`): rsc1/rsc2 (2,256) rows [bg, fg] per view,
csc1/csc2 (K+1,256) and psc1/psc2 (K+1,128) (K+1 = 21 for VOC, 81 for COCO), random-normal init from a seeded generator (the
official banks are `torch.randn`, never normalised).

Data parallelism -- R ranks with b images each must give the SAME banks and loss values as one
process with the concatenated batch of R*b images, and the same gradients after DeepSpeed
averages the per-rank gradients. `DistContext` (None = one process) provides the collectives;
every HSC loss follows one rule:

  * Global (identical on every rank): every batch-wide statistic and everything built from it.
    - RSC: the pooled [bg, fg] vectors of all images (the N x N sim-min pairs and the bank EMA
      mean need all of them) -> all_gather of the (b,2,D) pooled vectors per view.
    - CSC / PSC top-k: each rank takes its local top-k per class, the candidate SCORES are
      all_gathered (C x k floats per rank), every rank picks the same global top-k from them,
      ties broken by the global pixel index exactly as one process would (see
      `global_topk_sums`), and the score-weighted feature sums of the chosen candidates are all_reduced (C x D):
      no feature maps travel. Denominators come from the gathered scores.
    - CSC's set of classes present in the batch: all_reduce of the label counts.
    - PSC's per-pixel InfoNCE means: all_reduce of (local mean x local pixel count) and of
      the pixel counts -> the global mean.
    - Bank updates use only global quantities, so banks stay identical on all ranks.
  * Per rank: autograd. Gathered/reduced tensors from other ranks are constants; the local
    contribution keeps its graph (`DistContext.splice`). Each rank's backward of the global
    loss L therefore yields exactly dL/d(own features) -- its share of the global gradient.
    DeepSpeed then AVERAGES gradients over ranks, so `DistContext.rank_loss` scales the
    gradient (not the value) by R: mean_r(R * g_r) = sum_r g_r = dL/dtheta.
  The CAM baselines (classification, SEAM, EPS, PPC) are per-image / per-pixel means computed
  per rank: with equal per-rank batches DeepSpeed's average already equals the global mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from hsc_fast.classes import VOC
from hsc_fast.ops import stable_topk, upcast, LossInputError

BANK_NAMES = ("rsc1", "rsc2", "csc1", "csc2", "psc1", "psc2")


class PrototypeBanks(nn.Module):
    """The six momentum banks as buffers; `as_dict()` for the losses, `update_()` after them."""

    def __init__(self, seed: int = 0, rsc_dim: int = 256, psc_dim: int = 128, num_classes: int = VOC.num_classes):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        shapes = {"rsc1": (2, rsc_dim), "rsc2": (2, rsc_dim),
                  "csc1": (num_classes, rsc_dim), "csc2": (num_classes, rsc_dim),
                  "psc1": (num_classes, psc_dim), "psc2": (num_classes, psc_dim)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.randn(*shape, generator=gen))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in BANK_NAMES}

    @torch.no_grad()
    def update_(self, new: dict[str, torch.Tensor]) -> None:
        """Copy the new banks returned by the losses into the buffers (names as in as_dict)."""
        for name, value in new.items():
            if name not in BANK_NAMES:
                raise LossInputError(f"PrototypeBanks.update_: unknown bank '{name}' "
                                     f"(expected one of {', '.join(BANK_NAMES)})")
            buf = getattr(self, name)
            if value.shape != buf.shape:
                raise LossInputError(f"PrototypeBanks.update_: bank '{name}' must stay {tuple(buf.shape)}, "
                                     f"got {tuple(value.shape)}")
            buf.copy_(value.detach())


class DistContext:
    """Collectives for the losses over a process group (None: the default group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # -- raw collectives (no autograd) ------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def gather_sizes(self, n: int, device) -> list[int]:
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        sizes[self.rank] = n
        return [int(v) for v in self.all_reduce_sum(sizes).tolist()]

    def all_gather_cat(self, t: torch.Tensor, sizes: Optional[list[int]] = None) -> tuple[torch.Tensor, list[int]]:
        """Concatenate every rank's `t` along dim 0 in rank order (sizes may differ per rank).
        Returns (detached result, per-rank sizes)."""
        t = t.detach().contiguous()
        sizes = sizes or self.gather_sizes(t.shape[0], t.device)
        biggest = max(sizes)
        padded = t.new_zeros((biggest,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0), sizes

    # -- autograd-aware helpers ----------------------------------------------------------------
    def splice(self, t: torch.Tensor) -> torch.Tensor:
        """all_gather_cat with this rank's slice replaced by `t` itself (keeps its graph)."""
        full, sizes = self.all_gather_cat(t)
        start = sum(sizes[: self.rank])
        return torch.cat([full[:start], t, full[start + t.shape[0]:]], dim=0)

    def sum_keep_local(self, t: torch.Tensor) -> torch.Tensor:
        """all_reduce sum whose gradient flows to the local term only."""
        return t + (self.all_reduce_sum(t) - t.detach())

    def rank_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Same value; gradient x world_size (undoes DeepSpeed's mean over ranks)."""
        return loss.detach() + self.world_size * (loss - loss.detach())


def is_distributed(ctx: Optional[DistContext]) -> bool:
    return ctx is not None and ctx.world_size > 1


def global_topk_sums(scores: torch.Tensor, feats: torch.Tensor, k_nums: list[int], k_denom: int,
                     ctx: DistContext) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batch-wide top-k over all ranks: for each k in k_nums the sum of score*feature over the
    global top-k of each row (C,D), and the sum of the global top-k_denom scores (C,).

    scores (C,M) local, constants; feats (M,D) local (gradient flows to the local candidates).
    Ties go to the lower GLOBAL pixel index, the order of the one-process batch (rank 0's
    pixels first, then rank 1's, ...), as `ops.topk_proto` does for one process: each rank
    keeps its local top-k with that rule (`stable_topk`: score descending, lower index first),
    so the rank-major concatenation of the candidates lists tied scores in global-index order,
    and a second `stable_topk` over it (lower position first) picks exactly the global top-k.
    """
    scores = upcast(scores.detach())
    k_max = max(list(k_nums) + [k_denom])
    k_local = min(k_max, scores.shape[1])
    values, index = stable_topk(scores, k_local)                       # (C,k_local)
    every, sizes = ctx.all_gather_cat(values.t().contiguous())         # (sum k_local, C)
    every = every.t()
    k_global = min(k_max, every.shape[1])
    top_values, top_pos = stable_topk(every, k_global)                # same on every rank
    start = sum(sizes[: ctx.rank])
    # order[c, i] = global rank of local candidate i of row c (k_global when not selected)
    order = torch.full_like(values, float(k_global), dtype=torch.float32)
    local = (top_pos >= start) & (top_pos < start + k_local)
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top_pos)
    ranks = torch.arange(k_global, device=scores.device, dtype=torch.float32)[None].expand_as(top_pos)
    order[rows[local], (top_pos - start)[local]] = ranks[local]
    cand_feats = upcast(feats)[index]                                  # (C,k_local,D)
    nums = []
    for k in k_nums:
        weights = values * (order < k)
        nums.append(ctx.sum_keep_local(torch.einsum("ck,ckd->cd", weights, cand_feats)))
    denom = top_values[:, : min(k_denom, k_global)].sum(dim=1)
    return nums, denom


def safe_ratio_normalize(num: torch.Tensor, den: torch.Tensor, normalize: bool, eps: float = 1e-12):
    """num / den (den == 0 -> 1, as ops.topk_proto), then optionally L2-normalised."""
    den = torch.where(den == 0, torch.ones_like(den), den)[:, None]
    out = num / den
    return torch.nn.functional.normalize(out, dim=-1, eps=eps) if normalize else out
