"""Fused PSC loss: the four InfoNCE terms of both views in one pass over the pixel embeddings.

Math (the reference is `hsc_fast.ops.psc_terms_reference`): per view v with embeddings f (M,D),
own labels ya, the other view's labels yb, own prototypes Po, the other view's prototypes Px and
the own bank B (each (C,D)), e = f / max(||f||, 1e-12) and logits l = e @ [Po; Px; B]^T / tau
(one 3C-column block, 63 columns for VOC):
    cross_proto = lse(l_Px) - l_Px[ya]      cross_label = lse(l_Po) - l_Po[yb]
    intra       = lse(l_Po) - l_Po[ya]      memory      = lse(l_B)  - l_B[ya]
and each of the four outputs is the mean of its per-pixel term over both views (sum / 2M).

Layout of the work:
  * forward: grid (cdiv(M, BLOCK_M), 2 views). A program loads its BLOCK_M embeddings once,
    computes the norm, one (BLOCK_M x 3C) logit block with tl.dot, three log-sum-exps held in
    registers, the positives by label, and writes 4 partial sums (pre-scaled by 1/2M). A torch
    `.sum(0)` over the partials gives the (4,) result: deterministic, no atomics.
  * backward: one more launch over the same grid that recomputes the logit block and writes
    dL/df = sum_t g_t dterm_t/df directly in f's dtype, reading grad_output on the device (no
    host sync). Writing dE in the forward instead would cost an extra full read + write of an
    (M,D) buffer to apply grad_output afterwards (4 passes over E-sized memory instead of 3),
    since the four terms' gradients differ and their weights are known only in backward.
  * precision: float32 inputs use exact ("ieee") float32 dots. bf16/fp16 inputs on a GPU use
    16-bit tensor-core dots with the (float32) prototypes split into a high and a low 16-bit
    part, so the logits keep ~16 mantissa bits; under the interpreter everything is float32.
Prototypes and banks are constants (no gradient), as in the official code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_float, check_runnable, lowp_dot, next_pow2, row_major, INTERPRET
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
def _dot_rows_protos(x, x_lowp, protos_t, LOWP: tl.constexpr):
    """x (BLOCK_M, BLOCK_D) @ protos_t (BLOCK_D, BLOCK_J) in float32. With LOWP, x_lowp is x in
    its 16-bit input type (exact) and the float32 prototypes are split hi + lo in that type."""
    if LOWP:
        hi = protos_t.to(x_lowp.dtype)
        lo = (protos_t - hi.to(tl.float32)).to(x_lowp.dtype)
        out = tl.dot(x_lowp, hi) + tl.dot(x_lowp, lo)
    else:
        out = tl.dot(x, protos_t, input_precision="ieee")
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
def _tile_logits(f_ptr, stride_f, ya_ptr, yb_ptr, protos_t, rows, rmask, d, D, inv_tau, norm_eps,
                 LOWP: tl.constexpr):
    """One tile of a view's pixels: (e, f_norm, inv_norm, logits, ya, yb)."""
    fmask = rmask[:, None] & (d[None, :] < D)
    f_raw = tl.load(f_ptr + rows[:, None] * stride_f + d[None, :], mask=fmask, other=0.0)
    f = f_raw.to(tl.float32)
    f_norm = tl.sqrt(tl.sum(f * f, axis=1))
    inv_norm = 1.0 / tl.maximum(f_norm, norm_eps)
    raw = _dot_rows_protos(f, f_raw, protos_t, LOWP)
    logits = raw * (inv_norm * inv_tau)[:, None]
    ya = tl.load(ya_ptr + rows, mask=rmask, other=0).to(tl.int32)
    yb = tl.load(yb_ptr + rows, mask=rmask, other=0).to(tl.int32)
    return f * inv_norm[:, None], f_norm, inv_norm, logits, ya, yb


