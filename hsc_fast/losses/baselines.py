"""Baseline terms the HSC recipe builds on: SEAM (ER, ECR, adaptive min-pooling), EPS (saliency
loss) and PPC (pixel-to-prototype contrast), as the authors' code (and PPC's, usr922/wseg)
computes them with the background as the LAST CAM channel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hsc_fast import ops
from hsc_fast.ops import upcast
from hsc_fast.precision import fp32_losses
from hsc_fast.losses.cam import CAM_EPS, label_with_bg, resize_to


# ------------------------------------------------------------------------------------------
# SEAM
# ------------------------------------------------------------------------------------------
def seam_max_norm(cam: torch.Tensor, eps: float = CAM_EPS) -> torch.Tensor:
    """SEAM's 4-D max_norm: relu(relu(x) - min - eps) / (max - min + eps) per image and channel
    (with gradient, through max and min as well)."""
    x = F.relu(cam)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    hi = torch.max(flat, dim=-1)[0][..., None, None]
    lo = torch.min(flat, dim=-1)[0][..., None, None]
    return F.relu(x - lo - eps) / (hi - lo + eps)


def max_onehot(x: torch.Tensor, fixed: bool = False) -> torch.Tensor:
    """Zero the non-maximal channels of a (detached) normalised CAM.

    Official (fixed=False): SEAM's bg-FIRST helper applied to the bg-LAST layout, so channel 0
    (aeroplane) is kept as if it were the background and the maximum runs over channels 1..K
    (background included). fixed=True keeps the real background (the last channel K) and takes
    the maximum over the K foreground channels.
    """
    x = x.detach().clone()
    part = x[:, :-1] if fixed else x[:, 1:]
    top = part.max(dim=1, keepdim=True)[0]
    part[part != top] = 0
    return x


@fp32_losses
def adaptive_min_pooling_loss(cam_rv: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean of the ReLU'd lowest quarter of the per-pixel channel maxima of (cam_rv * label)'s
    K foreground channels."""
    x = (cam_rv * label_with_bg(label).to(cam_rv.dtype))[:, :-1]
    n, _, h, w = x.shape
    k = h * w // 4
    lowest = torch.topk(x.max(dim=1)[0].reshape(n, -1), k=k, dim=-1, largest=False)[0]
    return F.relu(lowest).sum() / (k * n)


@fp32_losses
def seam_er_ecr(cam1, cam2, cam_rv1, cam_rv2, label, onehot_fixed: bool = False):
    """SEAM's equivariant regularisation (ER) and equivariant cross regularisation (ECR).
    View 1 maps are resized (bilinear, align_corners) to view 2's size. Returns (er, ecr)."""
    hw = tuple(cam2.shape[-2:])
    lab = label_with_bg(label).to(cam1.dtype)
    c1 = resize_to(seam_max_norm(cam1), hw) * lab
    c2 = seam_max_norm(cam2) * lab
    er = (c1[:, :-1] - c2[:, :-1]).abs().mean()

    def with_bg(c):  # bg channel = 1 - max foreground (for the one-hot targets only)
        c = c.detach().clone()
        c[:, -1] = 1 - c[:, :-1].max(dim=1)[0]
        return c

    rv1 = resize_to(seam_max_norm(cam_rv1), hw) * lab
    rv2 = seam_max_norm(cam_rv2) * lab
    n, c, h, w = rv2.shape
    k = int(c * h * w * 0.2)
    diff1 = (max_onehot(with_bg(c2), onehot_fixed) - rv1).abs().reshape(n, -1)
    diff2 = (max_onehot(with_bg(c1), onehot_fixed) - rv2).abs().reshape(n, -1)
    ecr = torch.topk(diff1, k=k, dim=-1)[0].mean() + torch.topk(diff2, k=k, dim=-1)[0].mean()
    return er, ecr


