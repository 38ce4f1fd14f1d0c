"""The Triton kernels (kernels/) against the PyTorch references in hsc_fast/ops/__init__.py.

On CPU they run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the shapes are
small but awkward: odd h*w, one image, empty masks, k above the candidate count, one label
everywhere, non-contiguous inputs, bf16 (the 16-bit dot branch runs too: emulated, see
`kernels._common.emulate_bf16`), empty inputs, the deterministic backward. `cuda`-marked tests
repeat the checks at the real training shapes on a GPU with compiled kernels (tensor-core bf16
paths) at the tolerances the self-check uses (`hsc_fast.ops.check.TOLERANCES`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hsc_fast import ops
from hsc_fast.errors import HscError
from hsc_fast.ops.check import TOLERANCES
from hsc_fast.ops import LossInputError
from kernels import _common
from kernels.psc import CHUNK_ROWS, _meta as _psc_meta, _to_bf16_bits, column_layout, psc_terms_triton
from kernels.topk_proto import MAX_KEEP, key_index, select_topk, topk_proto_triton

pytestmark = pytest.mark.interpreter  # the CPU tests run kernels on CPU tensors


def psc_meta(f1, p1):
    return _psc_meta(f1, p1, backward=False)

# Relative tolerance per input dtype. The kernels accumulate in float32 whatever the input;
# 16-bit cases compare against the float32 reference run on the same (rounded) inputs, and
# the gradients come back in the input dtype (bf16: 8 mantissa bits).
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_rel(actual, expected, rel):
    """Elementwise |a - e| <= rel * (|e| + max|e|): relative to the tensor's scale, so entries
    that are round-off-sized next to the largest ones do not need exact agreement."""
    actual, expected = actual.detach().float(), expected.detach().float()
    if expected.numel() == 0:
        assert actual.shape == expected.shape
        return
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale.item())


def grads_of(fn, inputs, grad_out):
    """Output and d(sum(out * grad_out))/d(inputs) of fn(*inputs) (inputs keep their strides)."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads


