"""Fused masked-mean ROI pooling with L2 normalisation (RSC's fg/bg region vectors).

Math (reference `hsc_fast.ops.roi_pool_reference`): for feats (N,D,P) and masks (N,K,P)
    v[n,k] = sum_p m[n,k,p] f[n,:,p] / (sum_p m[n,k,p] + count_eps),  out = v / max(||v||, norm_eps)
returned as float32 (N,K,D). Masks are constants (no gradient).

Forward: one program per image streams P in BLOCK_P chunks; each chunk does one
(K x P) @ (P x D) tl.dot into a float32 accumulator and adds the mask tile into a second,
un-reduced (K x P) accumulator that is summed once after the loop (a loop-carried
`counts += tl.sum(m, 1)` whose result is used twice trips Triton's OptimizeThreadLocality pass
on sm_80/sm_90: ``loopResult.hasOneUse()``); then it divides, normalises and stores out, ||v||
and the counts (kept for backward) -- one read of feats.
Backward: grid (N, P-chunks); each program rebuilds dL/dv from (out, grad, ||v||) for its image
(a K x D block, cheap), scales by 1/(count + eps) and writes dL/df = ds^T @ m for its chunk in
feats' dtype -- one read of masks, one write of dL/df, no atomics (deterministic).
Masks in {0,1} make the products exact, so float32 "ieee" dots give the reference to round-off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Target, check_float, check_runnable, launch, next_pow2, row_major, target_of


@triton.jit
def _roi_pool_fwd_kernel(f_ptr, m_ptr, out_ptr, norm_ptr, count_ptr,
                         K, D, P, sf_n, sf_d, sm_n, sm_k, count_eps, norm_eps,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    mask_sum = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = tl.load(m_ptr + n * sm_n + k[:, None] * sm_k + p[None, :],
                    mask=(k[:, None] < K) & (p[None, :] < P), other=0.0).to(tl.float32)
        # feats chunk read as (P, D) so the dot needs no transpose.
        f = tl.load(f_ptr + n * sf_n + d[None, :] * sf_d + p[:, None],
                    mask=(d[None, :] < D) & (p[:, None] < P), other=0.0).to(tl.float32)
        acc += tl.dot(m, f, input_precision="ieee")
        mask_sum += m
    counts = tl.sum(mask_sum, axis=1)
    v = acc / (counts + count_eps)[:, None]
    norm = tl.sqrt(tl.sum(v * v, axis=1))
    out = v / tl.maximum(norm, norm_eps)[:, None]
    kmask = k < K
    tl.store(out_ptr + n * K * D + k[:, None] * D + d[None, :], out,
             mask=kmask[:, None] & (d[None, :] < D))
    tl.store(norm_ptr + n * K + k, norm, mask=kmask)
    tl.store(count_ptr + n * K + k, counts, mask=kmask)


@triton.jit
def _roi_pool_bwd_kernel(grad_ptr, out_ptr, norm_ptr, count_ptr, m_ptr, df_ptr,
                         K, D, P, sg_n, sg_k, sm_n, sm_k, count_eps, norm_eps,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    kmask = k < K
    # Everything per region is held transposed, (D, K), so that dL/df = ds^T @ m is one dot.
    kd_mask = (d[:, None] < D) & kmask[None, :]
    y = tl.load(out_ptr + n * K * D + k[None, :] * D + d[:, None], mask=kd_mask, other=0.0)
    g = tl.load(grad_ptr + n * sg_n + k[None, :] * sg_k + d[:, None], mask=kd_mask,
                other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + n * K + k, mask=kmask, other=1.0)
    counts = tl.load(count_ptr + n * K + k, mask=kmask, other=0.0)
    # out = v / max(||v||, eps): the radial part of g is removed unless the norm was clamped.
    radial = tl.sum(y * g, axis=0)
    unclamped = (norm > norm_eps)[None, :]
    dv = tl.where(unclamped, g - y * radial[None, :], g) / tl.maximum(norm, norm_eps)[None, :]
    ds = dv / (counts + count_eps)[None, :]
    m = tl.load(m_ptr + n * sm_n + k[:, None] * sm_k + p[None, :],
                mask=kmask[:, None] & (p[None, :] < P), other=0.0).to(tl.float32)
    df = tl.dot(ds, m, input_precision="ieee")
    tl.store(df_ptr + n * D * P + d[:, None] * P + p[None, :], df.to(df_ptr.dtype.element_ty),
             mask=(d[:, None] < D) & (p[None, :] < P))


def launch_config(k: int, d: int, p: int, target: Target, backward: bool = False) -> dict:
    """Block sizes and warps; tl.dot needs every block dim >= 16. The interpreter pays per
    program: few, big programs. On a GPU, 8 warps with 32-pixel chunks in the forward (its float32
    "ieee" dot keeps the feature chunk in registers: 64-pixel chunks spilled 250-580 B per thread
    for bf16 features on sm_80/sm_90) and 64 in the backward; measured with kernels.aot: no
    spills at D = 128 and 256, float32 and bf16, on both targets."""
    block_k, block_d = next_pow2(k, 16), next_pow2(d, 16)
    if target.interpreter:
        return dict(BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_P=min(next_pow2(p, 16), 4096), num_warps=4)
    block_p = (64 if backward else 32) if block_d <= 256 else 16
    return dict(BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_P=block_p, num_warps=8)


def roi_pool_forward(feats: torch.Tensor, masks: torch.Tensor, count_eps: float, norm_eps: float):
    """Launch the forward kernel: feats (N,D,P) and masks (N,K,P) with unit stride on P ->
    (out (N,K,D), norms (N,K), counts (N,K)), all float32."""
    n, d, p = feats.shape
    k = masks.shape[1]
    meta = launch_config(k, d, p, target_of(feats.device))
    out = torch.zeros((n, k, d), device=feats.device, dtype=torch.float32)
    norms = torch.zeros((n, k), device=feats.device, dtype=torch.float32)
    counts = torch.zeros_like(norms)
    launch(_roi_pool_fwd_kernel, (n,), feats, masks, out, norms, counts, k, d, p, feats.stride(0),
           feats.stride(1), masks.stride(0), masks.stride(1), count_eps, norm_eps, **meta)
    return out, norms, counts


def roi_pool_backward(grad_out, masks, out, norms, counts, feats_shape, feats_dtype, count_eps, norm_eps):
    """Launch the backward kernel -> dL/dfeats (N,D,P) in the features' dtype."""
    n, d, p = feats_shape
    k = masks.shape[1]
    grad_out = row_major(grad_out)
    meta = launch_config(k, d, p, target_of(out.device), backward=True)
    dfeats = torch.empty((n, d, p), device=out.device, dtype=feats_dtype)  # every element written
    launch(_roi_pool_bwd_kernel, (n, triton.cdiv(p, meta["BLOCK_P"])), grad_out, out, norms, counts, masks,
           dfeats, k, d, p, grad_out.stride(0), grad_out.stride(1), masks.stride(0), masks.stride(1),
           count_eps, norm_eps, **meta)
    return dfeats


