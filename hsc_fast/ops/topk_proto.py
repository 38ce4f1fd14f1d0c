"""topk_proto(scores (C,M), feats (M,D), k) -> (C,D): score-weighted top-k prototypes (CSC, PSC).

Spec in hsc_fast.ops; kernel: kernels/topk_proto.py."""
from __future__ import annotations

import torch

from hsc_fast.ops.check import Probe
from hsc_fast.ops.dispatch import LossInputError, check_dims, dispatch, l2_normalize, upcast
PROTO_NORM_EPS = 1e-12  # F.normalize default, as the official CSC/PSC prototypes


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, index) of each row's top-k of scores (C,M), k <= M: the first k columns of
    `torch.sort(scores, descending=True, stable=True)` -- score descending, equal scores by
    lower column index -- without sorting all M (a full stable sort of 21 x 200k is ~35x
    slower than topk on a CPU). torch.topk finds the k-th value; only rows where ties straddle
    that cut (more than k scores >= it) pick their tied columns again, lowest indices first."""
    values, index = torch.topk(scores, k, dim=1)
    kth = values[:, -1:]
    straddling = ((scores >= kth).sum(dim=1) > k).nonzero().flatten()
    if straddling.numel():
        rows, cut = scores[straddling], kth[straddling]
        above, tied = rows > cut, rows == cut
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= room))
        index[straddling] = take.nonzero()[:, 1].view(-1, k)  # row-major: ascending columns
    # the chosen set is right; now order it: ascending column, then a stable descending sort
    index = index.sort(dim=1).values
    values, order = scores.gather(1, index).sort(dim=1, descending=True, stable=True)
    return values, index.gather(1, order)


def topk_proto_reference(scores, feats, k, k_denom=None, normalize=True, norm_eps=PROTO_NORM_EPS):
    scores = upcast(scores.detach())
    feats = upcast(feats)
    m = scores.shape[1]
    k = min(int(k), m)
    k_denom = k if k_denom is None else min(int(k_denom), m)
    values, index = stable_topk(scores, max(k, k_denom))         # sorted, descending
    top_feats = feats[index[:, :k]]                              # (C,k,D)
    numer = (values[:, :k, None] * top_feats).sum(dim=1)
    denom = values[:, :k_denom].sum(dim=1, keepdim=True)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    proto = numer / denom
    return l2_normalize(proto, dim=-1, eps=norm_eps) if normalize else proto


def topk_proto(scores, feats, k, *, k_denom=None, normalize=True, impl="auto"):
    """Score-weighted mean of each row's top-k candidates -> (C,D); see the module docstring."""
    check_dims("topk_proto", scores=(scores, 2), feats=(feats, 2))
    if scores.shape[1] != feats.shape[0]:
        raise LossInputError(f"topk_proto: scores {tuple(scores.shape)} and feats {tuple(feats.shape)} "
                         "must agree on M")
    if int(k) < 1 or (k_denom is not None and int(k_denom) < 1):
        raise LossInputError(f"topk_proto: k={k}, k_denom={k_denom} must be >= 1")
    fn = dispatch("topk_proto", "topk_proto.topk_proto_triton", impl, feats, feats.shape[1], topk_proto_reference, PROBE)
    return fn(scores, feats, int(k), None if k_denom is None else int(k_denom), bool(normalize), PROTO_NORM_EPS)


# Self-check (hsc_fast.ops.check): a small, awkward input for this op
def _topk_proto_probe(dtype, dim, device, g):
    """3 rows x 300 candidates with ties straddling the cut, k 16 / k_denom 40, normalised."""
    scores = (torch.rand(3, 300, generator=g) * 4).round() / 4
    scores[2] = 0.1
    scores = scores.to(device=device, dtype=dtype)
    feats = torch.randn(300, dim, generator=g).to(device=device, dtype=dtype)
    return [feats], lambda fn, f: fn(scores, f, 16, 40, True, PROTO_NORM_EPS)


PROBE = Probe(_topk_proto_probe)