# ------------------------------------------------------------------------------------------
# psc_terms
# ------------------------------------------------------------------------------------------
def psc_inputs(m, d=128, c=21, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f1 = torch.randn(m, d, generator=g).relu()  # the PSC projector ends in a ReLU
    f2 = torch.randn(m, d, generator=g)
    y1 = torch.randint(0, c, (m,), generator=g)
    y2 = torch.randint(0, c, (m,), generator=g)
    p1, p2 = (F.normalize(torch.randn(c, d, generator=g), dim=1) for _ in range(2))
    m1, m2 = (torch.randn(c, d, generator=g) for _ in range(2))  # banks: not normalised
    fs = [t.to(device=device, dtype=dtype) for t in (f1, f2)]
    return fs + [t.to(device) for t in (y1, y2, p1, p2, m1, m2)]


def check_psc(inputs, dtype, tau=0.1, grad_weights=(1.0, -0.5, 2.0, 0.25)):
    f1, f2, y1, y2, p1, p2, m1, m2 = inputs
    g = torch.tensor(grad_weights, device=f1.device)
    run = lambda impl: grads_of(  # noqa: E731
        lambda a, b: ops.psc_terms(a, b, y1, y2, p1, p2, m1, m2, tau=tau, impl=impl), (f1, f2), g)
    out, (d1, d2) = run("triton")
    ref, (r1, r2) = run("torch")
    assert out.dtype == torch.float32 and out.shape == (4,)
    assert d1.dtype == dtype and d2.dtype == dtype
    assert_rel(out, ref, FWD_TOL[dtype])
    assert_rel(d1, r1, GRAD_TOL[dtype])
    assert_rel(d2, r2, GRAD_TOL[dtype])
    return out, ref


@pytest.mark.parametrize("m", [77, 1, 35, 1100])  # odd; 35 = one 5x7 image; 1100: tile loop
def test_psc_matches_reference_fp32(m):
    check_psc(psc_inputs(m), torch.float32)


def test_psc_one_label_everywhere_and_odd_width():
    f1, f2, y1, y2, p1, p2, m1, m2 = psc_inputs(45, d=40, c=5, seed=1)
    out, _ = check_psc([f1, f2, torch.full_like(y1, 3), torch.full_like(y2, 3), p1, p2, m1, m2],
                       torch.float32, tau=0.07)
    # Same labels in both views: the cross-label term is then the intra term.
    torch.testing.assert_close(out[1], out[2], rtol=1e-6, atol=0)


def test_psc_bf16_inputs():
    check_psc(psc_inputs(64, dtype=torch.bfloat16, seed=2), torch.bfloat16)


def test_psc_strided_embeddings_and_zero_pixel():
    f1, f2, *rest = psc_inputs(30, d=64, seed=3)
    wide = torch.randn(30, 80)
    wide[:, :64] = f1
    wide[4, :64] = 0.0  # an all-zero (ReLU'd) pixel: norm clamped at eps, as F.normalize
    f1 = wide[:, :64]
    assert not f1.is_contiguous()
    out, ref = check_psc([f1, f2, *rest], torch.float32)
    assert torch.isfinite(out).all()


def test_psc_gradient_is_linear_in_grad_output():
    """Backward must honour each term's grad_output weight separately (not just their sum)."""
    inputs = psc_inputs(20, d=32, c=4, seed=4)
    f1, f2, y1, y2, p1, p2, m1, m2 = inputs
    fn = lambda a, b: psc_terms_triton(a, b, y1, y2, p1, p2, m1, m2, 0.1)  # noqa: E731
    per_term = [grads_of(fn, (f1, f2), torch.eye(4)[t])[1][0] for t in range(4)]
    weights = torch.tensor([0.3, -1.0, 2.0, 0.5])
    _, (combined, _) = grads_of(fn, (f1, f2), weights)
    expected = sum(w * g for w, g in zip(weights, per_term))
    assert_rel(combined, expected, 1e-5)
    assert not torch.allclose(per_term[0], per_term[1])


@pytest.mark.parametrize("c,m,d", [(81, 77, 128), (81, 1, 16), (23, 35, 40), (40, 300, 24)])
def test_psc_many_classes_match_reference(c, m, d):
    """More classes than one 64-column block holds (3C > 64): the chunked kernels. 81 = MS COCO
    (chunks of 32 + 32 + 17 rows per set); 23 (one partial chunk per set) and 40 (odd chunk tail)."""
    inputs = psc_inputs(m, d=d, c=c, seed=c)
    grid, meta = psc_meta(inputs[0], inputs[4])
    assert column_layout(c) == "chunked" and meta["BLOCK_J"] == CHUNK_ROWS < c + 16
    check_psc(inputs, torch.float32)


def test_psc_many_classes_bf16_and_labels_in_the_last_chunk():
    """bf16 (the 16-bit branch, emulated) at C = 81, every label in the last, partial chunk
    (rows 64..80): the online log-sum-exp and the picks across chunk borders."""
    f1, f2, y1, y2, p1, p2, m1, m2 = psc_inputs(90, c=81, dtype=torch.bfloat16, seed=7)
    y1, y2 = 64 + y1 % 17, 80 - y2 % 17
    check_psc([f1, f2, y1, y2, p1, p2, m1, m2], torch.bfloat16)


def test_psc_chunked_and_one_block_kernels_agree(monkeypatch):
    """The same VOC-sized problem (C = 21) through both layouts: the one-block kernels (the
    default) and, with the block limit lowered to 0, the chunked ones; terms and gradients agree
    to float32 round-off, and each matches the reference."""
    import kernels.psc as psc
    inputs = psc_inputs(130, c=21, seed=11)
    assert column_layout(21) == "one_block" and column_layout(22) == "chunked"
    one_block = check_psc(inputs, torch.float32)[0]
    f1, f2, y1, y2, *protos = inputs
    g = torch.tensor([1.0, -0.5, 2.0, 0.25])
    fn = lambda a, b: psc_terms_triton(a, b, y1, y2, *protos, 0.1)  # noqa: E731
    _, grads_one = grads_of(fn, (f1, f2), g)
    monkeypatch.setattr(psc, "ONE_BLOCK_COLUMNS", 0)
    assert column_layout(21) == "chunked"
    chunked = check_psc(inputs, torch.float32)[0]
    _, grads_chunked = grads_of(fn, (f1, f2), g)
    assert_rel(chunked, one_block, 1e-6)
    for a, b in zip(grads_chunked, grads_one):
        assert_rel(a, b, 1e-6)


def test_psc_chunked_forward_without_gradient_keeps_no_lse():
    """Under no_grad the chunked forward stores no log-sum-exps (no (2, 3, M) buffer)."""
    from kernels.psc import psc_forward, prepare_inputs
    inputs = prepare_inputs(*psc_inputs(50, c=81, seed=12))
    terms, lse = psc_forward(*inputs, 0.1, 1e-12, save_lse=False)
    assert lse is None
    ref = ops.psc_terms_reference(*psc_inputs(50, c=81, seed=12))
    assert_rel(terms, ref, FWD_TOL[torch.float32])
    _, lse = psc_forward(*inputs, 0.1, 1e-12, save_lse=True)
    assert lse.shape == (2, 3, 50) and torch.isfinite(lse).all()


def test_psc_rejects_integer_embeddings():
    f1, f2, y1, y2, p1, p2, m1, m2 = psc_inputs(8, d=16, c=3)
    with pytest.raises(HscError, match="f1"):
        psc_terms_triton(f1.long(), f2, y1, y2, p1, p2, m1, m2, 0.1)


# ------------------------------------------------------------------------------------------
# roi_pool
# ------------------------------------------------------------------------------------------
def roi_inputs(n, d, hw, k=2, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, hw, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (n, hw), generator=g)
    masks = F.one_hot(labels, k).permute(0, 2, 1).float().to(device)
    return feats, masks


def compare_impls(op, feats, g, dtype, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL):
    """Run `op(feats, impl)` as Triton and as the reference; outputs and d/dfeats must agree."""
    run = lambda impl: grads_of(lambda f: op(f, impl), (feats,), g)  # noqa: E731
    out, (df,) = run("triton")
    ref, (rf,) = run("torch")
    assert out.dtype == torch.float32 and df.dtype == dtype
    assert_rel(out, ref, fwd_tol[dtype])
    assert_rel(df, rf, grad_tol[dtype])
    return out


def check_roi(feats, masks, dtype, tol=None, **eps):
    g = torch.randn(feats.shape[0], masks.shape[1], feats.shape[1]).to(feats.device)
    return compare_impls(lambda f, impl: ops.roi_pool(f, masks, impl=impl, **eps), feats, g, dtype, **(tol or {}))


@pytest.mark.parametrize("n,d,hw,k", [(3, 256, 35, 2), (1, 40, 49, 3), (2, 16, 1, 2)])
def test_roi_pool_matches_reference(n, d, hw, k):
    check_roi(*roi_inputs(n, d, hw, k), torch.float32)


@pytest.mark.parametrize("k", [81, 5])
def test_roi_pool_many_regions_match_reference(k):
    """RSC pools two regions (bg / fg) whatever the class count, but the op takes any K: 81 regions
    (one per MS COCO label, BLOCK_K 128) and an odd 5."""
    check_roi(*roi_inputs(2, 24, 49, k, seed=k), torch.float32)


def test_roi_pool_empty_mask_gives_zero():
    feats, masks = roi_inputs(2, 64, 25)
    masks[1, 0] = 0.0  # image 1 has no background pixel
    masks[1, 1] = 1.0
    out = check_roi(feats, masks, torch.float32, count_eps=1e-5, norm_eps=1e-5)
    assert out[1, 0].abs().max() == 0
    torch.testing.assert_close(out[1, 1].norm(), torch.tensor(1.0))


def test_roi_pool_bf16_and_strided_feats():
    feats, masks = roi_inputs(2, 48, 63, dtype=torch.bfloat16, seed=5)
    check_roi(feats, masks, torch.bfloat16)
    wide = torch.randn(2, 48, 70)
    strided = wide[:, :, 5:68]  # unit stride on P, a larger stride on D and N
    check_roi(strided, masks, torch.float32)
    check_roi(torch.randn(2, 63, 48).transpose(1, 2), masks, torch.float32)  # P not unit-stride


# ------------------------------------------------------------------------------------------
# topk_proto
# ------------------------------------------------------------------------------------------
def topk_inputs(c, m, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(c, m, generator=g)
    scores[0] -= 0.5  # negative scores too (the order-preserving key must handle signs)
    feats = torch.randn(m, d, generator=g).to(dtype)
    return scores.to(device), feats.to(device)


def check_topk(scores, feats, k, k_denom=None, normalize=True, dtype=torch.float32, tol=None):
    g = torch.randn(scores.shape[0], feats.shape[1]).to(feats.device)
    return compare_impls(
        lambda f, impl: ops.topk_proto(scores, f, k, k_denom=k_denom, normalize=normalize, impl=impl),
        feats, g, dtype, **(tol or {}))


@pytest.mark.parametrize("k,k_denom,normalize", [(16, None, True), (4, 32, True), (32, 8, False)])
def test_topk_proto_matches_reference(k, k_denom, normalize):
    check_topk(*topk_inputs(4, 245, 24), k, k_denom, normalize)


@pytest.mark.parametrize("c,k,k_denom", [(80, 16, 40), (81, 8, None), (37, 4, 9)])
def test_topk_proto_coco_rows_match_reference(c, k, k_denom):
    """MS COCO's 80 foreground rows (CSC) and 81 (PSC), and an odd 37: one program per row."""
    check_topk(*topk_inputs(c, 245, 24, seed=c), k, k_denom)


def test_topk_proto_k_above_candidates_and_zero_row():
    scores, feats = topk_inputs(3, 7, 16, seed=1)
    scores[2] = 0.0  # a class with all-zero scores: den = 1, prototype = 0 (not NaN)
    out = check_topk(scores, feats, k=20, k_denom=50)
    assert out[2].abs().max() == 0


def test_topk_proto_bf16_feats():
    check_topk(*topk_inputs(3, 130, 32, dtype=torch.bfloat16, seed=2), 16, dtype=torch.bfloat16)


def test_select_topk_multi_pass_matches_torch_topk():
    """Width 32 with keep 16 forces several merge passes (555 -> 35 chunks -> ... -> 1)."""
    scores, _ = topk_inputs(2, 555, 1, seed=3)
    keys = select_topk(scores, keep=16, width=32)
    expected = torch.topk(scores, 16, dim=1)
    assert torch.equal(key_index(keys), expected.indices)  # distinct scores: unique order


def test_select_topk_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0, 0.0, 3.0]])
    assert key_index(select_topk(scores, keep=3)).tolist() == [[1, 2, 4]]


