"""Batch-wide top-k prototypes (CSC class vectors, PSC prototypes, bank updates).

Math (reference `hsc_fast.ops.topk_proto_reference`): per row c of scores (C,M), take the top
max(k, k_denom) candidates (both clipped to M), ordered by score descending, equal scores by
LOWER index first (a stable descending sort; the cross-rank top-k relies on this tie rule);
    proto = sum_{top-k} s*f / den,  den = sum_{top-k_denom} s  (den == 0 -> 1),
then v / max(||v||, 1e-12) if normalize. float32 (C,D) out; gradient to feats only.

Selection (M up to 16*112*112 = 200k per row, k up to a few hundred): block-wise top-k
candidates, then merge.
  1. Every score becomes one int64 sort key: the float's bits mapped to an order-preserving
     int32 (negative floats get their magnitude bits flipped; -0.0 counts as 0.0) in the high
     word, MAX_INDEX - pixel index in the low word, so that among equal scores the LOWER index
     has the larger key and comes first in the descending order. Keys are unique, so one sort
     orders scores and carries indices along.
  2. `_topk_chunk_kernel`, grid (C, chunks): each program bitonic-sorts a CHUNK of keys
     and keeps its best KEEP = max(k, k_denom) in a candidate buffer. The buffer is KEEP/CHUNK the
     size of its input; the same kernel runs again on it until one chunk holds a whole row
     (M = 200k, CHUNK 4096, KEEP 128: 49 chunks -> 6272 candidates -> one final chunk), so the
     last pass leaves each row's top KEEP, sorted.
  3. `_proto_kernel`, grid (C,): decodes the KEEP indices, gathers their scores and feature rows,
     reduces numerator and denominator in float32, normalises, stores (and keeps den and ||v||).
Backward `_proto_bwd_kernel`, grid (C,): dL/dv through the normalisation, then scatter-adds
s_i * dL/dv / den into the selected feature rows (float32 atomics: classes may share pixels, so
the order of the additions, and the last bits of dL/df, vary from run to run). Under
torch.use_deterministic_algorithms(True) the backward instead forms the (C, M) matrix of
selected scores and computes dL/df = S^T @ (dL/dv / den) with one matmul: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (Target, check_float, check_runnable, deterministic, launch, next_pow2, row_major,
                      target_of)
from hsc_fast.errors import HscError

MAX_KEEP = 1024           # largest max(k, k_denom) the chunked selection is sized for
PAD_KEY = tl.constexpr(-(2 ** 63))  # sorts after every real key
LARGEST_INDEX = 2 ** 31 - 1          # low word = LARGEST_INDEX - index: lower index, larger key
MAX_INDEX = tl.constexpr(LARGEST_INDEX)


@triton.jit
def _score_keys(scores, index):
    """Order-preserving int64 keys: (monotone int32 image of the float32 score,
    MAX_INDEX - index). -0.0 becomes +0.0 first: they compare equal, so they must tie."""
    scores = tl.where(scores == 0.0, 0.0, scores)
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (MAX_INDEX - index.to(tl.int64))


@triton.jit
def _key_index(keys):
    """The candidate's column in the scores row, from the low 32 bits of its key."""
    return MAX_INDEX - (keys - ((keys >> 32) << 32))


@triton.jit
def _compare_swap(x, desc, j: tl.constexpr, LOG_N: tl.constexpr):
    """One bitonic step: element p meets partner p ^ 2**j; within each pair the lower
    position keeps the larger key where `desc` is 1, the smaller where it is 0."""
    shape: tl.constexpr = [2 ** (LOG_N - j - 1), 2, 2 ** j]
    pairs = tl.reshape(x, shape)
    half = tl.arange(0, 2)[None, :, None]
    # Plain masked sums (one non-zero term each) pull the two partners side by side; they
    # are native reductions, fast in the interpreter unlike tl.sort's custom-combine ones.
    low = tl.broadcast_to(tl.sum(tl.where(half == 0, pairs, 0), axis=1)[:, None, :], shape)
    high = tl.broadcast_to(tl.sum(tl.where(half == 1, pairs, 0), axis=1)[:, None, :], shape)
    is_high = tl.broadcast_to(half, shape)
    low = tl.reshape(low, [2 ** LOG_N])
    high = tl.reshape(high, [2 ** LOG_N])
    is_high = tl.reshape(is_high, [2 ** LOG_N])
    take_big = (is_high == 1) != (desc == 1)
    return tl.where(take_big, tl.maximum(low, high), tl.minimum(low, high))


