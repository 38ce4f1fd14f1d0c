"""HSC as the paper writes it (Wu et al., IJCAI 2023, Sec. 3.2-3.4): `loss.formulation: paper`.

The authors' code (`hsc.py`, `loss.formulation: code`, what the published numbers were trained
with) differs from the paper's equations in RSC and CSC; the docs page reference/formulations.md
(the authors' code and the paper's equations) tabulates every difference. Same inputs, signatures and return
values as the code's losses (loss, new_bank1, new_bank2), inputs never mutated; `dist_ctx` makes
every batch statistic global over the data-parallel ranks (prototypes module docstring).

Both views. "For simplicity, Section 3.2-3.4 only describe HSC from one view"; the view-2 loss is
the mirror image (swap the views), and the two are AVERAGED: the paper does not say how the views
combine, and the authors' code averages every two-view term (cls, saliency, the RSC and PSC
terms), so each loss keeps the scale its equation is written at and eq. 1's gamma (= rsc/csc/
psc_weight, 0.1) weighs the same magnitude. Reading eq. 1 as a SUM over the views instead is
exactly weights 0.2.

RSC (eq. 3-5), `rsc_loss_paper`:
    r_w^i = sum_p m_w^i(p) u1^i(p) / sum_p m_w^i(p), w in {o, b}           (eq. 3)
    F(r_o, r_b) = -1/N^2 sum_i sum_j log(1 - min(cos(r_o^i, r_b^j), 0.9995)) (eq. 4)
    L_rsc = 1/2 sum_{v=1,2} [F(r_o^v, r_b^v) + F(r_o^v, r_b^{other view})]   (eq. 5, both views)
  Masks: the pseudo-labels the method passes (bg = 20, ROI = the rest), CRF-refined under
  loss.crf.enabled as in the code ("argmax on its CAM" in the paper: loss.crf.enabled=false). No
  per-pixel normalisation (loss.rsc_normalize is a code-formulation key), no memory-bank L1 terms
  and no ROI bank: the banks come back unchanged (loss.rsc_momentum unused). The 0.9995 upper
  clamp is only a numerical guard (-log(1 - sim) is infinite at sim = 1); the code's lower clamp
  at 5e-4 is not in eq. 4, so negative cosines keep their (negative) value and gradient. An empty
  mask gives r = 0 and sim = 0 (a 0 term that still counts in the 1/N^2), as the code's +1e-5.

CSC (eq. 6-9), `csc_loss_paper`:
    v_c^i = sum_{p in A_c^i} w^i(p) u1^i(p) / sum_{p in A_c^i} w^i(p)     (eq. 6, inner)
            A_c^i = the top-k_c (loss.csc_topk) pixels of image i by w^i(., c)
    r_c = 1/|M_c| sum_{i in M_c} v_c^i, M_c = images labelled c           (eq. 6)
    F(r_c, P) = -log softmax_l(cos(r_c, P_l) / tau)[c] over all 21 rows   (eq. 8)
    L_csc = 1/2 sum_v 1/|C| sum_{c in C} [F(r_c^v, P^v) + F(r_c^v, P^{other view})]  (eq. 9)
    P_c^v <- lambda r_c^v + (1 - lambda) P_c^v for c in C, r_c detached  (eq. 7, lambda = csc_momentum)
  w = the scores of the code formulation: softmax over the 21 channels of the label-masked
  normalised CAM, detached. Classes C = the image labels present in the (global) batch; the
  background row 20 of P is in every denominator and never updated (the code's convention; the
  paper does not say whether the background is a class here). Every class is contrasted with P
  as it was at the start of the step, then all rows of C are updated at once (eq. 7 is a set-wise
  update; the code's loop shows later classes the rows of earlier ones already updated). r_c is
  not normalised before eq. 7 (eq. 6 has no normalisation; eq. 8 is a cosine, so the scale only
  enters through the EMA). loss.csc_update_topk is unused: eq. 7 updates with the same r_c.

PSC (eq. 10-13) is `hsc.psc_loss` itself: with the paper's values (k_p, lambda) the code computes
eq. 10-13 -- batch-wide top-k_p of the normalised CAM channel c, score-weighted mean (eq. 10), EMA
(eq. 11), the four InfoNCE terms of eq. 13 (summed per view, averaged over the views: the code's
four "/2" terms). u2 and Q are L2-normalised before the dot product of eq. 12: the paper is
silent on it ("Followed by PPC"; tau = 0.1 is the temperature of eq. 8's cosine), and the code
normalises both; the momentum prototypes Q' are the EMA of eq. 11, not renormalised.

Gradients: to u1 / u2 only. CAM scores and masks are constants (the code's detached normalised
CAMs); the momentum prototypes P, P~, Q, Q' are constants (EMA-updated, never learned).
Float32 math with autocast off (precision.fp32_losses), as the code's losses; the primitives are
ops.roi_pool / ops.topk_proto / ops.psc_terms, so the fused Triton kernels serve both formulations.

Measured (tests/losses/test_paper_formulation.py): against loop implementations of each equation in
float64, loss values, prototype updates and gradients agree to <= 2e-16 (RSC, CSC, PSC); the
Triton kernels (interpreter) agree with the torch references to 2e-7 in float32; 2 gloo ranks
equal one process with the whole batch (values, banks, averaged gradients) to 1e-5.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hsc_fast.classes import VOC
from hsc_fast import ops
from hsc_fast.errors import ConfigError
from hsc_fast.ops import LossInputError, l2_normalize, upcast
from hsc_fast.precision import fp32_losses
from hsc_fast.losses.prototypes import DistContext, is_distributed
from hsc_fast.losses.cam import label_scores
from hsc_fast.losses.hsc import (ROI_EPS, _check_bank, _check_labels, _check_pair, csc_loss, ema, finish, psc_loss, rsc_loss,
                  zero_loss)

SIM_MAX = 0.9995          # eq. 4 numerical guard: -log(1 - sim) is infinite at sim = 1 (the code's upper clamp)
COSINE_NORM_EPS = 1e-12   # F.normalize's default: the guard of the cosine's vector norms


# ------------------------------------------------------------------------------------------
# RSC (eq. 3-5)
# ------------------------------------------------------------------------------------------
def rsc_regions(f: torch.Tensor, y: torch.Tensor, impl: str, bg_index: int) -> torch.Tensor:
    """(N,2,D): per image [r_b, r_o] of eq. 3 as unit vectors (only their cosines are used).

    ops.roi_pool gives (sum m u / (sum m + 1e-5)) / ||.||: the count epsilon cancels in the
    normalisation, so this is exactly the direction of the plain masked mean of eq. 3 (fused
    kernel on GPU). Masks: bg = pseudo-label ``bg_index`` (K), ROI = every other label."""
    bg = (y == bg_index).flatten(1)
    feats = upcast(f)
    masks = torch.stack([bg, ~bg], dim=1).to(feats.dtype)
    return ops.roi_pool(feats.flatten(2), masks, count_eps=ROI_EPS, norm_eps=COSINE_NORM_EPS, impl=impl)


def rsc_pair_term(r_o: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Eq. 4: F(r_o, r_b) = -1/N^2 sum_i sum_j log(1 - sim(r_o^i, r_b^j)) for unit rows (N,D);
    sim is clamped above at 0.9995 only (numerical guard)."""
    sim = r_o @ r_b.t()
    return -torch.log1p(-sim.clamp(max=SIM_MAX)).mean()


