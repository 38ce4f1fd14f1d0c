"""Reference primitives of the HSC losses and their kernel dispatch.

These PyTorch functions are the single source of truth for the math of the fused Triton kernels
in `kernels/` (which must match them to float32 round-off). Each takes `impl`:
  "torch"  -> the reference below;
  "triton" -> `kernels.<op>.<op>_triton` (imported lazily; runs on CPU under TRITON_INTERPRET=1);
Layout: hsc_fast/ops/<op>.py holds the torch reference, the shape checks and the dispatch of
kernels/<op>.py (roi_pool, topk_proto, psc); hsc_fast/ops/dispatch.py what they share.
              on CUDA it is self-checked first (`hsc_fast.ops.check`) and a failure raises;
  "auto"   -> Triton when the input is on CUDA and triton imports and the kernel passed its
              self-check for this (dtype, feature dim, arch, kernel variant); else the reference (with one warning,
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

psc_terms(f1, f2 (M,D), y1, y2 (M,) int64 in 0..C-1, p1, p2, m1, m2 (C,D)) -> (4,)
    (C = the class set's foreground + background: 21 for VOC, 81 for MS COCO)
    e = f / max(||f||, 1e-12) per pixel; nce(e, P, y) = mean_i [logsumexp_k(e_i.P_k/tau) - e_i.P_{y_i}/tau]
    [cross_proto, cross_label, intra, memory] =
      [(nce(e1,p2,y1) + nce(e2,p1,y2))/2, (nce(e1,p1,y2) + nce(e2,p2,y1))/2,
       (nce(e1,p1,y1) + nce(e2,p2,y2))/2, (nce(e1,m1,y1) + nce(e2,m2,y2))/2]
    equal to the official -log(exp(pos)/sum exp) wherever that is finite (log-sum-exp is stable
    where the official form overflows). Gradient: to f1 and f2 only; p/m banks are constants.
"""
from __future__ import annotations

from hsc_fast.ops.dispatch import (IMPLS, LossInputError, check_dims, dispatch, import_kernel, l2_normalize,  # noqa: F401
                                   triton_available, upcast, use_triton)
from hsc_fast.ops.psc import PROBE as _PSC_PROBE
from hsc_fast.ops.psc import EMBED_NORM_EPS, nce_rows, psc_terms, psc_terms_reference  # noqa: F401
from hsc_fast.ops.psc import variant as psc_variant  # noqa: F401
from hsc_fast.ops.roi_pool import PROBE as _ROI_POOL_PROBE
from hsc_fast.ops.roi_pool import roi_pool, roi_pool_reference  # noqa: F401
from hsc_fast.ops.topk_proto import PROBE as _TOPK_PROTO_PROBE
from hsc_fast.ops.topk_proto import PROTO_NORM_EPS, stable_topk, topk_proto, topk_proto_reference  # noqa: F401

# The package attributes roi_pool / topk_proto are the functions (they shadow their submodules,
# which stay importable as hsc_fast.ops.roi_pool etc. through sys.modules).
# op name -> self-check probe (hsc-doctor runs every op through these)
PROBES = {"roi_pool": _ROI_POOL_PROBE, "topk_proto": _TOPK_PROTO_PROBE, "psc_terms": _PSC_PROBE}
