"""Fused PSC loss: the four InfoNCE terms of both views in one pass over the pixel embeddings.

Math (the reference is `hsc_fast.ops.psc_terms_reference`): per view v with embeddings f (M,D),
own labels ya, the other view's labels yb, own prototypes Po, the other view's prototypes Px and
the own bank B (each (C,D): C classes, 21 for VOC, 81 for MS COCO), e = f / max(||f||, 1e-12)
and logits l = e @ [Po; Px; B]^T / tau (3C columns: 63 for VOC, 243 for COCO):
    cross_proto = lse(l_Px) - l_Px[ya]      cross_label = lse(l_Po) - l_Po[yb]
    intra       = lse(l_Po) - l_Po[ya]      memory      = lse(l_B)  - l_B[ya]
and each of the four outputs is the mean of its per-pixel term over both views (sum / 2M).

Two kernel pairs, by class count (`column_layout`):
  * one block (3C <= ONE_BLOCK_COLUMNS = 64, VOC): all 3C logit columns in one block, the
    prototypes loaded once per program and reused by its row tiles (below);
  * chunked (more classes, COCO): `_psc_fwd_chunked_kernel` / `_psc_bwd_chunked_kernel` walk
    each of the three prototype sets in chunks of CHUNK_ROWS rows with an online log-sum-exp
    (running max and rescaled sum), so registers and shared memory are those of one chunk
    whatever C is; the forward stores the three log-sum-exps per pixel ((2, 3, M) float32, 12 B
    per pixel and view) and the backward forms the softmaxes from them in one pass over the
    chunks. One block of next_pow2(3C) = 256 columns at C = 81 does not fit: its forward spilled
    ~14 KB per thread and its backward needed 270 KB of shared memory (sm_80 allows 163 KB,
    sm_90 227 KB), measured with kernels.aot.

Layout of the one-block work:
  * forward: grid (cdiv(M, BLOCK_M), 2 views). A program loads its BLOCK_M embeddings once,
    computes the norm, one (BLOCK_M x 3C) logit block with tl.dot, three log-sum-exps held in
    registers, the positives by label, and writes 4 partial sums (pre-scaled by 1/2M). A torch
    `.sum(0)` over the partials gives the (4,) result: deterministic, no atomics.
  * backward: one more launch over the same grid that recomputes the logit block and writes
    dL/df = sum_t g_t dterm_t/df directly in f's dtype, reading grad_output on the device (no
    host sync). Writing dE in the forward instead would cost an extra full read + write of an
    (M,D) buffer to apply grad_output afterwards (4 passes over E-sized memory instead of 3),
    since the four terms' gradients differ and their weights are known only in backward.
  * precision: float32 inputs use exact ("ieee") float32 dots. bf16/fp16 inputs use 16-bit
    (tensor-core) dots with the (float32) prototypes split into a high and a low 16-bit part,
    so the logits keep ~16 mantissa bits. In the interpreter the bf16 dots are emulated
    (`_common.emulate_bf16`: operands rounded to bf16 on their bits, multiplied in float32), so
    the CPU tests run this branch too. The hsc_fast losses pass float32 (they never compute in
    bf16); the 16-bit branch serves callers of `hsc_fast.ops.psc_terms` with 16-bit embeddings.
Prototypes and banks are constants (no gradient), as in the official code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (Target, check_float, check_runnable, emulate_bf16, launch, lowp_dot, next_pow2, row_major,
                      target_of)
from hsc_fast.errors import HscError


@triton.jit
def _load_proto_block(own_ptr, other_ptr, bank_ptr, j, d, C, D):
    """Prototype rows [own; other; bank] as one float32 block, element (j, d) of the broadcast
    index tensors j (logit column) and d (feature): columns >= 3C and d >= D read as 0."""
    seg = j // C
    off = (j - seg * C) * D + d
    dmask = d < D
    block = tl.load(own_ptr + off, mask=(seg == 0) & dmask, other=0.0).to(tl.float32)
    block += tl.load(other_ptr + off, mask=(seg == 1) & dmask, other=0.0).to(tl.float32)
    block += tl.load(bank_ptr + off, mask=(seg == 2) & dmask, other=0.0).to(tl.float32)
    return block


@triton.jit
def _to_bf16_bits(x):
    """float32 -> the nearest bf16 value (ties to even), kept as float32: the rounding a GPU's
    cast applies, done on the bits (the interpreter's bf16 cast truncates instead)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_dot(a, a_raw, b, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """a (BLOCK_M, K) @ b (K, N) -> float32. Without LOWP one exact float32 dot. With LOWP, a_raw
    is `a` in its 16-bit type (None-like when a was made in float32: then it is rounded here)
    and the float32 `b` is split hi + lo in that type: two 16-bit dots keep ~16 bits of b.
    EMULATE (interpreter, bf16): the same operands as bf16-valued float32, float32 dots."""
    if LOWP:
        if EMULATE:
            hi = _to_bf16_bits(b)
            lo = _to_bf16_bits(b - hi)
            out = tl.dot(a, hi, input_precision="ieee") + tl.dot(a, lo, input_precision="ieee")
        else:
            hi = b.to(a_raw.dtype)
            lo = (b - hi.to(tl.float32)).to(a_raw.dtype)
            out = tl.dot(a_raw, hi) + tl.dot(a_raw, lo)
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def _segment_lse(logits, seg, s):
    """Row-wise log-sum-exp of the columns of segment s."""
    masked = tl.where(seg[None, :] == s, logits, float("-inf"))
    row_max = tl.max(masked, axis=1)
    total = tl.sum(tl.exp(masked - row_max[:, None]), axis=1)
    return row_max + tl.log(total)


@triton.jit
def _pick(logits, j, col):
    """logits[i, col[i]] for each row i (0 where col is out of range)."""
    return tl.sum(tl.where(j[None, :] == col[:, None], logits, 0.0), axis=1)


@triton.jit
def _load_rows(f_ptr, stride_f, ya_ptr, yb_ptr, rows, rmask, d, D, norm_eps):
    """A tile of a view's pixels: (f as float32, f in its own dtype, ||f||, 1/max(||f||, eps), ya, yb)."""
    f_raw = tl.load(f_ptr + rows[:, None] * stride_f + d[None, :], mask=rmask[:, None] & (d[None, :] < D), other=0.0)
    f = f_raw.to(tl.float32)
    f_norm = tl.sqrt(tl.sum(f * f, axis=1))
    inv_norm = 1.0 / tl.maximum(f_norm, norm_eps)
    ya = tl.load(ya_ptr + rows, mask=rmask, other=0).to(tl.int32)
    yb = tl.load(yb_ptr + rows, mask=rmask, other=0).to(tl.int32)
    return f, f_raw, f_norm, inv_norm, ya, yb


@triton.jit
def _tile_logits(f_ptr, stride_f, ya_ptr, yb_ptr, protos_t, rows, rmask, d, D, inv_tau, norm_eps,
                 LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """One tile of a view's pixels: (e, f_norm, inv_norm, logits, ya, yb). Not `_load_rows`:
    loading the labels after the dot is what keeps ptxas from spilling here (measured with
    kernels.aot: with the labels loaded first the sm_80 float32 forward spilled 212 B per thread
    at D = 128 and 10.6 KB at D = 256)."""
    fmask = rmask[:, None] & (d[None, :] < D)
    f_raw = tl.load(f_ptr + rows[:, None] * stride_f + d[None, :], mask=fmask, other=0.0)
    f = f_raw.to(tl.float32)
    f_norm = tl.sqrt(tl.sum(f * f, axis=1))
    inv_norm = 1.0 / tl.maximum(f_norm, norm_eps)
    raw = _split_dot(f, f_raw, protos_t, LOWP, EMULATE)
    logits = raw * (inv_norm * inv_tau)[:, None]
    ya = tl.load(ya_ptr + rows, mask=rmask, other=0).to(tl.int32)
    yb = tl.load(yb_ptr + rows, mask=rmask, other=0).to(tl.int32)
    return f * inv_norm[:, None], f_norm, inv_norm, logits, ya, yb


@triton.jit
def _view_inputs(view, f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, stride_f1, stride_f2):
    """View 1 contrasts against [P1; P2; M1] with labels (y1, y2), view 2 against [P2; P1; M2] with
    (y2, y1): (f, stride, ya, yb, own, other, bank) of this program's view."""
    if view == 0:
        f_ptr, stride_f, ya_ptr, yb_ptr = f1_ptr, stride_f1, y1_ptr, y2_ptr
        own_ptr, other_ptr, bank_ptr = p1_ptr, p2_ptr, m1_ptr
    else:
        f_ptr, stride_f, ya_ptr, yb_ptr = f2_ptr, stride_f2, y2_ptr, y1_ptr
        own_ptr, other_ptr, bank_ptr = p2_ptr, p1_ptr, m2_ptr
    return f_ptr, stride_f, ya_ptr, yb_ptr, own_ptr, other_ptr, bank_ptr


@triton.jit
def _psc_fwd_kernel(f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, partial_ptr,
                    M, D, C, stride_f1, stride_f2, inv_tau, scale, norm_eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                    TILES: tl.constexpr, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    pid = tl.program_id(0)
    view = tl.program_id(1)
    # One code path for both views, the pointers swapped.
    f_ptr, stride_f, ya_ptr, yb_ptr, own_ptr, other_ptr, bank_ptr = _view_inputs(
        view, f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, stride_f1, stride_f2)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_J)
    seg = tl.where(j < 3 * C, j // C, 3)
    # Loaded once per program, reused by its TILES row tiles.
    protos_t = _load_proto_block(own_ptr, other_ptr, bank_ptr, j[None, :], d[:, None], C, D)
    acc_cp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_cl = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_in = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_me = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(TILES):
        rows = (pid * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        e, f_norm, inv_norm, logits, ya, yb = _tile_logits(
            f_ptr, stride_f, ya_ptr, yb_ptr, protos_t, rows, rmask, d, D, inv_tau, norm_eps, LOWP, EMULATE)
        lse_own = _segment_lse(logits, seg, 0)
        acc_cp += tl.where(rmask, _segment_lse(logits, seg, 1) - _pick(logits, j, ya + C), 0.0)
        acc_cl += tl.where(rmask, lse_own - _pick(logits, j, yb), 0.0)
        acc_in += tl.where(rmask, lse_own - _pick(logits, j, ya), 0.0)
        acc_me += tl.where(rmask, _segment_lse(logits, seg, 2) - _pick(logits, j, ya + 2 * C), 0.0)
    out = partial_ptr + (view * tl.num_programs(0) + pid) * 4
    tl.store(out + 0, tl.sum(acc_cp, axis=0) * scale)
    tl.store(out + 1, tl.sum(acc_cl, axis=0) * scale)
    tl.store(out + 2, tl.sum(acc_in, axis=0) * scale)
    tl.store(out + 3, tl.sum(acc_me, axis=0) * scale)


@triton.jit
def _psc_bwd_kernel(f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr,
                    grad_ptr, stride_grad, df1_ptr, df2_ptr,
                    M, D, C, stride_f1, stride_f2, inv_tau, scale, norm_eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                    TILES: tl.constexpr, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    pid = tl.program_id(0)
    view = tl.program_id(1)
    f_ptr, stride_f, ya_ptr, yb_ptr, own_ptr, other_ptr, bank_ptr = _view_inputs(
        view, f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, stride_f1, stride_f2)
    if view == 0:
        df_ptr = df1_ptr
    else:
        df_ptr = df2_ptr
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_J)
    seg = tl.where(j < 3 * C, j // C, 3)
    protos_t = _load_proto_block(own_ptr, other_ptr, bank_ptr, j[None, :], d[:, None], C, D)
    protos = _load_proto_block(own_ptr, other_ptr, bank_ptr, j[:, None], d[None, :], C, D)
    # grad_output of the 4 terms (read on the device: no host sync), times d(mean over the
    # 2M pixels of both views)/d(one pixel's term).
    g_cp = tl.load(grad_ptr + 0 * stride_grad).to(tl.float32) * scale
    g_cl = tl.load(grad_ptr + 1 * stride_grad).to(tl.float32) * scale
    g_in = tl.load(grad_ptr + 2 * stride_grad).to(tl.float32) * scale
    g_me = tl.load(grad_ptr + 3 * stride_grad).to(tl.float32) * scale
    # Each segment's softmax enters with the summed weight of the terms using that segment.
    weight = tl.where(seg == 0, g_cl + g_in, tl.where(seg == 1, g_cp, tl.where(seg == 2, g_me, 0.0)))
    jj = j[None, :]
    for t in range(TILES):
        rows = (pid * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        e, f_norm, inv_norm, logits, ya, yb = _tile_logits(
            f_ptr, stride_f, ya_ptr, yb_ptr, protos_t, rows, rmask, d, D, inv_tau, norm_eps, LOWP, EMULATE)
        lse_own = _segment_lse(logits, seg, 0)
        lse_other = _segment_lse(logits, seg, 1)
        lse_bank = _segment_lse(logits, seg, 2)
        lse = tl.where(seg[None, :] == 0, lse_own[:, None],
                       tl.where(seg[None, :] == 1, lse_other[:, None], lse_bank[:, None]))
        # d(lse - l[y])/dl = softmax - onehot(y), per segment.
        dlogits = tl.where(seg[None, :] < 3, tl.exp(logits - lse), 0.0) * weight[None, :]
        dlogits -= tl.where(jj == yb[:, None], g_cl, 0.0)
        dlogits -= tl.where(jj == ya[:, None], g_in, 0.0)
        dlogits -= tl.where(jj == (ya + C)[:, None], g_cp, 0.0)
        dlogits -= tl.where(jj == (ya + 2 * C)[:, None], g_me, 0.0)
        dlogits = tl.where(rmask[:, None], dlogits * inv_tau, 0.0)
        de = _grad_dot(dlogits, protos, df_ptr, LOWP, EMULATE)
        # e = f / max(||f||, eps): remove the radial part unless the norm was clamped.
        radial = tl.sum(de * e, axis=1)
        df = tl.where((f_norm > norm_eps)[:, None], de - e * radial[:, None], de) * inv_norm[:, None]
        # dL/df buffers are contiguous (M, D) whatever the strides of f.
        tl.store(df_ptr + rows[:, None] * D + d[None, :], df.to(df_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (d[None, :] < D))


# ------------------------------------------------------------------------------------------
# Chunked columns (C > 21: MS COCO's 81 classes)
# ------------------------------------------------------------------------------------------
@triton.jit
def _chunk_logits(f, f_raw, row_scale, set_ptr, c0, jb, d, C, D, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """Logits of prototype rows c0 + jb of one set, (BLOCK_M, BLOCK_J); rows >= C: -inf."""
    cols = c0 + jb
    valid = cols < C
    chunk_t = tl.load(set_ptr + cols[None, :] * D + d[:, None], mask=valid[None, :] & (d[:, None] < D),
                      other=0.0).to(tl.float32)
    logits = _split_dot(f, f_raw, chunk_t, LOWP, EMULATE) * row_scale
    return tl.where(valid[None, :], logits, float("-inf")), cols


@triton.jit
def _set_lse_and_picks(f, f_raw, row_scale, set_ptr, ya, yb, jb, d, C, D, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                       LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """One prototype set in chunks: (row-wise log-sum-exp over its C columns, l[ya], l[yb]).
    Online: m' = max(m, chunk max); s' = s exp(m - m') + sum exp(l - m'). Every chunk holds at
    least one valid column, so m is finite after the first chunk and no inf - inf is taken."""
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pick_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pick_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_J):
        logits, cols = _chunk_logits(f, f_raw, row_scale, set_ptr, c0, jb, d, C, D, LOWP, EMULATE)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        pick_a += tl.sum(tl.where(cols[None, :] == ya[:, None], logits, 0.0), axis=1)
        pick_b += tl.sum(tl.where(cols[None, :] == yb[:, None], logits, 0.0), axis=1)
    return run_max + tl.log(run_sum), pick_a, pick_b


@triton.jit
def _chunked_tile(f_ptr, stride_f, ya_ptr, yb_ptr, pid, M, D, norm_eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's row tile of one view: (rows, rmask, d, f, f_raw, f_norm, inv_norm, ya, yb)."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    d = tl.arange(0, BLOCK_D)
    f, f_raw, f_norm, inv_norm, ya, yb = _load_rows(f_ptr, stride_f, ya_ptr, yb_ptr, rows, rmask, d, D, norm_eps)
    return rows, rmask, d, f, f_raw, f_norm, inv_norm, ya, yb


@triton.jit
def _psc_fwd_chunked_kernel(f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, partial_ptr, lse_ptr,
                            M, D, C, stride_f1, stride_f2, inv_tau, scale, norm_eps,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                            SAVE_LSE: tl.constexpr, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    pid = tl.program_id(0)
    view = tl.program_id(1)
    f_ptr, stride_f, ya_ptr, yb_ptr, own_ptr, other_ptr, bank_ptr = _view_inputs(
        view, f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, stride_f1, stride_f2)
    rows, rmask, d, f, f_raw, f_norm, inv_norm, ya, yb = _chunked_tile(
        f_ptr, stride_f, ya_ptr, yb_ptr, pid, M, D, norm_eps, BLOCK_M, BLOCK_D)
    row_scale = (inv_norm * inv_tau)[:, None]
    jb = tl.arange(0, BLOCK_J)
    lse_own, own_a, own_b = _set_lse_and_picks(f, f_raw, row_scale, own_ptr, ya, yb, jb, d, C, D,
                                               BLOCK_M, BLOCK_J, LOWP, EMULATE)
    lse_other, other_a, _ = _set_lse_and_picks(f, f_raw, row_scale, other_ptr, ya, yb, jb, d, C, D,
                                               BLOCK_M, BLOCK_J, LOWP, EMULATE)
    lse_bank, bank_a, _ = _set_lse_and_picks(f, f_raw, row_scale, bank_ptr, ya, yb, jb, d, C, D,
                                             BLOCK_M, BLOCK_J, LOWP, EMULATE)
    out = partial_ptr + (view * tl.num_programs(0) + pid) * 4
    tl.store(out + 0, tl.sum(tl.where(rmask, lse_other - other_a, 0.0), axis=0) * scale)
    tl.store(out + 1, tl.sum(tl.where(rmask, lse_own - own_b, 0.0), axis=0) * scale)
    tl.store(out + 2, tl.sum(tl.where(rmask, lse_own - own_a, 0.0), axis=0) * scale)
    tl.store(out + 3, tl.sum(tl.where(rmask, lse_bank - bank_a, 0.0), axis=0) * scale)
    if SAVE_LSE:  # (2 views, 3 sets, M): what the backward needs to form the softmaxes
        lse_out = lse_ptr + view * 3 * M + rows
        tl.store(lse_out, lse_own, mask=rmask)
        tl.store(lse_out + M, lse_other, mask=rmask)
        tl.store(lse_out + 2 * M, lse_bank, mask=rmask)


@triton.jit
def _set_grad(de, f, f_raw, row_scale, set_ptr, lse, weight, ya, g_a, yb, g_b, rmask, jb, d, C, D, inv_tau,
              df_ptr, BLOCK_J: tl.constexpr, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """de += dlogits @ P over one prototype set in chunks, with dlogits = weight * softmax
    - g_a onehot(ya) - g_b onehot(yb) (the softmax from the stored log-sum-exp)."""
    for c0 in range(0, C, BLOCK_J):
        logits, cols = _chunk_logits(f, f_raw, row_scale, set_ptr, c0, jb, d, C, D, LOWP, EMULATE)
        dlogits = tl.exp(logits - lse[:, None]) * weight  # exp(-inf) = 0 on padding rows
        dlogits -= tl.where(cols[None, :] == ya[:, None], g_a, 0.0)
        dlogits -= tl.where(cols[None, :] == yb[:, None], g_b, 0.0)
        dlogits = tl.where(rmask[:, None] & (cols < C)[None, :], dlogits * inv_tau, 0.0)
        chunk = tl.load(set_ptr + cols[:, None] * D + d[None, :], mask=(cols < C)[:, None] & (d[None, :] < D),
                        other=0.0).to(tl.float32)
        de += _grad_dot(dlogits, chunk, df_ptr, LOWP, EMULATE)
    return de


@triton.jit
def _grad_dot(dlogits, protos, df_ptr, LOWP: tl.constexpr, EMULATE: tl.constexpr):
    """dE contribution dlogits @ P; in the 16-bit branch dlogits is rounded to the input type first."""
    if LOWP:
        if EMULATE:
            de = _split_dot(_to_bf16_bits(dlogits), dlogits, protos, LOWP, EMULATE)
        else:
            de = _split_dot(dlogits, dlogits.to(df_ptr.dtype.element_ty), protos, LOWP, EMULATE)
    else:
        de = _split_dot(dlogits, dlogits, protos, LOWP, EMULATE)
    return de


@triton.jit
def _psc_bwd_chunked_kernel(f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, lse_ptr,
                            grad_ptr, stride_grad, df1_ptr, df2_ptr,
                            M, D, C, stride_f1, stride_f2, inv_tau, scale, norm_eps,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                            LOWP: tl.constexpr, EMULATE: tl.constexpr):
    pid = tl.program_id(0)
    view = tl.program_id(1)
    f_ptr, stride_f, ya_ptr, yb_ptr, own_ptr, other_ptr, bank_ptr = _view_inputs(
        view, f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, stride_f1, stride_f2)
    if view == 0:
        df_ptr = df1_ptr
    else:
        df_ptr = df2_ptr
    rows, rmask, d, f, f_raw, f_norm, inv_norm, ya, yb = _chunked_tile(
        f_ptr, stride_f, ya_ptr, yb_ptr, pid, M, D, norm_eps, BLOCK_M, BLOCK_D)
    row_scale = (inv_norm * inv_tau)[:, None]
    jb = tl.arange(0, BLOCK_J)
    g_cp = tl.load(grad_ptr + 0 * stride_grad).to(tl.float32) * scale
    g_cl = tl.load(grad_ptr + 1 * stride_grad).to(tl.float32) * scale
    g_in = tl.load(grad_ptr + 2 * stride_grad).to(tl.float32) * scale
    g_me = tl.load(grad_ptr + 3 * stride_grad).to(tl.float32) * scale
    lse_in = lse_ptr + view * 3 * M + rows
    lse_own = tl.load(lse_in, mask=rmask, other=0.0)
    lse_other = tl.load(lse_in + M, mask=rmask, other=0.0)
    lse_bank = tl.load(lse_in + 2 * M, mask=rmask, other=0.0)
    # own set: intra (ya) and cross_label (yb); other set: cross_proto (ya); bank: memory (ya).
    de = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    de = _set_grad(de, f, f_raw, row_scale, own_ptr, lse_own, g_cl + g_in, ya, g_in, yb, g_cl, rmask, jb, d, C, D,
                   inv_tau, df_ptr, BLOCK_J, LOWP, EMULATE)
    de = _set_grad(de, f, f_raw, row_scale, other_ptr, lse_other, g_cp, ya, g_cp, yb, 0.0, rmask, jb, d, C, D,
                   inv_tau, df_ptr, BLOCK_J, LOWP, EMULATE)
    de = _set_grad(de, f, f_raw, row_scale, bank_ptr, lse_bank, g_me, ya, g_me, yb, 0.0, rmask, jb, d, C, D,
                   inv_tau, df_ptr, BLOCK_J, LOWP, EMULATE)
    e = f * inv_norm[:, None]
    radial = tl.sum(de * e, axis=1)
    df = tl.where((f_norm > norm_eps)[:, None], de - e * radial[:, None], de) * inv_norm[:, None]
    tl.store(df_ptr + rows[:, None] * D + d[None, :], df.to(df_ptr.dtype.element_ty),
             mask=rmask[:, None] & (d[None, :] < D))


# Row tile and warps per kernel and feature width on a GPU, chosen with kernels.aot (ptxas -v for
# sm_80 and sm_90, float32 and bf16, TILES 1 and 8): the float32 "ieee" dots run on the CUDA cores,
# whose operand layouts need many registers, so wide tiles spill (the former 64-row forward spilled
# 7.7 KB per thread on sm_80). Measured spill stores per thread at these settings: none at D <= 128
# (the PSC embedding width) for both kernels, dtypes, targets and both TILES; at D = 256 the forward
# has none and the backward <= 4 B (float32 with TILES 1: TILES 8 needs more than sm_80's 163 KB of
# shared memory; bf16 with TILES 8: TILES 1 spills 1-2 KB). benchmarks/results/aot-*.md has the table.
_FWD_TILE = {128: (32, 8), 256: (32, 8)}
_BWD_TILE = {128: (16, 8), 256: (16, 16)}
MERGE_TILES = 8


def launch_config(m: int, d: int, target: Target, lowp: bool, backward: bool) -> dict:
    """Block sizes, tiles per program (TILES), warps and grid. The interpreter pays per program
    (big tiles, a few per program so the tile loop is exercised). On a GPU: the measured tiles
    above; programs merge MERGE_TILES row tiles (one prototype load for all of them) only when
    the merged grid still fills every SM 8 times over, else one tile each."""
    block_d = next_pow2(d, 16)
    if target.interpreter:
        block_m, warps = min(next_pow2(m, 16), 256), 4
        tiles = min(4, triton.cdiv(max(m, 1), block_m))
    else:
        if block_d > 256:
            raise HscError(f"psc_terms: feature width {d} > 256 is not supported by the fused kernels; use impl='torch'")
        block_m, warps = (_BWD_TILE if backward else _FWD_TILE)[max(block_d, 128)]
        n_tiles = triton.cdiv(m, block_m)
        merged_waves = 2 * n_tiles // (MERGE_TILES * 8 * target.sms)
        wide_bwd = backward and block_d > 128
        if wide_bwd:  # measured: float32 fits shared memory only unmerged; 16-bit spills unless merged
            tiles = MERGE_TILES if lowp else 1
        else:
            tiles = MERGE_TILES if merged_waves >= 1 else 1
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, TILES=tiles, num_warps=warps,
                grid=(triton.cdiv(triton.cdiv(m, block_m), tiles), 2))


# One block holds 3C <= 64 logit columns (VOC: 63); more classes take the chunked kernels, whose
# chunks are CHUNK_ROWS prototype rows of one set (COCO: 81 = 32 + 32 + 17 per set). Row tile and
# warps of the chunked kernels on a GPU per feature width, and num_stages=1, chosen with kernels.aot
# at C = 81 (sm_80 and sm_90, float32 and bf16). Measured: Triton's default software pipelining
# (3 stages) gave each in-flight chunk its own shared-memory buffers (a first version needed
# 245 KB forward / 467 KB backward); with one stage 20-27 KB. At D = 128 (PSC's width) no spills
# for both kernels, dtypes and targets (32-row forward tiles spilled 0.5-10 KB per thread in
# float32); at D = 256 the float32 kernels spill 0.3-0.8 KB per thread at the best tile tried
# (8 rows, 8 warps; 16 rows or 16 warps spill 3-12 KB), bf16 none. Table: benchmarks/results/aot-*.md.
ONE_BLOCK_COLUMNS = 64
CHUNK_ROWS = 32
_CHUNKED_TILE = {128: {"fwd": (16, 8), "bwd": (16, 8)}, 256: {"fwd": (8, 8), "bwd": (8, 8)}}
CHUNKED_STAGES = 1


def column_layout(classes: int) -> str:
    """'one_block' when the 3C logit columns fit one block, else 'chunked'."""
    return "one_block" if 3 * classes <= ONE_BLOCK_COLUMNS else "chunked"


def chunked_launch_config(m: int, d: int, target: Target, backward: bool) -> dict:
    """The chunked kernels: one row tile per program (the prototypes are re-read per chunk anyway,
    from L2: 81 x 128 x 4 B = 41 KB per set). The interpreter: big tiles, few programs."""
    block_d = next_pow2(d, 16)
    if target.interpreter:
        block_m, warps = min(next_pow2(m, 16), 256), 4
    else:
        if block_d > 256:
            raise HscError(f"psc_terms: feature width {d} > 256 is not supported by the fused kernels; use impl='torch'")
        block_m, warps = _CHUNKED_TILE[max(block_d, 128)]["bwd" if backward else "fwd"]
    meta = dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_J=CHUNK_ROWS, num_warps=warps,
                grid=(triton.cdiv(m, block_m), 2))
    if not target.interpreter:
        meta["num_stages"] = CHUNKED_STAGES
    return meta


def _meta(f1, p1, backward: bool):
    """Every constexpr and launch option of one kernel for these inputs, and its grid."""
    m, d = f1.shape
    target = target_of(f1.device)
    lowp = lowp_dot(f1.dtype)
    if column_layout(p1.shape[0]) == "one_block":
        meta = launch_config(m, d, target, lowp, backward)
        meta.update(BLOCK_J=next_pow2(3 * p1.shape[0], 16))
    else:
        meta = chunked_launch_config(m, d, target, backward)
    meta.update(LOWP=lowp, EMULATE=lowp and emulate_bf16(f1.dtype, target))
    return meta.pop("grid"), meta


def psc_forward(f1, f2, y1, y2, p1, p2, m1, m2, tau: float, norm_eps: float, save_lse: bool = True):
    """Launch the forward kernel -> ((4,) float32 [cross_proto, cross_label, intra, memory],
    lse). lse: the chunked kernels' (2, 3, M) float32 log-sum-exps per view, set and pixel when
    `save_lse` (a gradient is wanted), else None; the one-block backward recomputes its own."""
    grid, meta = _meta(f1, p1, backward=False)
    m, d = f1.shape
    partial = torch.zeros((2 * grid[0], 4), device=f1.device, dtype=torch.float32)
    common = (m, d, p1.shape[0], f1.stride(0), f2.stride(0), 1.0 / tau, 1.0 / (2 * m), norm_eps)
    if column_layout(p1.shape[0]) == "one_block":
        launch(_psc_fwd_kernel, grid, f1, f2, y1, y2, p1, p2, m1, m2, partial, *common, **meta)
        return partial.sum(dim=0), None
    lse = torch.empty((2, 3, m) if save_lse else (1,), device=f1.device, dtype=torch.float32)
    launch(_psc_fwd_chunked_kernel, grid, f1, f2, y1, y2, p1, p2, m1, m2, partial, lse, *common,
           SAVE_LSE=bool(save_lse), **meta)
    return partial.sum(dim=0), (lse if save_lse else None)


def psc_backward(grad_out, f1, f2, y1, y2, p1, p2, m1, m2, tau: float, norm_eps: float, lse=None):
    """Launch the backward kernel -> (dL/df1, dL/df2) in the embeddings' dtype. The chunked
    kernel needs `lse` from `psc_forward`."""
    grid, meta = _meta(f1, p1, backward=True)
    m, d = f1.shape
    df1 = torch.empty(f1.shape, device=f1.device, dtype=f1.dtype)  # every element written
    df2 = torch.empty(f2.shape, device=f2.device, dtype=f2.dtype)
    common = (grad_out, grad_out.stride(0), df1, df2, m, d, p1.shape[0], f1.stride(0), f2.stride(0), 1.0 / tau,
              1.0 / (2 * m), norm_eps)
    if column_layout(p1.shape[0]) == "one_block":
        launch(_psc_bwd_kernel, grid, f1, f2, y1, y2, p1, p2, m1, m2, *common, **meta)
    else:
        if lse is None:
            raise HscError("psc_terms: the chunked backward needs the forward's log-sum-exps "
                           "(the forward ran without save_lse)")
        launch(_psc_bwd_chunked_kernel, grid, f1, f2, y1, y2, p1, p2, m1, m2, lse, *common, **meta)
    return df1, df2


class PscTermsFunction(torch.autograd.Function):
    """(4,) float32 [cross_proto, cross_label, intra, memory]; gradient to f1 and f2. The
    chunked forward keeps its per-pixel log-sum-exps (3 floats per pixel and view) only when a
    gradient is wanted (`save_lse`, decided by the caller: grad mode is off inside forward)."""

    @staticmethod
    def forward(ctx, f1, f2, y1, y2, p1, p2, m1, m2, tau, norm_eps, save_lse):
        terms, lse = psc_forward(f1, f2, y1, y2, p1, p2, m1, m2, tau, norm_eps, save_lse)
        ctx.save_for_backward(f1, f2, y1, y2, p1, p2, m1, m2, lse)
        ctx.tau, ctx.norm_eps = tau, norm_eps
        return terms

    @staticmethod
    def backward(ctx, grad_out):
        *inputs, lse = ctx.saved_tensors
        df1, df2 = psc_backward(grad_out, *inputs, ctx.tau, ctx.norm_eps, lse=lse)
        return df1, df2, None, None, None, None, None, None, None, None, None


def prepare_inputs(f1, f2, y1, y2, p1, p2, m1, m2):
    """Checks and the layout the kernels read: one float dtype for both views, float prototype
    sets of one dtype per swapped pair, contiguous labels and prototypes. Any class count C:
    3C > ONE_BLOCK_COLUMNS takes the chunked kernels."""
    op = "psc_terms"
    check_runnable(op, f1, f2, y1, y2, p1, p2, m1, m2)
    check_float(op, "f1", f1)
    check_float(op, "f2", f2)
    if f1.dtype != f2.dtype:  # one kernel specialisation serves both views
        f1, f2 = f1.float(), f2.float()
    protos = [row_major(t.detach()).contiguous() for t in (p1, p2, m1, m2)]
    for name, t in zip(("p1", "p2", "m1", "m2"), protos):
        check_float(op, name, t)
    if protos[0].dtype != protos[1].dtype:  # the kernel swaps p1/p2 between the views
        protos[0], protos[1] = protos[0].float(), protos[1].float()
    if protos[2].dtype != protos[3].dtype:
        protos[2], protos[3] = protos[2].float(), protos[3].float()
    labels = [y.detach().contiguous() for y in (y1, y2)]
    return (row_major(f1), row_major(f2), *labels, *protos)


def psc_terms_triton(f1, f2, y1, y2, p1, p2, m1, m2, tau=0.1, norm_eps=1e-12):
    """Triton twin of `hsc_fast.ops.psc_terms_reference` (same arguments, same (4,) float32
    result; shapes are validated by the dispatcher `hsc_fast.ops.psc_terms`)."""
    save_lse = torch.is_grad_enabled() and (f1.requires_grad or f2.requires_grad)
    inputs = prepare_inputs(f1, f2, y1, y2, p1, p2, m1, m2)
    return PscTermsFunction.apply(*inputs, float(tau), float(norm_eps), bool(save_lse))