def stable_order(scores, keep):
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]


def test_select_topk_ties_follow_a_stable_sort_over_merge_passes():
    """Few distinct values (+0.0 and -0.0 among them, which compare equal) across several merge
    passes: the same columns, in the same order, as a stable descending sort."""
    g = torch.Generator().manual_seed(9)
    scores = torch.randint(-2, 3, (3, 555), generator=g).float() / 4
    scores[1, ::3] = -0.0
    scores[2] = 0.1  # PSC's constant background channel: every pixel ties
    keys = select_topk(scores, keep=16, width=32)
    assert torch.equal(key_index(keys), stable_order(scores, 16))


def test_topk_proto_ties_pick_the_reference_pixels():
    """Ties straddling the cut: the kernel must choose the same pixels as the reference (an
    arbitrary tied pixel would give a different prototype)."""
    scores, feats = topk_inputs(3, 300, 16, seed=4)
    scores = (scores * 4).round() / 4
    scores[2] = 0.1
    check_topk(scores, feats, 16, 40)


def test_topk_proto_rejects_oversized_k():
    scores, feats = topk_inputs(1, MAX_KEEP + 10, 4)
    with pytest.raises(HscError, match="k_denom"):
        topk_proto_triton(scores, feats, MAX_KEEP + 1)


# ------------------------------------------------------------------------------------------
# The 16-bit dot branch (emulated in the interpreter), determinism, empty inputs, targets
# ------------------------------------------------------------------------------------------
@triton.jit
def _bf16_round_probe(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _to_bf16_bits(tl.load(x_ptr + i)))