@triton.jit
def _psc_fwd_kernel(f1_ptr, f2_ptr, y1_ptr, y2_ptr, p1_ptr, p2_ptr, m1_ptr, m2_ptr, partial_ptr,
                    M, D, C, stride_f1, stride_f2, inv_tau, scale, norm_eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                    TILES: tl.constexpr, LOWP: tl.constexpr):
    pid = tl.program_id(0)
    view = tl.program_id(1)
    # View 1 contrasts against [P1; P2; M1] with labels (y1, y2), view 2 against [P2; P1; M2]
    # with (y2, y1): one code path, the pointers swapped.
    if view == 0:
        f_ptr, stride_f, ya_ptr, yb_ptr = f1_ptr, stride_f1, y1_ptr, y2_ptr
        own_ptr, other_ptr, bank_ptr = p1_ptr, p2_ptr, m1_ptr
    else:
        f_ptr, stride_f, ya_ptr, yb_ptr = f2_ptr, stride_f2, y2_ptr, y1_ptr
        own_ptr, other_ptr, bank_ptr = p2_ptr, p1_ptr, m2_ptr
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
            f_ptr, stride_f, ya_ptr, yb_ptr, protos_t, rows, rmask, d, D, inv_tau, norm_eps, LOWP)
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
                    TILES: tl.constexpr, LOWP: tl.constexpr):
    pid = tl.program_id(0)
    view = tl.program_id(1)
    if view == 0:
        f_ptr, stride_f, ya_ptr, yb_ptr, df_ptr = f1_ptr, stride_f1, y1_ptr, y2_ptr, df1_ptr
        own_ptr, other_ptr, bank_ptr = p1_ptr, p2_ptr, m1_ptr
    else:
        f_ptr, stride_f, ya_ptr, yb_ptr, df_ptr = f2_ptr, stride_f2, y2_ptr, y1_ptr, df2_ptr
        own_ptr, other_ptr, bank_ptr = p2_ptr, p1_ptr, m2_ptr
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
            f_ptr, stride_f, ya_ptr, yb_ptr, protos_t, rows, rmask, d, D, inv_tau, norm_eps, LOWP)
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
        if LOWP:
            dl_lowp = dlogits.to(df_ptr.dtype.element_ty)
            hi = protos.to(df_ptr.dtype.element_ty)
            lo = (protos - hi.to(tl.float32)).to(df_ptr.dtype.element_ty)
            de = tl.dot(dl_lowp, hi) + tl.dot(dl_lowp, lo)
        else:
            de = tl.dot(dlogits, protos, input_precision="ieee")
        # e = f / max(||f||, eps): remove the radial part unless the norm was clamped.
        radial = tl.sum(de * e, axis=1)
        df = tl.where((f_norm > norm_eps)[:, None], de - e * radial[:, None], de) * inv_norm[:, None]
        # dL/df buffers are contiguous (M, D) whatever the strides of f.
        tl.store(df_ptr + rows[:, None] * D + d[None, :], df.to(df_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (d[None, :] < D))


def _launch_config(m: int, d: int, device: torch.device) -> dict:
    """Block sizes, tiles per program and warps. The interpreter pays per program (big tiles,
    a few per program so the tile loop is exercised); a GPU gets 64-row tiles and enough
    programs to fill every SM a few times over before tiles are merged per program."""
    block_d = next_pow2(d, 16)
    if INTERPRET:
        block_m, warps = min(next_pow2(m, 16), 256), 4
        tiles = min(4, triton.cdiv(m, block_m))
    else:
        block_m = 64 if block_d <= 128 else (32 if block_d <= 256 else 16)
        warps = 8
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # 2 views x programs >= ~8 waves of SMs before merging tiles (proto reloads amortised).
        tiles = max(1, min(8, triton.cdiv(m, block_m) * 2 // (8 * sms)))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, TILES=tiles, warps=warps,
                grid=(triton.cdiv(triton.cdiv(m, block_m), tiles), 2))


def _meta(f1, p1):
    m, d = f1.shape
    meta = _launch_config(m, d, f1.device)
    meta.update(M=m, D=d, C=p1.shape[0], BLOCK_J=next_pow2(3 * p1.shape[0], 16), LOWP=lowp_dot(f1.dtype))
    return meta


class PscTermsFunction(torch.autograd.Function):
    """(4,) float32 [cross_proto, cross_label, intra, memory]; gradient to f1 and f2."""

    @staticmethod
    def forward(ctx, f1, f2, y1, y2, p1, p2, m1, m2, tau, norm_eps):
        meta = _meta(f1, p1)
        partial = torch.empty((2 * meta["grid"][0], 4), device=f1.device, dtype=torch.float32)
        scale = 1.0 / (2 * meta["M"])
        _psc_fwd_kernel[meta["grid"]](
            f1, f2, y1, y2, p1, p2, m1, m2, partial, meta["M"], meta["D"], meta["C"],
            f1.stride(0), f2.stride(0), 1.0 / tau, scale, norm_eps,
            BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], BLOCK_J=meta["BLOCK_J"],
            TILES=meta["TILES"], LOWP=meta["LOWP"], num_warps=meta["warps"])
        ctx.save_for_backward(f1, f2, y1, y2, p1, p2, m1, m2)
        ctx.tau, ctx.norm_eps = tau, norm_eps
        return partial.sum(dim=0)

    @staticmethod
    def backward(ctx, grad_out):
        f1, f2, y1, y2, p1, p2, m1, m2 = ctx.saved_tensors
        meta = _meta(f1, p1)
        df1 = torch.empty(f1.shape, device=f1.device, dtype=f1.dtype)
        df2 = torch.empty(f2.shape, device=f2.device, dtype=f2.dtype)
        _psc_bwd_kernel[meta["grid"]](
            f1, f2, y1, y2, p1, p2, m1, m2, grad_out, grad_out.stride(0), df1, df2,
            meta["M"], meta["D"], meta["C"], f1.stride(0), f2.stride(0), 1.0 / ctx.tau,
            1.0 / (2 * meta["M"]), ctx.norm_eps,
            BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], BLOCK_J=meta["BLOCK_J"],
            TILES=meta["TILES"], LOWP=meta["LOWP"], num_warps=meta["warps"])
        return df1, df2, None, None, None, None, None, None, None, None


