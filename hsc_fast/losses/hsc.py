"""The three HSC losses: ROI-level (RSC), class-level (CSC) and pixel-level (PSC) contrast.

Inputs are at the contrast resolution (see `cam.resize_to_contrast`): f = projector features
(N,D,h,w); y = pseudo-labels (N,h,w) int64 with 20 = background; s / cam = normalised CAMs
(N,21,h,w) (`cam.normalize_cam`); labels (N,20). Each loss returns (loss, new_bank1,
new_bank2) and never mutates its inputs. With `LossConfig.official()` the values, the bank
updates and the gradients equal the authors' code (module/train.py); unlike it, they stay
finite for N=1, batches without foreground, all-background labels and k above the pixel count.
`dist_ctx` (hsc_fast.losses.prototypes.DistContext) makes every batch statistic global over the
data-parallel ranks (see the prototypes module docstring).
"""
from __future__ import annotations

from typing import Optional

import torch

from hsc_fast.classes import VOC
from hsc_fast import ops
from hsc_fast.ops import upcast, LossInputError, l2_normalize
from hsc_fast.precision import fp32_losses
from hsc_fast.losses.prototypes import DistContext, global_topk_sums, is_distributed, safe_ratio_normalize
from hsc_fast.losses.cam import label_scores

SIM_CLAMP = (5e-4, 0.9995)   # official SimMinLoss clamp of the cosine similarity
ROI_EPS = 1e-5               # official RSC count and normalisation epsilon
COSINE_EPS = 1e-8            # torch.cosine_similarity default (official CSC logits)


# ------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------
def flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    """(N,D,h,w) -> (N*h*w, D), pixel order (n, y, x) as the official permute+reshape."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def flatten_channels(x: torch.Tensor) -> torch.Tensor:
    """(N,C,h,w) -> (C, N*h*w), same pixel order as flatten_pixels."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def ema(new: torch.Tensor, old: torch.Tensor, momentum: float) -> torch.Tensor:
    """momentum * new + (1 - momentum) * old, detached (official `l * new + (1 - l) * old`)."""
    return (momentum * new.detach() + (1.0 - momentum) * old.detach()).to(old.dtype)


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that still depends on the inputs, so every rank runs the same backward graph."""
    return sum(t.sum() * 0.0 for t in tensors if t.requires_grad) + torch.zeros((), device=tensors[0].device)


def finish(loss: torch.Tensor, ctx: Optional[DistContext]) -> torch.Tensor:
    return ctx.rank_loss(loss) if is_distributed(ctx) else loss


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, dims: int = 4) -> None:
    if a.dim() != dims or b.dim() != dims or a.shape[1:] != b.shape[1:]:
        raise LossInputError(f"{name}: both views must be {dims}-D with equal shapes after the batch "
                             f"dimension, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_labels(name: str, y: torch.Tensor, f: torch.Tensor) -> None:
    if y.shape != (f.shape[0],) + tuple(f.shape[2:]):
        raise LossInputError(f"{name}: expected pseudo-labels (N,h,w) = {(f.shape[0],) + tuple(f.shape[2:])}, "
                             f"got {tuple(y.shape)}")


def _check_bank(name: str, bank: torch.Tensor, rows: int, dim: int) -> None:
    if tuple(bank.shape) != (rows, dim):
        raise LossInputError(f"{name}: expected a ({rows},{dim}) bank, got {tuple(bank.shape)}")


def class_vectors(scores, feats, k, k_denom=None, normalize=True, ctx=None, impl="auto"):
    """Batch-wide top-k prototypes (ops.topk_proto), over all ranks when distributed."""
    if not is_distributed(ctx):
        return ops.topk_proto(scores, feats, k, k_denom=k_denom, normalize=normalize, impl=impl)
    (num,), den = global_topk_sums(scores, feats, [k], k if k_denom is None else k_denom, ctx)
    return safe_ratio_normalize(num, den, normalize)


# ------------------------------------------------------------------------------------------
# RSC
# ------------------------------------------------------------------------------------------
def sim_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over all pairs (i, j) of -log(1 - clamp(cos(a_i, b_j), 5e-4, 0.9995))."""
    sim = l2_normalize(a) @ l2_normalize(b).t()
    return -torch.log(1.0 - sim.clamp(*SIM_CLAMP)).mean()


def rsc_pooled(f: torch.Tensor, y: torch.Tensor, normalize_axis: str, impl: str, bg_index: int) -> torch.Tensor:
    """(N,2,D) per-image [bg, fg] region vectors of one view (bg: pseudo-label ``bg_index``)."""
    if normalize_axis == "width":      # the official F.normalize(f_map, dim=-1)
        f = l2_normalize(upcast(f), dim=-1)
    elif normalize_axis == "channel":
        f = l2_normalize(upcast(f), dim=1)
    else:
        raise LossInputError(f"loss.rsc_normalize: expected 'width' or 'channel', got {normalize_axis!r}")
    bg = (y == bg_index).flatten(1)
    masks = torch.stack([bg, ~bg], dim=1).to(f.dtype)            # (N,2,P)
    return ops.roi_pool(f.flatten(2), masks, count_eps=ROI_EPS, norm_eps=ROI_EPS, impl=impl)