@triton.jit
def _bitonic_sort_desc(x, LOG_N: tl.constexpr):
    """Sorts a 1-D tensor of 2**LOG_N keys in descending order (bitonic network). Stage s
    sorts blocks of 2**s keys, alternating direction so pairs of blocks are bitonic for the
    next stage; the last stage (s = LOG_N) sorts everything descending."""
    pos = tl.arange(0, 2 ** LOG_N)
    for s in tl.static_range(1, LOG_N + 1):
        desc = 1 - ((pos >> s) & 1)
        for step in tl.static_range(s):
            x = _compare_swap(x, desc, s - 1 - step, LOG_N)
    return x


@triton.jit
def _topk_chunk_kernel(src_ptr, out_ptr, length, stride_src, stride_out, keep,
                       FROM_SCORES: tl.constexpr, CHUNK: tl.constexpr,
                       LOG_CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    pos = tl.arange(0, CHUNK)
    offs = chunk * CHUNK + pos
    valid = offs < length
    if FROM_SCORES:
        s = tl.load(src_ptr + row * stride_src + offs, mask=valid, other=0.0).to(tl.float32)
        keys = tl.where(valid, _score_keys(s, offs), PAD_KEY)
    else:
        keys = tl.load(src_ptr + row * stride_src + offs, mask=valid, other=PAD_KEY)
    best = _bitonic_sort_desc(keys, LOG_CHUNK)
    tl.store(out_ptr + row * stride_out + chunk * keep + pos, best, mask=pos < keep)


@triton.jit
def _proto_kernel(cand_ptr, scores_ptr, f_ptr, out_ptr, den_ptr, norm_ptr,
                  D, stride_cand, stride_s, stride_f, k, k_denom, keep, norm_eps,
                  NORMALIZE: tl.constexpr, BLOCK_KEEP: tl.constexpr, BLOCK_D: tl.constexpr,
                  ROWS: tl.constexpr):
    row = tl.program_id(0)
    r = tl.arange(0, BLOCK_KEEP)
    d = tl.arange(0, BLOCK_D)
    keys = tl.load(cand_ptr + row * stride_cand + r, mask=r < keep, other=MAX_INDEX)  # -> column 0
    idx = _key_index(keys)
    s = tl.load(scores_ptr + row * stride_s + idx, mask=r < keep, other=0.0).to(tl.float32)
    den = tl.sum(tl.where(r < k_denom, s, 0.0), axis=0)
    den = tl.where(den == 0.0, 1.0, den)
    # Numerator in slices of ROWS candidates: a (keep x D) tile would not fit in registers.
    v = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, k, ROWS):
        rr = r0 + tl.arange(0, ROWS)
        take = rr < k
        ii = _key_index(tl.load(cand_ptr + row * stride_cand + rr, mask=take, other=MAX_INDEX))
        ss = tl.load(scores_ptr + row * stride_s + ii, mask=take, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + ii[:, None] * stride_f + d[None, :],
                    mask=take[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        v += tl.sum(ss[:, None] * f, axis=0)
    v = v / den
    norm = tl.sqrt(tl.sum(v * v, axis=0))
    if NORMALIZE:
        v = v / tl.maximum(norm, norm_eps)
    tl.store(out_ptr + row * D + d, v, mask=d < D)
    tl.store(den_ptr + row, den)
    tl.store(norm_ptr + row, norm)


@triton.jit
def _proto_bwd_kernel(grad_ptr, out_ptr, cand_ptr, scores_ptr, den_ptr, norm_ptr, df_ptr,
                      D, stride_g, stride_cand, stride_s, k, norm_eps,
                      NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    g = tl.load(grad_ptr + row * stride_g + d, mask=dmask, other=0.0).to(tl.float32)
    if NORMALIZE:
        y = tl.load(out_ptr + row * D + d, mask=dmask, other=0.0)
        norm = tl.load(norm_ptr + row)
        radial = tl.sum(y * g, axis=0)
        g = tl.where(norm > norm_eps, g - y * radial, g) / tl.maximum(norm, norm_eps)
    dnum = g / tl.load(den_ptr + row)
    for r0 in range(0, k, ROWS):
        r = r0 + tl.arange(0, ROWS)
        take = r < k
        idx = _key_index(tl.load(cand_ptr + row * stride_cand + r, mask=take, other=MAX_INDEX))
        s = tl.load(scores_ptr + row * stride_s + idx, mask=take, other=0.0).to(tl.float32)
        tl.atomic_add(df_ptr + idx[:, None] * D + d[None, :], s[:, None] * dnum[None, :],
                      mask=take[:, None] & dmask[None, :])


def gather_rows(dim: int, target: Target) -> int:
    """Candidates per slice of the gather loops: ~8k float32 values in flight on a GPU; 16 in
    the interpreter, so that the CPU tests run the loop several times."""
    return 16 if target.interpreter else max(1, min(64, 8192 // next_pow2(dim)))


# Sort width on a GPU. ptxas time grows fast with the width of the fully unrolled bitonic network
# (measured with kernels.aot for sm_80: 4096 keys ~85 s, see benchmarks/results/aot-*.md), while a
# narrower sort only adds merge passes (each pass shrinks the data by width / keep).
GPU_SORT_WIDTH = 1024


def chunk_size(keep: int, length: int, target: Target) -> int:
    """Sort width: a power of two >= 4 * keep (each pass shrinks the data >= 4x), GPU_SORT_WIDTH
    on a GPU (16384 in the interpreter, fewer programs), never wider than the row needs."""
    base = 16384 if target.interpreter else GPU_SORT_WIDTH
    width = max(base, next_pow2(4 * keep))
    return min(width, max(next_pow2(length, 16), next_pow2(keep, 16)))


def sort_warps(chunk: int) -> int:
    return 8 if chunk >= 4096 else 4


def select_topk(scores: torch.Tensor, keep: int, width: int | None = None) -> torch.Tensor:
    """(C, keep) int64 keys of each row's top-`keep` scores, best first (see module docstring);
    `_key_index` / `key_index` turn them back into column indices. `width` (a power of two
    >= 2 * keep) overrides the sort width, so tests can drive several merge passes cheaply."""
    rows, length = scores.shape
    if width is not None and (width & (width - 1) or width < 2 * keep):
        raise HscError(f"select_topk: width={width} must be a power of two >= 2 * keep ({2 * keep})")
    if keep <= 0 or length == 0:
        return torch.empty((rows, 0), device=scores.device, dtype=torch.int64)
    target = target_of(scores.device)
    src, from_scores, stride = scores, True, scores.stride(0)
    while True:
        chunk = width if width is not None and width < length else chunk_size(keep, length, target)
        n_chunks = triton.cdiv(length, chunk)
        out = torch.empty((rows, n_chunks * keep), device=scores.device, dtype=torch.int64)
        launch(_topk_chunk_kernel, (rows, n_chunks), src, out, length, stride, out.stride(0), keep,
               FROM_SCORES=from_scores, CHUNK=chunk, LOG_CHUNK=chunk.bit_length() - 1,
               num_warps=sort_warps(chunk))
        if n_chunks == 1:
            return out
        src, from_scores, stride, length = out, False, out.stride(0), out.shape[1]


def key_index(keys: torch.Tensor) -> torch.Tensor:
    """Host-side twin of `_key_index` (for tests and debugging)."""
    return LARGEST_INDEX - (keys & 0xFFFFFFFF)


def topk_proto_forward(scores, feats, k: int, k_denom: int, normalize: bool, norm_eps: float):
    """Selection + prototype kernels -> (out (C,D), cand keys (C,keep), den (C,), ||v|| (C,))."""
    rows = scores.shape[0]
    dim = feats.shape[1]
    keep = max(k, k_denom)
    target = target_of(feats.device)
    cand = select_topk(scores, keep)
    out = torch.zeros((rows, dim), device=feats.device, dtype=torch.float32)
    den = torch.ones((rows,), device=feats.device, dtype=torch.float32)
    norm = torch.zeros_like(den)
    if keep > 0:
        launch(_proto_kernel, (rows,), cand, scores, feats, out, den, norm, dim, cand.stride(0),
               scores.stride(0), feats.stride(0), k, k_denom, keep, norm_eps,
               NORMALIZE=normalize, BLOCK_KEEP=next_pow2(keep, 16), BLOCK_D=next_pow2(dim, 16),
               ROWS=gather_rows(dim, target), num_warps=4)
    return out, cand, den, norm


def _normalize_backward(grad, out, norm, normalize: bool, norm_eps: float):
    """dL/dv from dL/d(v / max(||v||, eps)) (the radial part removed unless clamped)."""
    if not normalize:
        return grad
    radial = (out * grad).sum(dim=1, keepdim=True)
    unclamped = (norm > norm_eps)[:, None]
    return torch.where(unclamped, grad - out * radial, grad) / norm.clamp_min(norm_eps)[:, None]


def topk_proto_backward_deterministic(grad_out, out, cand, scores, den, norm, length, k, normalize, norm_eps):
    """dL/dfeats (M,D) float32 without atomics: S^T @ (dL/dv / den) with S (C,M) holding each
    row's top-k scores at their columns (distinct within a row, so scatter_ has no collisions)."""
    idx = key_index(cand[:, :k])
    selected = scores.gather(1, idx).float()
    dnum = _normalize_backward(grad_out.float(), out, norm, normalize, norm_eps) / den[:, None]
    weights = torch.zeros((scores.shape[0], length), device=scores.device, dtype=torch.float32)
    weights.scatter_(1, idx, selected)
    return weights.t() @ dnum


def topk_proto_backward(grad_out, out, cand, scores, den, norm, length, k, normalize, norm_eps):
    """dL/dfeats (M,D) float32: the atomic kernel, or the deterministic matmul when asked for."""
    dim = out.shape[1]
    if deterministic():
        return topk_proto_backward_deterministic(grad_out, out, cand, scores, den, norm, length, k,
                                                 normalize, norm_eps)
    grad_out = row_major(grad_out)
    dfeats = torch.zeros((length, dim), device=out.device, dtype=torch.float32)
    if k > 0:
        launch(_proto_bwd_kernel, (out.shape[0],), grad_out, out, cand, scores, den, norm, dfeats, dim,
               grad_out.stride(0), cand.stride(0), scores.stride(0), k, norm_eps, NORMALIZE=normalize,
               BLOCK_D=next_pow2(dim, 16), ROWS=gather_rows(dim, target_of(out.device)), num_warps=4)
    return dfeats


class TopkProtoFunction(torch.autograd.Function):
    """(C,D) float32 prototypes; gradient to feats only (scores are constants)."""

    @staticmethod
    def forward(ctx, scores, feats, k, k_denom, normalize, norm_eps):
        out, cand, den, norm = topk_proto_forward(scores, feats, k, k_denom, normalize, norm_eps)
        ctx.save_for_backward(scores, cand, out, den, norm)
        ctx.meta = (tuple(feats.shape), feats.dtype, k, normalize, norm_eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scores, cand, out, den, norm = ctx.saved_tensors
        (length, _), dtype, k, normalize, norm_eps = ctx.meta
        dfeats = topk_proto_backward(grad_out, out, cand, scores, den, norm, length, k, normalize, norm_eps)
        return None, dfeats.to(dtype), None, None, None, None


def clip_k(k: int, k_denom, length: int) -> tuple[int, int]:
    """k and k_denom clipped to the candidate count, as the reference does."""
    k = min(int(k), length)
    return k, (k if k_denom is None else min(int(k_denom), length))


def prepare_inputs(scores, feats, k, k_denom):
    """Checks and the layout the kernels read -> (scores, feats, k, k_denom)."""
    op = "topk_proto"
    check_runnable(op, scores, feats)
    check_float(op, "scores", scores)
    check_float(op, "feats", feats)
    length = scores.shape[1]
    if length >= 2 ** 31:
        raise HscError(f"topk_proto: at most 2**31 - 1 candidates per row, got M={length}")
    k, k_denom = clip_k(k, k_denom, length)
    if max(k, k_denom) > MAX_KEEP:
        raise HscError(f"topk_proto: max(k, k_denom) must be <= {MAX_KEEP} for the Triton "
                       f"selection, got k={k}, k_denom={k_denom}; use impl='torch'")
    return row_major(scores.detach()), row_major(feats), k, k_denom


def topk_proto_triton(scores, feats, k, k_denom=None, normalize=True, norm_eps=1e-12):
    """Triton twin of `hsc_fast.ops.topk_proto_reference` (shapes validated by the dispatcher
    `hsc_fast.ops.topk_proto`): scores (C,M), feats (M,D) -> float32 (C,D)."""
    scores, feats, k, k_denom = prepare_inputs(scores, feats, k, k_denom)
    return TopkProtoFunction.apply(scores, feats, k, k_denom, bool(normalize), float(norm_eps))