def test_emulated_bf16_rounding_is_round_to_nearest_even():
    """`_to_bf16_bits` must round exactly like a GPU's (and torch's) float32 -> bf16 cast: ties
    to even, negatives, tiny and large values (the interpreter's own cast truncates)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=g) * 10 ** torch.randint(-30, 30, (200,), generator=g).float(),
                   torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 2 ** -130, -0.0, 3.0e38])])
    x = torch.cat([x, torch.zeros(256 - x.numel())])
    out = torch.empty_like(x)
    _bf16_round_probe[(1,)](x, out, N=256)
    assert torch.equal(out, x.to(torch.bfloat16).float())


def test_psc_bf16_runs_the_16bit_branch():
    """bf16 embeddings take LOWP (emulated here): within bf16 tolerance of the float32 reference,
    and measurably different from the float32 branch on the same (exactly upcast) values, whose
    gradients are not rounded to bf16 -- so the branch that runs on a GPU is the one tested."""
    inputs = psc_inputs(64, dtype=torch.bfloat16, seed=6)
    f1, f2, y1, y2, p1, p2, m1, m2 = inputs
    grid, meta = psc_meta(f1, p1)
    assert meta["LOWP"] and meta["EMULATE"]
    out, _ = check_psc(inputs, torch.bfloat16)
    g = torch.tensor([1.0, -0.5, 2.0, 0.25])
    fn = lambda a, b: psc_terms_triton(a, b, y1, y2, p1, p2, m1, m2, 0.1)  # noqa: E731
    _, (d_lowp, _) = grads_of(fn, (f1, f2), g)
    _, (d_fp32, _) = grads_of(fn, (f1.float(), f2.float()), g)
    assert d_lowp.dtype == torch.bfloat16
    assert (d_lowp.float() - d_fp32).abs().max() > 0


def test_topk_proto_deterministic_mode_avoids_atomics(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward never launches the atomic
    kernel, equals the reference, and repeats bit for bit."""
    import kernels.topk_proto as tp
    launched = []
    real_launch = tp.launch
    monkeypatch.setattr(tp, "launch", lambda kernel, *a, **k: (launched.append(kernel), real_launch(kernel, *a, **k)))
    scores, feats = topk_inputs(3, 300, 16, seed=8)
    scores = (scores * 4).round() / 4  # shared pixels between rows (what makes atomics collide)
    torch.use_deterministic_algorithms(True)
    try:
        check_topk(scores, feats, 16, 40)
        first = grads_of(lambda f: topk_proto_triton(scores, f, 16, 40), (feats,), torch.ones(3, 16))[1][0]
        second = grads_of(lambda f: topk_proto_triton(scores, f, 16, 40), (feats,), torch.ones(3, 16))[1][0]
    finally:
        torch.use_deterministic_algorithms(False)
    assert tp._proto_bwd_kernel not in launched and tp._proto_kernel in launched
    assert torch.equal(first, second)