@fp32_losses
def rsc_loss(f1, f2, y1, y2, bank1, bank2, cfg, impl="auto", dist_ctx: Optional[DistContext] = None,
             bg_index: int = VOC.bg_index):
    """ROI-level semantic contrast. Banks (2,D) rows [bg, fg] per view; ``bg_index`` = the
    background pseudo-label (K: the CAM's last channel; the methods pass it, 20 for VOC)."""
    _check_pair("rsc_loss f1/f2", f1, f2)
    _check_labels("rsc_loss y1", y1, f1)
    _check_labels("rsc_loss y2", y2, f2)
    for name, bank in (("rsc_loss bank1", bank1), ("rsc_loss bank2", bank2)):
        _check_bank(name, bank, 2, f1.shape[1])
    pooled1 = rsc_pooled(f1, y1, cfg.rsc_normalize, impl, bg_index)
    pooled2 = rsc_pooled(f2, y2, cfg.rsc_normalize, impl, bg_index)
    if is_distributed(dist_ctx):
        pooled1, pooled2 = dist_ctx.splice(pooled1), dist_ctx.splice(pooled2)
    bg1, fg1, bg2, fg2 = pooled1[:, 0], pooled1[:, 1], pooled2[:, 0], pooled2[:, 1]

    terms = (sim_min(bg1, fg1) + sim_min(bg2, fg2)) / 2                       # intra-view
    if cfg.cross_supervision:
        terms = terms + (sim_min(bg1, fg2) + sim_min(bg2, fg1)) / 2           # cross-view
    b1, b2 = upcast(bank1.detach()), upcast(bank2.detach())
    terms = terms + ((b1[1] - fg1).abs().mean() + (b2[1] - fg2).abs().mean()) / 2
    terms = terms + ((b1[0] - bg1).abs().mean() + (b2[0] - bg2).abs().mean()) / 2
    loss = cfg.rsc_weight * terms

    m = cfg.rsc_momentum
    new1 = ema(torch.stack([bg1.mean(0), fg1.mean(0)]), bank1, m)
    new2 = ema(torch.stack([bg2.mean(0), fg2.mean(0)]), bank2, m)
    return finish(loss, dist_ctx), new1, new2


# ------------------------------------------------------------------------------------------
# CSC
# ------------------------------------------------------------------------------------------
def present_classes(labels: torch.Tensor, ctx: Optional[DistContext]) -> torch.Tensor:
    """Ascending indices of the foreground classes present in any image of the (global) batch."""
    counts = upcast(labels.detach()).sum(dim=0)
    if is_distributed(ctx):
        counts = ctx.all_reduce_sum(counts)
    return torch.nonzero(counts > 0).flatten()


def csc_view_vectors(scores, feats, cfg, ctx, impl):
    """Class vectors (20,D) with gradient and the bank-update vectors (20,D) of one view."""
    k, k_upd = cfg.csc_topk, cfg.csc_update_topk
    if is_distributed(ctx):
        (num, num_upd), den = global_topk_sums(scores, feats, [k, k_upd], k, ctx)
        return safe_ratio_normalize(num, den, True), safe_ratio_normalize(num_upd.detach(), den, True)
    reps = ops.topk_proto(scores, feats, k, impl=impl)
    upd = ops.topk_proto(scores, feats.detach(), k_upd, k_denom=k, impl=impl)
    return reps, upd


def sequential_bank_logits(reps, present, bank_old, bank_new, tau):
    """Logits (n_present, C) of each present class c against the bank as the official loop sees
    it at class c: rows of present classes before c already updated, all others still old."""
    n = present.numel()
    before = torch.zeros(n, bank_old.shape[0], dtype=torch.bool, device=bank_old.device)
    position = torch.arange(n, device=bank_old.device)
    before[:, present] = position[None, :] < position[:, None]        # (class i, row r)
    state = torch.where(before[..., None], bank_new[None], bank_old[None])   # (n, C, D)
    state = l2_normalize(state, dim=-1, eps=COSINE_EPS)
    anchors = l2_normalize(reps[present], dim=-1, eps=COSINE_EPS)
    return torch.einsum("nd,ncd->nc", anchors, state) / tau


