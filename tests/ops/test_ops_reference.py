"""hsc_fast.ops references vs loop-based re-derivations from their definitions."""
import math

import pytest
import torch

from hsc_fast import ops
from hsc_fast.errors import ConfigError


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- roi_pool
def _roi_pool_loops(feats, masks, count_eps, norm_eps):
    n, d, p = feats.shape
    k = masks.shape[1]
    out = torch.zeros(n, k, d, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            total = [0.0] * d
            count = 0.0
            for q in range(p):
                m = float(masks[i, j, q])
                count += m
                for c in range(d):
                    total[c] += m * float(feats[i, c, q])
            mean = [t / (count + count_eps) for t in total]
            norm = math.sqrt(sum(v * v for v in mean))
            out[i, j] = torch.tensor(mean, dtype=torch.float64) / max(norm, norm_eps)
    return out


def test_roi_pool_matches_loops_including_empty_mask():
    g = _gen(1)
    feats = torch.randn(3, 5, 12, generator=g)
    masks = (torch.rand(3, 2, 12, generator=g) > 0.5).float()
    masks[1, 0] = 0.0  # an empty region pools to the zero vector
    out = ops.roi_pool(feats, masks, impl="torch")
    want = _roi_pool_loops(feats, masks, 1e-5, 1e-5)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(out[1, 0] == 0)
    norms = out.norm(dim=-1)
    assert torch.allclose(norms[masks.sum(-1) > 0], torch.ones(()), atol=1e-6)


def test_roi_pool_norm_eps_applies_to_tiny_vectors():
    feats = torch.full((1, 2, 4), 1e-7)
    masks = torch.ones(1, 1, 4)
    out = ops.roi_pool(feats, masks, impl="torch")
    # ||v|| = sqrt(2)*1e-7*4/(4+1e-5) < 1e-5: divided by norm_eps, not by the norm
    want = _roi_pool_loops(feats, masks, 1e-5, 1e-5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-12)
    assert out.norm() < 0.1


def test_roi_pool_gradcheck():
    g = _gen(2)
    feats = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    masks = (torch.rand(2, 2, 6, generator=g) > 0.4).double()

    def f(x):  # reference math in float64 (roi_pool computes in float32)
        v = torch.einsum("nkp,ndp->nkd", masks, x) / (masks.sum(-1, keepdim=True) + 1e-5)
        return ops.l2_normalize(v, eps=1e-5)

    assert torch.autograd.gradcheck(f, (feats,))
    out = ops.roi_pool(feats, masks, impl="torch")
    out.sum().backward()
    ref = feats.detach().clone().requires_grad_(True)
    f(ref).sum().backward()
    torch.testing.assert_close(feats.grad, ref.grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- topk_proto
def _topk_proto_loops(scores, feats, k, k_denom, normalize):
    c_rows, m = scores.shape
    k = min(k, m)
    k_denom = k if k_denom is None else min(k_denom, m)
    out = torch.zeros(c_rows, feats.shape[1], dtype=torch.float64)
    for c in range(c_rows):
        order = sorted(range(m), key=lambda i: -float(scores[c, i]))
        num = sum(float(scores[c, i]) * feats[i].double() for i in order[:k])
        den = sum(float(scores[c, i]) for i in order[:k_denom])
        v = num / (den if den != 0 else 1.0)
        if normalize:
            v = v / max(float(v.norm()), 1e-12)
        out[c] = v
    return out


@pytest.mark.parametrize("k,k_denom,normalize", [(4, None, True), (2, 7, True), (3, None, False),
                                                  (50, 80, True)])
def test_topk_proto_matches_loops(k, k_denom, normalize):
    g = _gen(3)
    scores = torch.rand(5, 20, generator=g)  # distinct values: no ties
    feats = torch.randn(20, 6, generator=g)
    out = ops.topk_proto(scores, feats, k, k_denom=k_denom, normalize=normalize, impl="torch")
    want = _topk_proto_loops(scores, feats, k, k_denom, normalize)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_topk_proto_zero_row_is_finite_zero():
    scores = torch.zeros(2, 8)
    scores[1, 3] = 0.5
    feats = torch.randn(8, 4, generator=_gen(4))
    out = ops.topk_proto(scores, feats, 3, impl="torch")
    assert torch.isfinite(out).all()
    assert torch.all(out[0] == 0)
    torch.testing.assert_close(out[1], ops.l2_normalize(feats[3]))


def test_topk_proto_negative_scores_like_official_normalised_cam():
    # Official normalised CAM rows can be all -1 (a constant channel): the mean of the top-k.
    scores = -torch.ones(1, 6)
    feats = torch.randn(6, 3, generator=_gen(5))
    out = ops.topk_proto(scores, feats, 6, normalize=False, impl="torch")
    torch.testing.assert_close(out[0], feats.mean(0))


def test_topk_proto_grad_flows_to_feats_only():
    g = _gen(6)
    scores = torch.rand(3, 10, generator=g, requires_grad=True)
    feats = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ops.topk_proto(scores, feats, 4, k_denom=6, impl="torch").pow(3).sum().backward()
    assert scores.grad is None
    sel = torch.topk(scores.detach(), 6, dim=1)

    def f(x):
        num = (sel.values[:, :4, None].double() * x[sel.indices[:, :4]]).sum(1)
        return ops.l2_normalize(num / sel.values.double().sum(1, keepdim=True))

    assert torch.autograd.gradcheck(f, (feats.detach().clone().requires_grad_(True),))
    ref = feats.detach().clone().requires_grad_(True)
    f(ref).pow(3).sum().backward()
    torch.testing.assert_close(feats.grad, ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_stable_topk_is_the_head_of_a_stable_descending_sort(k):
    g = _gen(7)
    scores = torch.randint(0, 4, (4, 40), generator=g).float()  # heavy ties everywhere
    scores[1] = 0.1                                             # one all-tied row (PSC background)
    scores[2] = torch.rand(40, generator=g)                     # and one without ties
    values, index = ops.stable_topk(scores, k)
    want = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(index, want.indices[:, :k])
    assert torch.equal(values, want.values[:, :k])


@pytest.mark.parametrize("k,k_denom", [(3, None), (2, 7), (7, 3)])
def test_topk_proto_ties_go_to_the_lower_pixel_index(k, k_denom):
    """Tied scores straddling the cut: the lowest-index tied pixels win (the loops' stable
    `sorted`), so a batch split over ranks can reproduce the selection exactly."""
    g = _gen(8)
    scores = torch.randint(0, 3, (5, 20), generator=g).float() / 2
    scores[4] = 0.1
    feats = torch.randn(20, 6, generator=g)
    out = ops.topk_proto(scores, feats, k, k_denom=k_denom, impl="torch")
    want = _topk_proto_loops(scores, feats, k, k_denom, True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- psc_terms
def _nce_loops(e, protos, y, tau):
    total = 0.0
    for i in range(e.shape[0]):
        logits = [float(e[i] @ protos[k]) / tau for k in range(protos.shape[0])]
        total += -math.log(math.exp(logits[int(y[i])]) / sum(math.exp(v) for v in logits))
    return total / e.shape[0]


def _psc_inputs(seed, m=10, d=8, c=21, dtype=torch.float32):
    g = _gen(seed)
    f1 = torch.randn(m, d, generator=g, dtype=dtype)
    f2 = torch.randn(m, d, generator=g, dtype=dtype)
    y1 = torch.randint(0, c, (m,), generator=g)
    y2 = torch.randint(0, c, (m,), generator=g)
    p1 = ops.l2_normalize(torch.randn(c, d, generator=g, dtype=dtype))
    p2 = ops.l2_normalize(torch.randn(c, d, generator=g, dtype=dtype))
    m1 = torch.randn(c, d, generator=g, dtype=dtype)  # banks are not normalised
    m2 = torch.randn(c, d, generator=g, dtype=dtype)
    return f1, f2, y1, y2, p1, p2, m1, m2


def test_psc_terms_matches_loops():
    f1, f2, y1, y2, p1, p2, m1, m2 = _psc_inputs(7)
    out = ops.psc_terms(f1, f2, y1, y2, p1, p2, m1, m2, tau=0.1, impl="torch")
    e1 = f1.double() / f1.double().norm(dim=1, keepdim=True)
    e2 = f2.double() / f2.double().norm(dim=1, keepdim=True)
    p1, p2, m1, m2 = (t.double() for t in (p1, p2, m1, m2))
    want = [
        (_nce_loops(e1, p2, y1, 0.1) + _nce_loops(e2, p1, y2, 0.1)) / 2,
        (_nce_loops(e1, p1, y2, 0.1) + _nce_loops(e2, p2, y1, 0.1)) / 2,
        (_nce_loops(e1, p1, y1, 0.1) + _nce_loops(e2, p2, y2, 0.1)) / 2,
        (_nce_loops(e1, m1, y1, 0.1) + _nce_loops(e2, m2, y2, 0.1)) / 2,
    ]
    torch.testing.assert_close(out.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_psc_terms_stable_where_plain_formula_overflows():
    f1, f2, y1, y2, p1, p2, m1, m2 = _psc_inputs(8)
    m1 = m1 * 100.0  # logits ~ 1e3: exp() overflows float32 in the plain formula
    out = ops.psc_terms(f1, f2, y1, y2, p1, p2, m1, m2, impl="torch")
    assert torch.isfinite(out).all()
    e1 = f1.double() / f1.double().norm(dim=1, keepdim=True)
    want = (_nce_loops_lse(e1, m1.double(), y1, 0.1) +
            _nce_loops(f2.double() / f2.double().norm(dim=1, keepdim=True), m2.double(), y2, 0.1)) / 2
    torch.testing.assert_close(out[3].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)


def _nce_loops_lse(e, protos, y, tau):
    total = 0.0
    for i in range(e.shape[0]):
        logits = [float(e[i] @ protos[k]) / tau for k in range(protos.shape[0])]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[int(y[i])]
    return total / e.shape[0]


def test_psc_terms_gradcheck_and_no_grad_to_prototypes():
    f1, f2, y1, y2, p1, p2, m1, m2 = _psc_inputs(9, m=5, d=4, c=6, dtype=torch.float64)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    p1.requires_grad_(True)

    def f(a, b):
        return ops.psc_terms_reference(a.double(), b.double(), y1, y2, p1, p2, m1, m2)

    # the reference computes in float32; gradcheck the same math in float64
    def f64(a, b):
        ea, eb = ops.l2_normalize(a), ops.l2_normalize(b)
        P1, P2 = p1.detach(), p2
        def nce(e, P, y):
            return ops.nce_rows(e, P, y, 0.1).mean()
        return torch.stack([(nce(ea, P2, y1) + nce(eb, P1, y2)) / 2, (nce(ea, P1, y2) + nce(eb, P2, y1)) / 2,
                            (nce(ea, P1, y1) + nce(eb, P2, y2)) / 2, (nce(ea, m1, y1) + nce(eb, m2, y2)) / 2])

    assert torch.autograd.gradcheck(f64, (f1, f2))
    out = f(f1, f2)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (out * w).sum().backward()
    g1, g2 = f1.grad.clone(), f2.grad.clone()
    f1.grad = f2.grad = None
    (f64(f1, f2) * w.double()).sum().backward()
    torch.testing.assert_close(g1, f1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g2, f2.grad, atol=1e-5, rtol=1e-4)
    assert p1.grad is None


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_choices():
    x = torch.zeros(1)
    assert ops.use_triton("torch", x) is False
    assert ops.use_triton("triton", x) is True
    assert ops.use_triton("auto", x) is False  # CPU tensor -> reference
    with pytest.raises(ConfigError, match="loss.impl"):
        ops.use_triton("cuda", x)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="masks"):
        ops.roi_pool(torch.zeros(1, 2, 3), torch.zeros(1, 3), impl="torch")
    with pytest.raises(ValueError, match="agree on M"):
        ops.topk_proto(torch.zeros(2, 3), torch.zeros(4, 2), 1, impl="torch")