def test_empty_inputs_launch_nothing_and_match_the_reference():
    feats, masks = roi_inputs(0, 32, 20)
    assert ops.roi_pool(feats, masks, impl="triton").shape == (0, 2, 32)
    feats, masks = roi_inputs(2, 32, 0)  # no pixels: empty regions -> zero vectors, zero gradient
    check_roi(feats.requires_grad_(False), masks, torch.float32)
    scores, feats = torch.zeros(4, 0), torch.zeros(0, 16)
    for impl in ("triton", "torch"):
        assert torch.equal(ops.topk_proto(scores, feats, 8, impl=impl), torch.zeros(4, 16))
    f1, f2, y1, y2, p1, p2, m1, m2 = psc_inputs(0, d=16, c=3)
    with pytest.raises(LossInputError, match="no pixels"):
        ops.psc_terms(f1, f2, y1, y2, p1, p2, m1, m2, impl="triton")
    _common.launch(_bf16_round_probe, (0,), torch.zeros(1), torch.zeros(1), N=16)  # zero grid: a no-op


def test_launchers_pick_target_specific_configs_under_recording():
    """Recording on meta tensors returns the launches a GPU would get, nothing runs; an A100 and
    an H100 get the GPU blocks, not the interpreter's."""
    from kernels import aot
    with _common.recording(_common.SM80) as launches:
        aot._psc_case(12 * 256, 128, torch.float32)
    names = [lau.name for lau in launches]
    assert names == ["_psc_fwd_kernel", "_psc_bwd_kernel"]
    fwd, bwd = launches
    assert (fwd.meta["BLOCK_M"], fwd.meta["num_warps"]) == (32, 8)
    assert (bwd.meta["BLOCK_M"], bwd.meta["num_warps"]) == (16, 8)
    assert not _common.is_recording()
    f1 = torch.randn(12 * 256, 128)
    _, interp = psc_meta(f1, torch.randn(21, 128))
    assert interp["BLOCK_M"] == 256