@fp32_losses
def csc_loss(f1, s1, f2, s2, labels, bank1, bank2, cfg, impl="auto",
             dist_ctx: Optional[DistContext] = None):
    """Class-level semantic contrast. s = normalised CAMs (N,21,h,w); banks (21,D)."""
    _check_pair("csc_loss f1/f2", f1, f2)
    _check_pair("csc_loss s1/s2", s1, s2)
    if s1.shape[2:] != f1.shape[2:] or s1.shape[0] != f1.shape[0] or s2.shape[0] != f2.shape[0]:
        raise LossInputError(f"csc_loss: CAMs {tuple(s1.shape)} and features {tuple(f1.shape)} must share N,h,w")
    for name, bank in (("csc_loss bank1", bank1), ("csc_loss bank2", bank2)):
        _check_bank(name, bank, s1.shape[1], f1.shape[1])
    present = present_classes(labels, dist_ctx)
    scores1 = flatten_channels(label_scores(s1, labels)[:, :-1])   # the K foreground channels
    scores2 = flatten_channels(label_scores(s2, labels)[:, :-1])
    reps1, upd1 = csc_view_vectors(scores1, flatten_pixels(upcast(f1)), cfg, dist_ctx, impl)
    reps2, upd2 = csc_view_vectors(scores2, flatten_pixels(upcast(f2)), cfg, dist_ctx, impl)

    old1, old2 = upcast(bank1.detach()), upcast(bank2.detach())
    m = cfg.csc_momentum
    full1 = old1.clone()
    full1[:-1] = ema(upd1, old1[:-1], m)
    full2 = old2.clone()
    full2[:-1] = ema(upd2, old2[:-1], m)
    new1, new2 = old1.clone(), old2.clone()
    new1[present], new2[present] = full1[present], full2[present]
    if present.numel() == 0:  # no foreground in the batch: nothing to contrast (official: 0/0)
        return finish(zero_loss(f1, f2), dist_ctx), new1.to(bank1.dtype), new2.to(bank2.dtype)

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits, present, reduction="sum")

    seen1 = sequential_bank_logits(reps1, present, old1, full1, cfg.tau)
    seen2 = sequential_bank_logits(reps2, present, old2, full2, cfg.tau)
    own = ce(seen1) + ce(seen2)
    terms = own / present.numel()
    if cfg.cross_supervision:
        mutual1 = sequential_bank_logits(reps1, present, old2, full2, cfg.tau)
        mutual2 = sequential_bank_logits(reps2, present, old1, full1, cfg.tau)
        terms = terms + (ce(mutual1) + ce(mutual2)) / present.numel()
    loss = cfg.csc_weight * terms / 4
    return finish(loss, dist_ctx), new1.to(bank1.dtype), new2.to(bank2.dtype)


# ------------------------------------------------------------------------------------------
# PSC
# ------------------------------------------------------------------------------------------
@fp32_losses
def psc_loss(cam1, f1, cam2, f2, y1, y2, bank1, bank2, cfg, impl="auto",
             dist_ctx: Optional[DistContext] = None):
    """Pixel-level semantic contrast. cam = normalised CAMs (N,21,h,w); banks (21,D)."""
    _check_pair("psc_loss f1/f2", f1, f2)
    _check_pair("psc_loss cam1/cam2", cam1, cam2)
    _check_labels("psc_loss y1", y1, f1)
    _check_labels("psc_loss y2", y2, f2)
    if f1.shape[0] != f2.shape[0]:
        raise LossInputError(f"psc_loss: both views need the same images, got N={f1.shape[0]} and {f2.shape[0]}")
    for name, bank in (("psc_loss bank1", bank1), ("psc_loss bank2", bank2)):
        _check_bank(name, bank, cam1.shape[1], f1.shape[1])
    with torch.no_grad():
        p1 = class_vectors(flatten_channels(upcast(cam1)), flatten_pixels(upcast(f1.detach())),
                           cfg.psc_topk, ctx=dist_ctx, impl=impl)
        p2 = class_vectors(flatten_channels(upcast(cam2)), flatten_pixels(upcast(f2.detach())),
                           cfg.psc_topk, ctx=dist_ctx, impl=impl)
    e1, e2 = flatten_pixels(f1), flatten_pixels(f2)
    terms = ops.psc_terms(e1, e2, y1.reshape(-1), y2.reshape(-1), p1, p2,
                          upcast(bank1.detach()), upcast(bank2.detach()), tau=cfg.tau, impl=impl)
    if is_distributed(dist_ctx):
        # global per-pixel mean: value from all ranks, gradient from the local pixels
        count = torch.tensor(float(e1.shape[0]), device=terms.device)
        total = dist_ctx.all_reduce_sum(count)
        terms = dist_ctx.sum_keep_local(terms * count) / total
    weights = torch.tensor([float(cfg.cross_supervision), float(cfg.cross_supervision), 1.0,
                            float(cfg.momentum_prototypes)], device=terms.device)
    loss = cfg.psc_weight * (terms * weights).sum()
    if cfg.momentum_prototypes:
        new1, new2 = ema(p1, bank1, cfg.psc_momentum), ema(p2, bank2, cfg.psc_momentum)
    else:
        new1, new2 = bank1.detach().clone(), bank2.detach().clone()
    return finish(loss, dist_ctx), new1, new2
