"""SEAM / EPS / PPC terms vs re-derivations from the authors' code (loops, in-place like theirs)."""
import math

import torch
import torch.nn.functional as F

from hsc_fast.config import LossConfig
from hsc_fast.losses import (adaptive_min_pooling_loss, eps_saliency_loss, max_onehot, ppc_intra, ppc_loss,
                             seam_er_ecr, seam_max_norm)
from hsc_fast.ops import l2_normalize

TOL = dict(atol=1e-5, rtol=1e-5)


def _lab21(label):
    return torch.cat([label, torch.ones(label.shape[0], 1)], 1)[:, :, None, None]


def _ref_max_norm(p, e=1e-5):
    p = p.clamp(min=0)
    out = torch.empty_like(p)
    for i in range(p.shape[0]):
        for c in range(p.shape[1]):
            x = p[i, c]
            out[i, c] = (x - x.min() - e).clamp(min=0) / (x.max() - x.min() + e)
    return out


def _ref_onehot_official(x):
    """SEAM's helper as the HSC code calls it: channels 1.. compete, channel 0 untouched."""
    x = x.clone()
    for i in range(x.shape[0]):
        for yy in range(x.shape[2]):
            for xx in range(x.shape[3]):
                top = x[i, 1:, yy, xx].max()
                for c in range(1, x.shape[1]):
                    if x[i, c, yy, xx] != top:
                        x[i, c, yy, xx] = 0
    return x


def _ref_er_ecr(cam1, cam2, rv1, rv2, label):
    lab = _lab21(label)
    hw = cam2.shape[-2:]
    c1 = F.interpolate(_ref_max_norm(cam1), size=hw, mode="bilinear", align_corners=True) * lab
    c2 = _ref_max_norm(cam2) * lab
    er = torch.mean(torch.abs(c1[:, :-1] - c2[:, :-1]))
    c1, c2 = c1.detach().clone(), c2.detach().clone()
    c1[:, -1] = 1 - c1[:, :-1].max(1)[0]
    c2[:, -1] = 1 - c2[:, :-1].max(1)[0]
    r1 = F.interpolate(_ref_max_norm(rv1), size=hw, mode="bilinear", align_corners=True) * lab
    r2 = _ref_max_norm(rv2) * lab
    n = cam2.shape[0]
    k = int(21 * hw[0] * hw[1] * 0.2)
    t1 = torch.abs(_ref_onehot_official(c2) - r1).view(n, -1)
    t2 = torch.abs(_ref_onehot_official(c1) - r2).view(n, -1)
    return er, torch.topk(t1, k, -1)[0].mean() + torch.topk(t2, k, -1)[0].mean()


def _inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(True)  # noqa: E731
    label = torch.zeros(n, 20)
    label[0, 1] = 1
    label[-1, 0] = 1
    label[-1, 9] = 1
    return r(n, 21, 8, 8), r(n, 21, 4, 4), r(n, 21, 8, 8), r(n, 21, 4, 4), label


def test_seam_max_norm_matches_loops():
    cam = _inputs()[0]
    torch.testing.assert_close(seam_max_norm(cam), _ref_max_norm(cam), **TOL)


def test_er_ecr_match_official_values_and_gradients():
    cam1, cam2, rv1, rv2, label = _inputs(1)
    er, ecr = seam_er_ecr(cam1, cam2, rv1, rv2, label)
    leaves = [t.detach().clone().requires_grad_(True) for t in (cam1, cam2, rv1, rv2)]
    er_ref, ecr_ref = _ref_er_ecr(*leaves, label)
    torch.testing.assert_close(er, er_ref, **TOL)
    torch.testing.assert_close(ecr, ecr_ref, **TOL)
    (er + 2 * ecr).backward()
    (er_ref + 2 * ecr_ref).backward()
    for ours, ref in zip((cam1, cam2, rv1, rv2), leaves):
        torch.testing.assert_close(ours.grad, ref.grad, **TOL)


def test_max_onehot_official_and_fixed():
    x = torch.tensor([0.9, 0.2, 0.5] + [0.0] * 17 + [0.7]).reshape(1, 21, 1, 1)
    off = max_onehot(x).flatten()
    assert off[0] == 0.9 and off[20] == 0.7 and off[2] == 0   # channel 0 kept, bg wins 1..20
    fixed = max_onehot(x, fixed=True).flatten()
    assert fixed[0] == 0.9 and fixed[2] == 0 and fixed[20] == 0.7   # fg 0 wins, bg kept
    assert torch.equal(x.flatten()[:3], torch.tensor([0.9, 0.2, 0.5]))  # input untouched