# ------------------------------------------------------------------------------------------
# EPS
# ------------------------------------------------------------------------------------------
@fp32_losses
def eps_saliency_loss(cam: torch.Tensor, saliency: torch.Tensor, label: torch.Tensor,
                      tau: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
    """EPS: the saliency map predicted from the CAM (softmax; foreground = classes whose
    predicted region overlaps the saliency by IoU-like ratio > tau, the others count as
    background) against the given saliency (nearest-resized to the CAM size), MSE."""
    n, c, h, w = cam.shape
    sal = F.interpolate(upcast(saliency), size=(h, w))          # nearest, as the official code
    probs = F.softmax(upcast(cam), dim=1)
    fg_probs = probs[:, :-1]
    with torch.no_grad():
        hard = torch.round(fg_probs)
        overlap = (hard * torch.round(sal)).flatten(2).sum(-1) / (hard + 1e-4).flatten(2).sum(-1)
        present = label.bool()
        valid = present & (overlap > tau)
        fg_sel = valid.to(probs.dtype)[..., None, None]
        bg_sel = (present & ~valid).to(probs.dtype)[..., None, None]
    fg_map = (fg_probs * fg_sel).sum(dim=1, keepdim=True)
    bg_map = (fg_probs * bg_sel).sum(dim=1, keepdim=True) + probs[:, -1:]
    predicted = fg_map * alpha + (1 - bg_map) * (1 - alpha)
    return F.mse_loss(predicted, sal)


# ------------------------------------------------------------------------------------------
# PPC
# ------------------------------------------------------------------------------------------
PPC_NEG_SKIP, PPC_NEG_TAKE = 3, 10     # semi-hard prototypes: similarity ranks 3..12
PPC_HARD_FRACTION = 0.6                # hard pixels: ranks [0.6L - L//2, 0.6L) of lowest similarity


def ppc_intra(e: torch.Tensor, protos: torch.Tensor, y: torch.Tensor, tau: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PPC's intra-view term with semi-hard prototype mining and hard pixel sampling.

    e (M,D) unit embeddings, protos (21,D), y (M,). Per pixel: positive = own-class prototype,
    negatives = the prototypes ranked 3..12 by similarity. Per class present in y with L >= 2
    pixels: L//2 random pixels plus the L//2 pixels ending at rank int(0.6 L) of lowest positive
    similarity; mean InfoNCE over them. Summed over those classes / number of classes present.
    """
    logits = e @ protos.t() / tau                                  # (M,21)
    pos = logits.gather(1, y[:, None]).squeeze(1)
    with torch.no_grad():
        neg_idx = torch.topk(logits, k=PPC_NEG_SKIP + PPC_NEG_TAKE, dim=1)[1][:, PPC_NEG_SKIP:]
    denom_logits = torch.cat([pos[:, None], logits.gather(1, neg_idx)], dim=1)
    per_pixel = torch.logsumexp(denom_logits, dim=1) - pos
    similarity = (pos.detach() * tau + 1) / 2
    total = per_pixel.sum() * 0.0
    classes = torch.unique(y)
    for c in classes.tolist():
        idx = torch.nonzero(y == c).flatten()
        n_c = idx.numel()
        if n_c < 2:
            continue
        half = n_c // 2
        rand = idx[torch.randperm(n_c, generator=generator, device="cpu")[:half].to(idx.device)]
        k_low = int(n_c * PPC_HARD_FRACTION)
        low = torch.topk(similarity[idx], k=k_low, largest=False)[1][k_low - half:]
        total = total + per_pixel[torch.cat([rand, idx[low]])].mean()
    return total / max(classes.numel(), 1)


@fp32_losses
def ppc_loss(cam1, f1, cam2, f2, y1, y2, cfg, impl="auto", generator=None) -> torch.Tensor:
    """PPC: cross-prototype + cross-label InfoNCE (PSC's first two terms) and the mined
    intra-view term, weighted by cfg.ppc_weight. cam = normalised CAMs at the contrast size."""
    from hsc_fast.losses.hsc import class_vectors, flatten_channels, flatten_pixels
    with torch.no_grad():
        p1 = class_vectors(flatten_channels(upcast(cam1)), flatten_pixels(upcast(f1.detach())), cfg.psc_topk, impl=impl)
        p2 = class_vectors(flatten_channels(upcast(cam2)), flatten_pixels(upcast(f2.detach())), cfg.psc_topk, impl=impl)
    e1, e2 = flatten_pixels(f1), flatten_pixels(f2)
    y1f, y2f = y1.reshape(-1), y2.reshape(-1)
    terms = ops.psc_terms(e1, e2, y1f, y2f, p1, p2, p1, p2, tau=cfg.tau, impl=impl)
    u1, u2 = ops.l2_normalize(upcast(e1)), ops.l2_normalize(upcast(e2))
    intra = (ppc_intra(u1, p1, y1f, cfg.tau, generator) + ppc_intra(u2, p2, y2f, cfg.tau, generator)) / 2
    return cfg.ppc_weight * (terms[0] + terms[1] + intra)