@fp32_losses
def rsc_loss_paper(f1, f2, y1, y2, bank1, bank2, cfg, impl="auto", dist_ctx: Optional[DistContext] = None,
                   bg_index: int = VOC.bg_index):
    """ROI-level semantic contrast, eq. 3-5 averaged over the two views (module docstring).
    f = u1 maps (N,D,h,w); y = pseudo-labels (N,h,w). The paper has no ROI bank: bank1/bank2
    ((2,D), kept for the code's signature) come back unchanged."""
    _check_pair("rsc_loss_paper f1/f2", f1, f2)
    _check_labels("rsc_loss_paper y1", y1, f1)
    _check_labels("rsc_loss_paper y2", y2, f2)
    for name, bank in (("rsc_loss_paper bank1", bank1), ("rsc_loss_paper bank2", bank2)):
        _check_bank(name, bank, 2, f1.shape[1])
    regions1, regions2 = rsc_regions(f1, y1, impl, bg_index), rsc_regions(f2, y2, impl, bg_index)
    if is_distributed(dist_ctx):  # eq. 4 pairs every ROI with every background of the global batch
        regions1, regions2 = dist_ctx.splice(regions1), dist_ctx.splice(regions2)
    b1, o1, b2, o2 = regions1[:, 0], regions1[:, 1], regions2[:, 0], regions2[:, 1]
    view1, view2 = rsc_pair_term(o1, b1), rsc_pair_term(o2, b2)
    if cfg.cross_supervision:     # eq. 5: the other view's background representations
        view1, view2 = view1 + rsc_pair_term(o1, b2), view2 + rsc_pair_term(o2, b1)
    loss = cfg.rsc_weight * (view1 + view2) / 2
    return finish(loss, dist_ctx), bank1.detach().clone(), bank2.detach().clone()


# ------------------------------------------------------------------------------------------
# CSC (eq. 6-9)
# ------------------------------------------------------------------------------------------
def csc_image_vectors(scores: torch.Tensor, feats: torch.Tensor, k: int, impl: str) -> torch.Tensor:
    """Eq. 6 inner term: v[i, c] = score-weighted mean of u1 over the top-k pixels of image i by
    scores[i, c] -> (N,20,D). scores (N,20,P) constants, feats (N,P,D).

    One ops.topk_proto per image (fused kernel on GPU): each image's top-k only reads that image's
    pixel table, which one call over the batch cannot express exactly (a block-diagonal score
    matrix would, at N^2 memory). k is clipped to P (topk_proto)."""
    return torch.stack([ops.topk_proto(scores[i], feats[i], k, normalize=False, impl=impl)
                        for i in range(scores.shape[0])])


