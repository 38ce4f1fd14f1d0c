"""Reference primitives of the HSC losses and their kernel dispatch.

These PyTorch functions are the single source of truth for the math of the fused Triton kernels
in `kernels/` (which must match them to float32 round-off). Each takes `impl`:
  "torch"  -> the reference below;
  "triton" -> `kernels.<op>.<op>_triton` (imported lazily; runs on CPU under TRITON_INTERPRET=1);
              on CUDA it is self-checked first (`hsc_fast.kernel_check`) and a failure raises;
  "auto"   -> Triton when the input is on CUDA and triton imports and the kernel passed its
              self-check for this (dtype, feature dim, arch); else the reference (with one warning,
              recorded for the run's env.json). HSC_AUTO_TRITON_CPU=1 lets "auto" pick the kernels
              for CPU tensors under the interpreter (tests of the fallback).

The references compute in float32 (float64 inputs stay float64, for gradcheck); the losses
are tiny next to the network, and bf16 here would cost accuracy for no speed.

roi_pool(feats (N,D,P), masks (N,K,P)) -> (N,K,D)
    v = sum_p m*f / (sum_p m + count_eps);  out = v / max(||v||_2, norm_eps)
    (the official RSC form: masked mean with +1e-5 on the count, then F.normalize(eps=1e-5)).
    An empty mask gives v = 0 and out = 0. Gradient: to feats; masks are constants.

topk_proto(scores (C,M), feats (M,D), k) -> (C,D)
    For each row c take the top-max(k, k_denom) candidates by score (k and k_denom clipped to M),
    ordered by score descending and, among equal scores, by LOWER column index first (what a
    stable descending sort gives; `stable_topk`). The tie rule is fixed so that a batch split
    over ranks selects exactly the pixels one process would (prototypes.global_topk_sums).
    num = sum over the top-k of s*f; den = sum over the top-k_denom of s
    (k_denom defaults to k). proto = num / den, then v / max(||v||, 1e-12) if normalize
    (F.normalize's default eps, as the official CSC/PSC code). A row whose den is exactly 0
    (e.g. all-zero scores) uses den = 1, so it yields num (zero for all-zero scores) and, after
    normalisation, the zero vector: finite where the official code gives NaN.
    Gradient: to feats; scores are constants (the losses pass detached CAM scores).

psc_terms(f1, f2 (M,D), y1, y2 (M,) int64 in 0..20, p1, p2, m1, m2 (21,D)) -> (4,)
    e = f / max(||f||, 1e-12) per pixel; nce(e, P, y) = mean_i [logsumexp_k(e_i.P_k/tau) - e_i.P_{y_i}/tau]
    [cross_proto, cross_label, intra, memory] =
      [(nce(e1,p2,y1) + nce(e2,p1,y2))/2, (nce(e1,p1,y2) + nce(e2,p2,y1))/2,
       (nce(e1,p1,y1) + nce(e2,p2,y2))/2, (nce(e1,m1,y1) + nce(e2,m2,y2))/2]
    equal to the official -log(exp(pos)/sum exp) wherever that is finite (log-sum-exp is stable
    where the official form overflows). Gradient: to f1 and f2 only; p/m banks are constants.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F

from .errors import ConfigError, HscError

IMPLS = ("auto", "triton", "torch")


class LossInputError(HscError, ValueError):
    """A loss or primitive got tensors of the wrong shape (the message names the argument)."""
PROTO_NORM_EPS = 1e-12  # F.normalize default, as the official CSC/PSC prototypes
EMBED_NORM_EPS = 1e-12  # F.normalize default, as the official PSC pixel embeddings


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return True


def _interpreted_cpu_allowed(tensor: torch.Tensor) -> bool:
    return (tensor.device.type == "cpu" and os.environ.get("HSC_AUTO_TRITON_CPU", "") == "1"
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


def use_triton(impl: str, tensor: torch.Tensor) -> bool:
    """Decide the implementation before any self-check: see the module docstring."""
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    if impl == "auto":
        return (tensor.is_cuda or _interpreted_cpu_allowed(tensor)) and triton_available()
    raise ConfigError(f"loss.impl: {impl!r} is not one of {', '.join(IMPLS)}")


def _import_kernel(kernel: str):
    module, function = kernel.rsplit(".", 1)
    return getattr(importlib.import_module(f"kernels.{module}"), function)


def _dispatch(op: str, kernel: str, impl: str, tensor: torch.Tensor, dim: int, reference):
    """The function serving this call: `kernels.<module>.<function>` (kernel = "module.function")
    when Triton is chosen and passes its self-check, else `reference`. Imported lazily: CPU-only
    users never import triton. Under "auto" a kernel that raises on a real call is recorded as
    failed and the call is served by the reference."""
    from . import kernel_check

    if not use_triton(impl, tensor):
        return reference
    try:
        fn = _import_kernel(kernel)
    except Exception as e:  # noqa: BLE001 - a broken triton install must not stop "auto"
        kernel_check.fail(op, tensor, dim, e, impl)
        return reference
    if not kernel_check.enabled(tensor):
        return fn
    if not kernel_check.usable(op, impl, tensor, dim, PROBES[op], fn, reference):
        return reference
    if impl == "triton":
        return fn

    def guarded(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded and warned about in kernel_check
            kernel_check.fail(op, tensor, dim, e, impl)
            return reference(*args)
    return guarded


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float64 stays (gradcheck), everything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||_2, eps) along `dim` (F.normalize, named for readability)."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


# ------------------------------------------------------------------------------------------
# roi_pool
# ------------------------------------------------------------------------------------------
def roi_pool_reference(feats, masks, count_eps=1e-5, norm_eps=1e-5):
    feats = upcast(feats)
    masks = upcast(masks.detach())
    summed = torch.einsum("nkp,ndp->nkd", masks, feats)
    counts = masks.sum(dim=-1, keepdim=True)
    return l2_normalize(summed / (counts + count_eps), dim=-1, eps=norm_eps)


def roi_pool(feats, masks, *, count_eps=1e-5, norm_eps=1e-5, impl="auto"):
    """Masked mean of feats (N,D,P) under masks (N,K,P), L2-normalised -> (N,K,D)."""
    _check_dims("roi_pool", feats=(feats, 3), masks=(masks, 3))
    if feats.shape[0] != masks.shape[0] or feats.shape[2] != masks.shape[2]:
        raise LossInputError(f"roi_pool: feats {tuple(feats.shape)} and masks {tuple(masks.shape)} "
                         "must agree on N and P")
    fn = _dispatch("roi_pool", "roi_pool.roi_pool_triton", impl, feats, feats.shape[1], roi_pool_reference)
    return fn(feats, masks, count_eps, norm_eps)


# ------------------------------------------------------------------------------------------
# topk_proto
# ------------------------------------------------------------------------------------------
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
    _check_dims("topk_proto", scores=(scores, 2), feats=(feats, 2))
    if scores.shape[1] != feats.shape[0]:
        raise LossInputError(f"topk_proto: scores {tuple(scores.shape)} and feats {tuple(feats.shape)} "
                         "must agree on M")
    if int(k) < 1 or (k_denom is not None and int(k_denom) < 1):
        raise LossInputError(f"topk_proto: k={k}, k_denom={k_denom} must be >= 1")
    fn = _dispatch("topk_proto", "topk_proto.topk_proto_triton", impl, feats, feats.shape[1], topk_proto_reference)
    return fn(scores, feats, int(k), None if k_denom is None else int(k_denom), bool(normalize), PROTO_NORM_EPS)


# ------------------------------------------------------------------------------------------
# psc_terms
# ------------------------------------------------------------------------------------------
def nce_rows(emb, protos, labels, tau):
    """Per-row -log softmax(emb @ protos.T / tau)[label], via log-sum-exp."""
    logits = emb @ protos.t() / tau
    return torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)


def psc_terms_reference(f1, f2, y1, y2, p1, p2, m1, m2, tau=0.1, norm_eps=EMBED_NORM_EPS):
    e1 = l2_normalize(upcast(f1), dim=-1, eps=norm_eps)
    e2 = l2_normalize(upcast(f2), dim=-1, eps=norm_eps)
    p1, p2, m1, m2 = (upcast(t.detach()) for t in (p1, p2, m1, m2))

    def nce(e, protos, y):
        return nce_rows(e, protos, y, tau).mean()

    cross_proto = (nce(e1, p2, y1) + nce(e2, p1, y2)) / 2
    cross_label = (nce(e1, p1, y2) + nce(e2, p2, y1)) / 2
    intra = (nce(e1, p1, y1) + nce(e2, p2, y2)) / 2
    memory = (nce(e1, m1, y1) + nce(e2, m2, y2)) / 2
    return torch.stack([cross_proto, cross_label, intra, memory])


def psc_terms(f1, f2, y1, y2, p1, p2, m1, m2, *, tau=0.1, impl="auto"):
    """The four PSC InfoNCE terms (4,): [cross_proto, cross_label, intra, memory]."""
    _check_dims("psc_terms", f1=(f1, 2), f2=(f2, 2), y1=(y1, 1), y2=(y2, 1),
                p1=(p1, 2), p2=(p2, 2), m1=(m1, 2), m2=(m2, 2))
    if f1.shape != f2.shape or y1.shape[0] != f1.shape[0] or y2.shape[0] != f1.shape[0]:
        raise LossInputError(f"psc_terms: f1 {tuple(f1.shape)}, f2 {tuple(f2.shape)}, y1 {tuple(y1.shape)}, "
                         f"y2 {tuple(y2.shape)} must share M (and D)")
    for name, t in (("p1", p1), ("p2", p2), ("m1", m1), ("m2", m2)):
        if t.shape != p1.shape or t.shape[1] != f1.shape[1]:
            raise LossInputError(f"psc_terms: {name} {tuple(t.shape)} must be (C, {f1.shape[1]}) like p1")
    if f1.shape[0] == 0:
        raise LossInputError("psc_terms: no pixels (M = 0): the per-pixel means are undefined")
    fn = _dispatch("psc_terms", "psc.psc_terms_triton", impl, f1, f1.shape[1], psc_terms_reference)
    return fn(f1, f2, y1.long(), y2.long(), p1, p2, m1, m2, float(tau), EMBED_NORM_EPS)


def _check_dims(op: str, **named):
    for name, (t, ndim) in named.items():
        if t.dim() != ndim:
            raise LossInputError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


# ------------------------------------------------------------------------------------------
# Self-check probes (hsc_fast.kernel_check): small, awkward inputs per op
# ------------------------------------------------------------------------------------------
def _roi_pool_probe(dtype, dim, device, g):
    """2 images x 37 pixels, bg/fg masks with one empty region."""
    feats = torch.randn(2, dim, 37, generator=g).to(device=device, dtype=dtype)
    masks = F.one_hot(torch.randint(0, 2, (2, 37), generator=g), 2).permute(0, 2, 1).float()
    masks[1, 0] = 0.0
    masks = masks.to(device)
    return [feats], lambda fn, f: fn(f, masks, 1e-5, 1e-5)


def _topk_proto_probe(dtype, dim, device, g):
    """3 rows x 300 candidates with ties straddling the cut, k 16 / k_denom 40, normalised."""
    scores = (torch.rand(3, 300, generator=g) * 4).round() / 4
    scores[2] = 0.1
    scores = scores.to(device=device, dtype=dtype)
    feats = torch.randn(300, dim, generator=g).to(device=device, dtype=dtype)
    return [feats], lambda fn, f: fn(scores, f, 16, 40, True, PROTO_NORM_EPS)


def _psc_terms_probe(dtype, dim, device, g):
    """97 pixels per view (odd), 21 classes, normalised prototypes, raw banks."""
    f1 = torch.randn(97, dim, generator=g).relu().to(device=device, dtype=dtype)
    f2 = torch.randn(97, dim, generator=g).to(device=device, dtype=dtype)
    y1, y2 = (torch.randint(0, 21, (97,), generator=g).to(device) for _ in range(2))
    p1, p2 = (l2_normalize(torch.randn(21, dim, generator=g)).to(device) for _ in range(2))
    m1, m2 = (torch.randn(21, dim, generator=g).to(device) for _ in range(2))
    return [f1, f2], lambda fn, a, b: fn(a, b, y1, y2, p1, p2, m1, m2, 0.1, EMBED_NORM_EPS)


def _probes() -> dict:
    from .kernel_check import Probe
    return {"roi_pool": Probe(_roi_pool_probe), "topk_proto": Probe(_topk_proto_probe),
            "psc_terms": Probe(_psc_terms_probe)}


PROBES = _probes()