def psc_terms_triton(f1, f2, y1, y2, p1, p2, m1, m2, tau=0.1):
    """Triton twin of `hsc_fast.ops.psc_terms_reference` (same arguments, same (4,) float32
    result; shapes are validated by the dispatcher `hsc_fast.ops.psc_terms`)."""
    from hsc_fast.ops import EMBED_NORM_EPS

    op = "psc_terms"
    check_runnable(op, f1, f2, y1, y2, p1, p2, m1, m2)
    check_float(op, "f1", f1)
    check_float(op, "f2", f2)
    if f1.dtype != f2.dtype:  # one kernel specialisation serves both views
        f1, f2 = f1.float(), f2.float()
    if 3 * p1.shape[0] > 256:
        raise HscError(f"psc_terms: at most 85 classes fit the fused logit block, got {p1.shape[0]}")
    protos = [row_major(t.detach()).contiguous() for t in (p1, p2, m1, m2)]
    for name, t in zip(("p1", "p2", "m1", "m2"), protos):
        check_float(op, name, t)
    if protos[0].dtype != protos[1].dtype:  # the kernel swaps p1/p2 between the views
        protos[0], protos[1] = protos[0].float(), protos[1].float()
    if protos[2].dtype != protos[3].dtype:
        protos[2], protos[3] = protos[2].float(), protos[3].float()
    labels = [y.detach().contiguous() for y in (y1, y2)]
    return PscTermsFunction.apply(row_major(f1), row_major(f2), *labels, *protos, float(tau),
                                  EMBED_NORM_EPS)