# ------------------------------------------------------------------------------------------
# CUDA: compiled kernels at the real training shapes
# ------------------------------------------------------------------------------------------
CUDA_FWD_TOL, CUDA_GRAD_TOL = TOLERANCES["fwd"], TOLERANCES["grad"]
CUDA_TOL = dict(fwd_tol=CUDA_FWD_TOL, grad_tol=CUDA_GRAD_TOL)


@pytest.mark.cuda
@pytest.mark.compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [12 * 16 * 16, 8 * 56 * 56 + 0])
@pytest.mark.parametrize("c", [21, 81])  # VOC: one block; MS COCO: chunked columns
def test_cuda_psc_real_shapes(dtype, m, c):
    inputs = psc_inputs(m, c=c, dtype=dtype, device="cuda")
    f1, f2, y1, y2, p1, p2, m1, m2 = inputs
    g = torch.tensor([1.0, -0.5, 2.0, 0.25], device="cuda")
    run = lambda impl: grads_of(  # noqa: E731
        lambda a, b: ops.psc_terms(a, b, y1, y2, p1, p2, m1, m2, impl=impl), (f1, f2), g)
    out, (d1, d2) = run("triton")
    ref, (r1, r2) = run("torch")
    # bf16 on the GPU: 16-bit tensor-core dots with hi/lo-split prototypes (~1e-5 relative).
    assert_rel(out, ref, CUDA_FWD_TOL[dtype])
    assert_rel(d1, r1, CUDA_GRAD_TOL[dtype])
    assert_rel(d2, r2, CUDA_GRAD_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hw", [(12, 256), (8, 56 * 56)])
def test_cuda_roi_pool_real_shapes(dtype, n, hw):
    feats, masks = roi_inputs(n, 256, hw, dtype=dtype, device="cuda")
    masks[0, 0] = 0.0
    check_roi(feats, masks, dtype, tol=CUDA_TOL)


@pytest.mark.cuda
@pytest.mark.compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,m,d,k,k_denom", [(20, 12 * 256, 256, 128, None),
                                             (20, 12 * 256, 256, 16, 128),
                                             (80, 12 * 256, 256, 128, None),
                                             (81, 8 * 56 * 56, 128, 16, None),
                                             (21, 16 * 112 * 112, 128, 128, None)])
def test_cuda_topk_proto_real_shapes(dtype, c, m, d, k, k_denom):
    check_topk(*topk_inputs(c, m, d, dtype=dtype, device="cuda"), k, k_denom, dtype=dtype, tol=CUDA_TOL)