def csc_class_vectors(scores, feats, labels, k, ctx, impl):
    """Eq. 6: r_c = 1/|M_c| sum_{i in M_c} v[i, c] -> ((20,D), |M_c| (20,)), global over ranks.

    The per-image vectors need no cross-rank step (an image's pixels all live on its rank); the
    sum over the images holding c and their count are all_reduced (gradient to the local terms)."""
    per_image = csc_image_vectors(scores, feats, k, impl)
    holds = (labels.detach() > 0).to(per_image.dtype)              # (N,20): i in M_c
    total = torch.einsum("nc,ncd->cd", holds, per_image)
    count = holds.sum(dim=0)
    if is_distributed(ctx):
        total, count = ctx.sum_keep_local(total), ctx.all_reduce_sum(count)
    return total / count.clamp_min(1.0)[:, None], count


def csc_logits(r: torch.Tensor, protos: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8 logits: cos(r_c, P_l) / tau for every row l of protos -> (n, C)."""
    return l2_normalize(r, eps=COSINE_NORM_EPS) @ l2_normalize(protos, eps=COSINE_NORM_EPS).t() / tau


def prototype_update(bank: torch.Tensor, r: torch.Tensor, present: torch.Tensor, momentum: float) -> torch.Tensor:
    """Eq. 7: P_c <- lambda r_c + (1 - lambda) P_c for c in `present` (r detached); the other
    rows (absent classes, background) unchanged."""
    new = upcast(bank.detach()).clone()
    new[present] = ema(r[present], new[present], momentum)
    return new.to(bank.dtype)


@fp32_losses
def csc_loss_paper(f1, s1, f2, s2, labels, bank1, bank2, cfg, impl="auto",
                   dist_ctx: Optional[DistContext] = None):
    """Class-level semantic contrast, eq. 6-9 averaged over the two views (module docstring).
    f = u1 maps (N,D,h,w); s = normalised CAMs (N,21,h,w); labels (N,20); banks P (21,D)."""
    _check_pair("csc_loss_paper f1/f2", f1, f2)
    _check_pair("csc_loss_paper s1/s2", s1, s2)
    if s1.shape[2:] != f1.shape[2:] or s1.shape[0] != f1.shape[0] or s2.shape[0] != f2.shape[0]:
        raise LossInputError(f"csc_loss_paper: CAMs {tuple(s1.shape)} and features {tuple(f1.shape)} "
                             "must share N,h,w")
    for name, bank in (("csc_loss_paper bank1", bank1), ("csc_loss_paper bank2", bank2)):
        _check_bank(name, bank, s1.shape[1], f1.shape[1])

    def view_vectors(f, s):
        scores = label_scores(s, labels)[:, :-1].flatten(2)                # (N,K,P)
        feats = upcast(f).flatten(2).transpose(1, 2).contiguous()         # (N,P,D)
        return csc_class_vectors(scores, feats, labels, cfg.csc_topk, dist_ctx, impl)

    (r1, count), (r2, _) = view_vectors(f1, s1), view_vectors(f2, s2)
    present = torch.nonzero(count > 0).flatten()
    m = cfg.csc_momentum
    new1, new2 = prototype_update(bank1, r1, present, m), prototype_update(bank2, r2, present, m)
    if present.numel() == 0:  # no labelled class in the batch: eq. 9's 1/|C| has nothing to average
        return finish(zero_loss(f1, f2), dist_ctx), new1, new2
    p1, p2 = upcast(bank1.detach()), upcast(bank2.detach())

    def view_term(r, own, other):                                          # eq. 9 for one view
        anchors = r[present]
        term = F.cross_entropy(csc_logits(anchors, own, cfg.tau), present, reduction="sum")
        if cfg.cross_supervision:
            term = term + F.cross_entropy(csc_logits(anchors, other, cfg.tau), present, reduction="sum")
        return term / present.numel()

    loss = cfg.csc_weight * (view_term(r1, p1, p2) + view_term(r2, p2, p1)) / 2
    return finish(loss, dist_ctx), new1, new2


# ------------------------------------------------------------------------------------------
# The switch
# ------------------------------------------------------------------------------------------
FORMULATIONS = {
    "code": (rsc_loss, csc_loss, psc_loss),               # the authors' code (published numbers)
    "paper": (rsc_loss_paper, csc_loss_paper, psc_loss),  # eq. 3-13 (PSC: see the module docstring)
}


def hsc_losses(formulation: str):
    """(rsc, csc, psc) loss functions of `loss.formulation`."""
    if formulation not in FORMULATIONS:
        raise ConfigError(f"loss.formulation: {formulation!r} is not one of {', '.join(FORMULATIONS)}")
    return FORMULATIONS[formulation]
