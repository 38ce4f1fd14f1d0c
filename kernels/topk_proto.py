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
s_i * dL/dv / den into the selected feature rows (float32 atomics: classes may share pixels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_float, check_runnable, next_pow2, row_major
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


def _rows(dim: int) -> int:
    """Candidates per slice of the gather loops: ~8k float32 values in flight on a GPU; 16 in
    the interpreter, so that the CPU tests run the loop several times."""
    return 16 if INTERPRET else max(1, min(64, 8192 // next_pow2(dim)))


def _chunk_size(keep: int, length: int) -> int:
    """Sort width: a power of two >= 4 * keep (each pass shrinks the data >= 4x), 4096 on a GPU
    (16384 in the interpreter, fewer programs), never wider than the row needs."""
    base = 16384 if INTERPRET else 4096
    width = max(base, next_pow2(4 * keep))
    return min(width, max(next_pow2(length, 16), next_pow2(keep, 16)))


def select_topk(scores: torch.Tensor, keep: int, width: int | None = None) -> torch.Tensor:
    """(C, keep) int64 keys of each row's top-`keep` scores, best first (see module docstring);
    `_key_index` / `key_index` turn them back into column indices. `width` (a power of two
    >= 2 * keep) overrides the sort width, so tests can drive several merge passes cheaply."""
    rows, length = scores.shape
    if width is not None and (width & (width - 1) or width < 2 * keep):
        raise HscError(f"select_topk: width={width} must be a power of two >= 2 * keep ({2 * keep})")
    src, from_scores, stride = scores, True, scores.stride(0)
    while True:
        chunk = width if width is not None and width < length else _chunk_size(keep, length)
        n_chunks = triton.cdiv(length, chunk)
        out = torch.empty((rows, n_chunks * keep), device=scores.device, dtype=torch.int64)
        _topk_chunk_kernel[(rows, n_chunks)](src, out, length, stride, out.stride(0), keep,
                                             FROM_SCORES=from_scores, CHUNK=chunk,
                                             LOG_CHUNK=chunk.bit_length() - 1,
                                             num_warps=8 if chunk >= 4096 else 4)
        if n_chunks == 1:
            return out
        src, from_scores, stride, length = out, False, out.stride(0), out.shape[1]


def key_index(keys: torch.Tensor) -> torch.Tensor:
    """Host-side twin of `_key_index` (for tests and debugging)."""
    return LARGEST_INDEX - (keys & 0xFFFFFFFF)


class TopkProtoFunction(torch.autograd.Function):
    """(C,D) float32 prototypes; gradient to feats only (scores are constants)."""

    @staticmethod
    def forward(ctx, scores, feats, k, k_denom, normalize, norm_eps):
        rows, length = scores.shape
        dim = feats.shape[1]
        keep = max(k, k_denom)
        cand = select_topk(scores, keep)
        out = torch.empty((rows, dim), device=feats.device, dtype=torch.float32)
        den = torch.empty((rows,), device=feats.device, dtype=torch.float32)
        norm = torch.empty_like(den)
        _proto_kernel[(rows,)](cand, scores, feats, out, den, norm, dim, cand.stride(0),
                               scores.stride(0), feats.stride(0), k, k_denom, keep, norm_eps,
                               NORMALIZE=normalize, BLOCK_KEEP=next_pow2(keep, 16),
                               BLOCK_D=next_pow2(dim, 16), ROWS=_rows(dim), num_warps=4)
        ctx.save_for_backward(scores, cand, out, den, norm)
        ctx.meta = (feats.shape, feats.dtype, k, normalize, norm_eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scores, cand, out, den, norm = ctx.saved_tensors
        (length, dim), dtype, k, normalize, norm_eps = ctx.meta
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dfeats = torch.zeros((length, dim), device=out.device, dtype=torch.float32)
        _proto_bwd_kernel[(out.shape[0],)](grad_out, out, cand, scores, den, norm, dfeats, dim,
                                           grad_out.stride(0), cand.stride(0), scores.stride(0),
                                           k, norm_eps, NORMALIZE=normalize,
                                           BLOCK_D=next_pow2(dim, 16), ROWS=_rows(dim),
                                           num_warps=4)
        return None, dfeats.to(dtype), None, None, None, None


def topk_proto_triton(scores, feats, k, k_denom=None, normalize=True):
    """Triton twin of `hsc_fast.ops.topk_proto_reference` (shapes validated by the dispatcher
    `hsc_fast.ops.topk_proto`): scores (C,M), feats (M,D) -> float32 (C,D)."""
    from hsc_fast.ops import PROTO_NORM_EPS

    op = "topk_proto"
    check_runnable(op, scores, feats)
    check_float(op, "scores", scores)
    check_float(op, "feats", feats)
    length = scores.shape[1]
    if length >= 2 ** 31:
        raise HscError(f"topk_proto: at most 2**31 - 1 candidates per row, got M={length}")
    k = min(int(k), length)
    k_denom = k if k_denom is None else min(int(k_denom), length)
    if max(k, k_denom) > MAX_KEEP:
        raise HscError(f"topk_proto: max(k, k_denom) must be <= {MAX_KEEP} for the Triton "
                       f"selection, got k={k}, k_denom={k_denom}; use impl='torch'")
    feats = row_major(feats)
    scores = row_major(scores.detach())
    return TopkProtoFunction.apply(scores, feats, k, k_denom, bool(normalize), PROTO_NORM_EPS)