class RoiPoolFunction(torch.autograd.Function):
    """(N,K,D) float32 normalised masked means; gradient to feats only."""

    @staticmethod
    def forward(ctx, feats, masks, count_eps, norm_eps):
        out, norms, counts = roi_pool_forward(feats, masks, count_eps, norm_eps)
        ctx.save_for_backward(masks, out, norms, counts)
        ctx.meta = (tuple(feats.shape), feats.dtype, count_eps, norm_eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        masks, out, norms, counts = ctx.saved_tensors
        shape, dtype, count_eps, norm_eps = ctx.meta
        return roi_pool_backward(grad_out, masks, out, norms, counts, shape, dtype, count_eps, norm_eps), None, None, None


def prepare_inputs(feats: torch.Tensor, masks: torch.Tensor):
    """What the kernels read: float masks without gradient, unit stride on P for both."""
    check_runnable("roi_pool", feats, masks)
    check_float("roi_pool", "feats", feats)
    masks = masks.detach()
    if not masks.is_floating_point():
        masks = masks.float()
    return row_major(feats), row_major(masks)


def roi_pool_triton(feats, masks, count_eps=1e-5, norm_eps=1e-5):
    """Triton twin of `hsc_fast.ops.roi_pool_reference` (shapes validated by the dispatcher
    `hsc_fast.ops.roi_pool`): feats (N,D,P), masks (N,K,P) -> float32 (N,K,D)."""
    feats, masks = prepare_inputs(feats, masks)
    return RoiPoolFunction.apply(feats, masks, float(count_eps), float(norm_eps))
