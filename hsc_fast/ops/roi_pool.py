"""roi_pool(feats (N,D,P), masks (N,K,P)) -> (N,K,D): masked mean, L2-normalised (RSC).

Spec in hsc_fast.ops; kernel: kernels/roi_pool.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hsc_fast.ops.check import Probe
from hsc_fast.ops.dispatch import LossInputError, check_dims, dispatch, l2_normalize, upcast


def roi_pool_reference(feats, masks, count_eps=1e-5, norm_eps=1e-5):
    feats = upcast(feats)
    masks = upcast(masks.detach())
    summed = torch.einsum("nkp,ndp->nkd", masks, feats)
    counts = masks.sum(dim=-1, keepdim=True)
    return l2_normalize(summed / (counts + count_eps), dim=-1, eps=norm_eps)


def roi_pool(feats, masks, *, count_eps=1e-5, norm_eps=1e-5, impl="auto"):
    """Masked mean of feats (N,D,P) under masks (N,K,P), L2-normalised -> (N,K,D)."""
    check_dims("roi_pool", feats=(feats, 3), masks=(masks, 3))
    if feats.shape[0] != masks.shape[0] or feats.shape[2] != masks.shape[2]:
        raise LossInputError(f"roi_pool: feats {tuple(feats.shape)} and masks {tuple(masks.shape)} "
                         "must agree on N and P")
    fn = dispatch("roi_pool", "roi_pool.roi_pool_triton", impl, feats, feats.shape[1], roi_pool_reference, PROBE)
    return fn(feats, masks, count_eps, norm_eps)


# Self-check (hsc_fast.ops.check): a small, awkward input for this op
def _roi_pool_probe(dtype, dim, device, g):
    """2 images x 37 pixels, bg/fg masks with one empty region."""
    feats = torch.randn(2, dim, 37, generator=g).to(device=device, dtype=dtype)
    masks = F.one_hot(torch.randint(0, 2, (2, 37), generator=g), 2).permute(0, 2, 1).float()
    masks[1, 0] = 0.0
    masks = masks.to(device)
    return [feats], lambda fn, f: fn(f, masks, 1e-5, 1e-5)


PROBE = Probe(_roi_pool_probe)