def test_adaptive_min_pooling_matches_definition():
    _, _, rv1, _, label = _inputs(2)
    got = adaptive_min_pooling_loss(rv1, label)
    x = (rv1 * _lab21(label))[:, :20].max(1)[0].reshape(2, -1)
    k = 64 // 4
    want = sum(sorted(x[i].tolist())[j] if sorted(x[i].tolist())[j] > 0 else 0.0
               for i in range(2) for j in range(k)) / (k * 2)
    assert math.isclose(got.item(), want, rel_tol=1e-5, abs_tol=1e-7)


def _ref_eps(cam, sal, label, tau, alpha):
    n, c, h, w = cam.shape
    sal = F.interpolate(sal, size=(h, w))
    p = F.softmax(cam, 1)
    total = torch.zeros(n, 1, h, w)
    for i in range(n):
        fg = torch.zeros(h, w)
        bg = p[i, 20].clone()
        for k in range(20):
            if label[i, k] == 0:
                continue
            hard = torch.round(p[i, k].detach())
            ratio = (hard * torch.round(sal[i, 0])).sum() / (hard + 1e-4).sum()
            if ratio > tau:
                fg = fg + p[i, k]
            else:
                bg = bg + p[i, k]
        total[i, 0] = fg * alpha + (1 - bg) * (1 - alpha)
    return ((total - sal) ** 2).mean()


def test_eps_saliency_loss_matches_loops():
    cam1, _, _, _, label = _inputs(3)
    g = torch.Generator().manual_seed(3)
    sal = torch.rand(2, 1, 16, 16, generator=g)
    with torch.no_grad():  # make one class clearly salient so both branches occur
        cam1[0, 1, :4] += 6.0
        sal[0, 0, :8] = 1.0
    got = eps_saliency_loss(cam1, sal, label, 0.5, 0.5)
    ref_in = cam1.detach().clone().requires_grad_(True)
    want = _ref_eps(ref_in, sal, label, 0.5, 0.5)
    torch.testing.assert_close(got, want, **TOL)
    got.backward()
    want.backward()
    torch.testing.assert_close(cam1.grad, ref_in.grad, **TOL)


def _ref_ppc_intra(e, protos, y, tau, gen):
    logits = e @ protos.t() / tau
    per_pixel = []
    for i in range(e.shape[0]):
        order = sorted(range(protos.shape[0]), key=lambda k: -float(logits[i, k]))
        cols = [int(y[i])] + order[3:13]
        vals = logits[i, cols]
        per_pixel.append(torch.logsumexp(vals, 0) - vals[0])
    per_pixel = torch.stack(per_pixel)
    sim = [(float(logits[i, int(y[i])]) * tau + 1) / 2 for i in range(e.shape[0])]
    total, classes = 0.0, sorted(set(y.tolist()))
    for c in classes:
        idx = [i for i in range(e.shape[0]) if int(y[i]) == c]
        n = len(idx)
        if n < 2:
            continue
        rand = [idx[j] for j in torch.randperm(n, generator=gen)[: n // 2].tolist()]
        by_sim = sorted(idx, key=lambda i: sim[i])[: int(n * 0.6)]
        low = by_sim[int(n * 0.6) - n // 2:]
        total = total + per_pixel[rand + low].mean()
    return total / len(classes)


def test_ppc_intra_matches_loops_with_same_sampling():
    g = torch.Generator().manual_seed(4)
    e = l2_normalize(torch.randn(40, 6, generator=g))
    protos = l2_normalize(torch.randn(21, 6, generator=g))
    y = torch.randint(0, 4, (40,), generator=g)
    y[0] = 9  # a class with one pixel: counted, skipped
    got = ppc_intra(e, protos, y, 0.1, torch.Generator().manual_seed(11))
    want = _ref_ppc_intra(e, protos, y, 0.1, torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, want, **TOL)


def test_ppc_loss_deterministic_with_generator_and_weighted():
    g = torch.Generator().manual_seed(5)
    cam1 = torch.rand(2, 21, 6, 6, generator=g)
    cam2 = torch.rand(2, 21, 6, 6, generator=g)
    f1 = torch.randn(2, 8, 6, 6, generator=g)
    f2 = torch.randn(2, 8, 6, 6, generator=g)
    y1 = torch.randint(0, 21, (2, 6, 6), generator=g)
    y2 = torch.randint(0, 21, (2, 6, 6), generator=g)
    cfg = LossConfig.official(impl="torch")
    a = ppc_loss(cam1, f1, cam2, f2, y1, y2, cfg, generator=torch.Generator().manual_seed(0))
    b = ppc_loss(cam1, f1, cam2, f2, y1, y2, cfg, generator=torch.Generator().manual_seed(0))
    c = ppc_loss(cam1, f1, cam2, f2, y1, y2, LossConfig.official(impl="torch", ppc_weight=0.2),
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.isfinite(a)
    torch.testing.assert_close(c, 2 * a, **TOL)
