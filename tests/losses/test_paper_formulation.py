"""`loss.formulation: paper` (hsc_fast/losses/hsc_paper.py): each equation of the paper's Sec.
3.2-3.4 against a straightforward loop implementation written from the paper (python loops over
views, images, classes, pixels and pairs), forward values, prototype updates and gradients; the
switch in method_losses; the config key; edge cases; 2 ranks == 1 process."""
import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsc_fast import ops
from hsc_fast.config import LossConfig, TrainCrfConfig, load_config
from hsc_fast.engine.cam_trainer import check_geometry
from hsc_fast.errors import ConfigError
from hsc_fast.losses import (contrast_inputs, csc_loss, label_scores, method_losses, normalize_cam, psc_loss,
                             pseudo_labels, rsc_loss)
from hsc_fast.losses.hsc_paper import FORMULATIONS, csc_loss_paper, hsc_losses, rsc_loss_paper
from hsc_fast.losses.prototypes import DistContext, PrototypeBanks

NO_CRF = TrainCrfConfig(enabled=False)  # the argmax pseudo-labels, no training CRF

TOL = dict(atol=1e-10, rtol=1e-10)   # float64 loops vs the vectorised losses
TAU, LAM = 0.1, 0.9


# ------------------------------------------------------------------------------------------
# The paper's equations, as loops
# ------------------------------------------------------------------------------------------
def cos(a, b):
    """sim(., .) of eq. 4 / 8: cosine similarity; 0 when a vector is 0 (an empty region)."""
    na, nb = a.norm(), b.norm()
    return a @ b / (na * nb) if na > 0 and nb > 0 else a.sum() * 0.0


def masked_mean(u, mask):
    """Eq. 3: r = sum_p m(p) u(p) / sum_p m(p); u (D,h,w), mask (h,w). Empty mask: 0."""
    total, count = torch.zeros(u.shape[0], dtype=u.dtype), 0
    for y in range(u.shape[1]):
        for x in range(u.shape[2]):
            if mask[y, x]:
                total = total + u[:, y, x]
                count += 1
    return total / count if count else total


def f_rsc(r_o, r_b):
    """Eq. 4: -1/N^2 sum_i sum_j log(1 - sim(r_o^i, r_b^j)) (sim guarded at 0.9995)."""
    total = 0.0
    for i in range(len(r_o)):
        for j in range(len(r_b)):
            total = total - torch.log(1 - torch.clamp(cos(r_o[i], r_b[j]), max=0.9995))
    return total / (len(r_o) * len(r_b))


def loop_rsc(u1, u2, y1, y2, weight=0.1, cross=True):
    """Eq. 5 for each view (the other view's backgrounds as cross supervision), mean of the views."""
    regions = []
    for u, y in ((u1, y1), (u2, y2)):
        r_o = [masked_mean(u[i], y[i] != 20) for i in range(u.shape[0])]
        r_b = [masked_mean(u[i], y[i] == 20) for i in range(u.shape[0])]
        regions.append((r_o, r_b))
    total = 0.0
    for v in (0, 1):
        r_o, r_b = regions[v]
        total = total + f_rsc(r_o, r_b) + (f_rsc(r_o, regions[1 - v][1]) if cross else 0.0)
    return weight * total / 2


def activation(s, label, i, c, y, x):
    """w^i(p) for class c: softmax over the 21 channels of the label-masked normalised CAM."""
    logits = torch.stack([s[i, ch, y, x] * (label[i, ch] if ch < 20 else 1.0) for ch in range(21)])
    return torch.exp(logits[c]) / torch.exp(logits).sum()


def top_pixels(scores, k):
    """The k largest scores (a dict pixel -> score), equal scores by lower pixel index first."""
    return sorted(scores, key=lambda p: (-float(scores[p]), p))[:k]


def class_vectors(u, s, label, k):
    """Eq. 6: r_c = 1/|M_c| sum_{i in M_c} (sum_{p in A_c^i} w u / sum_{p in A_c^i} w)."""
    n, _, h, w = u.shape
    reps = {}
    for c in range(20):
        images = [i for i in range(n) if label[i, c] > 0]
        if not images:
            continue
        total = 0.0
        for i in images:
            scores = {(y, x): activation(s, label, i, c, y, x) for y in range(h) for x in range(w)}
            chosen = top_pixels(scores, k)
            num = sum(scores[p] * u[i, :, p[0], p[1]] for p in chosen)
            den = sum(scores[p] for p in chosen)
            total = total + num / den
        reps[c] = total / len(images)
    return reps


def f_csc(r, protos, c, tau=TAU):
    """Eq. 8: -log e^{sim(r,P_c)/tau} / (e^{sim(r,P_c)/tau} + sum_{l != c} e^{sim(r,P_l)/tau})."""
    pos = torch.exp(cos(r, protos[c]) / tau)
    neg = sum(torch.exp(cos(r, protos[k]) / tau) for k in range(protos.shape[0]) if k != c)
    return -torch.log(pos / (pos + neg))


def loop_csc(u1, s1, u2, s2, label, bank1, bank2, k, weight=0.1, lam=LAM, cross=True):
    """Eq. 9 for each view (mean of the views) with the prototypes of the start of the step, then
    eq. 7 for every class of the batch. Returns (loss, new P1, new P2)."""
    reps = [class_vectors(u1, s1, label, k), class_vectors(u2, s2, label, k)]
    banks = [bank1, bank2]
    classes = sorted(reps[0])
    total = 0.0
    for v in (0, 1):
        view = sum(f_csc(reps[v][c], banks[v], c) + (f_csc(reps[v][c], banks[1 - v], c) if cross else 0.0)
                   for c in classes)
        total = total + view / len(classes)
    new = [b.clone() for b in banks]
    for v in (0, 1):
        for c in classes:
            new[v][c] = lam * reps[v][c].detach() + (1 - lam) * banks[v][c]
    return weight * total / 2, new[0], new[1]


def prototypes(cam, u, k):
    """Eq. 10 over the whole batch: top-k_p pixels of the normalised CAM channel c, score-weighted
    mean of the detached u2, then L2-normalised (the code's choice, kept: docs reference/formulations.md)."""
    n, _, h, w = u.shape
    out = []
    for c in range(21):
        scores = {(i, y, x): cam[i, c, y, x] for i in range(n) for y in range(h) for x in range(w)}
        chosen = top_pixels(scores, k)
        q = sum(scores[p] * u[p[0], :, p[1], p[2]].detach() for p in chosen) / sum(scores[p] for p in chosen)
        out.append(q / q.norm())
    return torch.stack(out)


def f_psc(e, label, protos, tau=TAU):
    """Eq. 12: -log exp(u2(p).Q_y/tau) / sum_c exp(u2(p).Q_c/tau)."""
    logits = [e @ protos[c] / tau for c in range(protos.shape[0])]
    return -torch.log(torch.exp(logits[label]) / sum(torch.exp(v) for v in logits))


def loop_psc(cam1, u1, cam2, u2, y1, y2, mem1, mem2, k, weight=0.1, lam=LAM):
    """Eq. 13 per image (1/|I| sum over its pixels), mean over the images and the two views; eq. 11."""
    q = [prototypes(cam1, u1, k), prototypes(cam2, u2, k)]
    us, ys, mems = [u1, u2], [y1, y2], [mem1, mem2]
    total = 0.0
    for v in (0, 1):
        u, y, y_other = us[v], ys[v], ys[1 - v]
        n, _, h, w = u.shape
        for i in range(n):
            image = 0.0
            for py in range(h):
                for px in range(w):
                    e = u[i, :, py, px] / u[i, :, py, px].norm()
                    own, other = int(y[i, py, px]), int(y_other[i, py, px])
                    image = image + (f_psc(e, own, q[v]) + f_psc(e, own, q[1 - v]) + f_psc(e, other, q[v]) +
                                     f_psc(e, own, mems[v]))
            total = total + image / (h * w) / n
    new = [lam * q[v] + (1 - lam) * mems[v] for v in (0, 1)]
    return weight * total / 2, new[0], new[1]


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
def make_inputs(seed, n=3, hw=4, d=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(n, 20, dtype=dtype)
    for i in range(n):
        label[i, torch.randperm(6, generator=g)[: 1 + i % 2]] = 1      # classes 0..5: shared between images
    cams = [normalize_cam(torch.randn(n, 21, hw, hw, generator=g, dtype=dtype) * 3) for _ in range(2)]
    ys = [pseudo_labels(c, label) for c in cams]
    for y in ys:
        y[0, 0, :2] = 20        # every view has some background...
        y[-1, -1, -2:] = 3      # ...and some foreground
    feat = lambda: torch.randn(n, d, hw, hw, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    bank = lambda rows: torch.randn(rows, d, generator=g, dtype=dtype)  # noqa: E731
    return dict(label=label, cam1=cams[0], cam2=cams[1], y1=ys[0], y2=ys[1], u1=feat(), u2=feat(),
                q1=feat(), q2=feat(), bank_r=bank(2), bank_c1=bank(21), bank_c2=bank(21), bank_p1=bank(21),
                bank_p2=bank(21))


def paper_cfg(**kw):
    return LossConfig.paper(impl="torch", **kw)


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


# ------------------------------------------------------------------------------------------
# Each equation vs its loop
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [True, False])
def test_rsc_is_eq_3_to_5(cross):
    s = make_inputs(1)
    cfg = paper_cfg(cross_supervision=cross)
    loss, new1, new2 = rsc_loss_paper(s["u1"], s["u2"], s["y1"], s["y2"], s["bank_r"], s["bank_r"], cfg)
    ref = loop_rsc(s["u1"], s["u2"], s["y1"], s["y2"], cross=cross)
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(grads(loss, s["u1"], s["u2"]), grads(ref, s["u1"], s["u2"])):
        torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(new1, s["bank_r"]) and torch.equal(new2, s["bank_r"])   # no ROI bank in the paper
    # not the code: no memory L1 terms, no per-pixel normalisation, no lower clamp
    code, _, _ = rsc_loss(s["u1"], s["u2"], s["y1"], s["y2"], s["bank_r"], s["bank_r"], cfg)
    assert not torch.allclose(code, loss)


def test_rsc_negative_cosines_keep_their_gradient():
    """The code clamps the cosine at 5e-4 from below (no push for pairs already apart); eq. 4 does not."""
    u = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    u[0, :, 0, 0] = torch.tensor([1.0, 0.2])      # ROI pixel
    u[0, :, 0, 1] = torch.tensor([-1.0, 0.3])     # background pixel: cosine < 0
    u.requires_grad_(True)
    y = torch.tensor([[[3, 20]]])
    bank = torch.zeros(2, 2, dtype=torch.float64)
    loss, _, _ = rsc_loss_paper(u, u, y, y, bank, bank, paper_cfg(rsc_weight=1.0))
    c = float(cos(u[0, :, 0, 0], u[0, :, 0, 1]).detach())
    assert c < 0 and loss.item() == pytest.approx(-2 * math.log(1 - c))
    assert grads(loss, u)[0].abs().sum() > 0


@pytest.mark.parametrize("cross", [True, False])
def test_csc_is_eq_6_to_9(cross):
    s = make_inputs(2)
    cfg = paper_cfg(csc_topk=5, cross_supervision=cross)
    args = (s["u1"], s["cam1"], s["u2"], s["cam2"], s["label"], s["bank_c1"], s["bank_c2"], cfg)
    loss, new1, new2 = csc_loss_paper(*args)
    ref, ref1, ref2 = loop_csc(s["u1"], s["cam1"], s["u2"], s["cam2"], s["label"], s["bank_c1"], s["bank_c2"],
                               k=5, cross=cross)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(new1, ref1, **TOL)                           # eq. 7, same r_c
    torch.testing.assert_close(new2, ref2, **TOL)
    for got, want in zip(grads(loss, s["u1"], s["u2"]), grads(ref, s["u1"], s["u2"])):
        torch.testing.assert_close(got, want, **TOL)
    untouched = [c for c in range(21) if c >= 20 or s["label"][:, c].sum() == 0]
    assert torch.equal(new1[untouched], s["bank_c1"][untouched])            # absent classes and bg row
    code, _, _ = csc_loss(*args)
    assert not torch.allclose(code, loss)


def test_csc_takes_the_topk_of_each_image_not_of_the_batch():
    """Eq. 6 averages per-image vectors: an image with much higher activations does not take every
    one of the top pixels, as the code's batch-wide top-k lets it."""
    s = make_inputs(3, n=2)
    s["label"].zero_()
    s["label"][:, 1] = 1
    s["cam1"][0, 1] += 5.0     # image 0 dominates class 1 batch-wide
    cfg = paper_cfg(csc_topk=4)
    loss, new1, _ = csc_loss_paper(s["u1"], s["cam1"], s["u2"], s["cam2"], s["label"], s["bank_c1"], s["bank_c2"], cfg)
    reps = class_vectors(s["u1"], s["cam1"], s["label"], 4)
    torch.testing.assert_close(new1[1], LAM * reps[1].detach() + (1 - LAM) * s["bank_c1"][1], **TOL)
    scores = label_scores(s["cam1"], s["label"])[:, 1].flatten()
    batch_wide = ops.topk_proto(scores[None], s["u1"].detach().permute(0, 2, 3, 1).reshape(-1, 6), 4,
                                normalize=False, impl="torch")[0]
    assert not torch.allclose(batch_wide, reps[1].detach())
    assert int(torch.topk(scores, 4).indices.max()) < 16           # batch-wide: image 0's pixels only


def test_psc_is_eq_10_to_13():
    """Ties included: the constant background channel and the CAM floor tie across the cut."""
    s = make_inputs(4, n=2)
    # non-negative like the ReLU projector, but never an all-zero pixel (whose gradient is the
    # eps-normalisation's 1/eps convention, masked by the ReLU in a network)
    f1, f2 = s["q1"].detach().abs().requires_grad_(True), s["q2"].detach().abs().requires_grad_(True)
    cfg = paper_cfg(psc_topk=5)
    assert hsc_losses("paper")[2] is psc_loss          # the code computes eq. 10-13 (module docstring)
    loss, new1, new2 = psc_loss(s["cam1"], f1, s["cam2"], f2, s["y1"], s["y2"], s["bank_p1"], s["bank_p2"], cfg)
    ref, ref1, ref2 = loop_psc(s["cam1"], f1, s["cam2"], f2, s["y1"], s["y2"], s["bank_p1"], s["bank_p2"], k=5)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(new1, ref1, **TOL)                           # eq. 11
    torch.testing.assert_close(new2, ref2, **TOL)
    for got, want in zip(grads(loss, f1, f2), grads(ref, f1, f2)):
        torch.testing.assert_close(got, want, **TOL)


def test_triton_kernels_and_autocast_give_the_same_losses():
    """The fused kernels serve the paper formulation too (interpreter on CPU), and bf16 autocast
    does not reach the loss math (precision.fp32_losses)."""
    s = make_inputs(9, n=2, hw=4, d=8, dtype=torch.float32)
    cfg = LossConfig.paper(csc_topk=3)

    def forward(impl):
        r, _, _ = rsc_loss_paper(s["u1"], s["u2"], s["y1"], s["y2"], s["bank_r"], s["bank_r"], cfg, impl=impl)
        c, c1, c2 = csc_loss_paper(s["u1"], s["cam1"], s["u2"], s["cam2"], s["label"], s["bank_c1"], s["bank_c2"],
                                   cfg, impl=impl)
        return r, c, c1, c2

    def with_grads(r, c, c1, c2):      # backward outside autocast, as the engine runs it
        return (r, c, c1, c2) + grads(r + c, s["u1"], s["u2"])

    reference = with_grads(*forward("torch"))
    for got, want in zip(with_grads(*forward("triton")), reference):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = forward("torch")
    for got, want in zip(with_grads(*under_autocast), reference):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["one_image", "no_foreground", "all_background", "all_foreground", "k_over_pixels"])
def test_edge_cases_are_finite(case):
    s = make_inputs(6, n=1 if case == "one_image" else 2, hw=2 if case == "k_over_pixels" else 4, dtype=torch.float32)
    if case == "no_foreground":
        s["label"].zero_()
    if case in ("no_foreground", "all_background"):
        s["y1"].fill_(20)
        s["y2"].fill_(20)
    if case == "all_foreground":
        s["y1"].fill_(3)
        s["y2"].fill_(3)
    cfg = LossConfig.paper(impl="torch", csc_topk=8)
    r, r1, r2 = rsc_loss_paper(s["u1"], s["u2"], s["y1"], s["y2"], s["bank_r"], s["bank_r"], cfg)
    c, c1, c2 = csc_loss_paper(s["u1"], s["cam1"], s["u2"], s["cam2"], s["label"], s["bank_c1"], s["bank_c2"], cfg)
    for value in (r, r1, r2, c, c1, c2):
        assert torch.isfinite(value).all(), case
    g1, g2 = grads(r + c, s["u1"], s["u2"])
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    if case == "no_foreground":
        assert c.item() == 0.0 and torch.equal(c1, s["bank_c1"]) and torch.equal(c2, s["bank_c2"])
    if case in ("no_foreground", "all_background", "all_foreground"):
        assert r.item() == 0.0     # one region empty everywhere: every cosine is 0


# ------------------------------------------------------------------------------------------
# The switch, the key, the presets
# ------------------------------------------------------------------------------------------
def fake_outputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(True)  # noqa: E731
    out1 = {"cam": r(n, 21, 8, 8), "cam_rv": r(n, 21, 8, 8), "feat_rsc": r(n, 16, 8, 8), "feat_psc": r(n, 8, 8, 8)}
    out2 = {"cam": r(n, 21, 4, 4), "cam_rv": r(n, 21, 4, 4), "feat_rsc": r(n, 16, 4, 4), "feat_psc": r(n, 8, 4, 4)}
    label = torch.zeros(n, 20)
    label[0, 2] = label[-1, 5] = label[-1, 2] = 1
    batch = {"img": torch.randn(n, 3, 64, 64, generator=g), "img2": torch.randn(n, 3, 32, 32, generator=g),
             "label": label}
    return out1, out2, batch


def test_method_losses_switches_formulation_and_keeps_the_code_path():
    out1, out2, batch = fake_outputs()
    banks = PrototypeBanks(0, rsc_dim=16, psc_dim=8).as_dict()
    cfg = LossConfig.official(impl="torch", method="hsc_seam", crf=NO_CRF, contrast_size=4,
                              csc_topk=8, csc_update_topk=4, psc_topk=4)
    assert cfg.formulation == "code"
    paper = dataclasses.replace(cfg, formulation="paper")
    code_terms, code_new = method_losses(out1, out2, batch, banks, cfg)
    paper_terms, paper_new = method_losses(out1, out2, batch, banks, paper)
    # the code path is the code's functions, bit for bit
    c = contrast_inputs(out1, out2, batch, cfg)
    direct = {"rsc": rsc_loss(c["feat_rsc1"], c["feat_rsc2"], c["y1"], c["y2"], banks["rsc1"], banks["rsc2"], cfg),
              "csc": csc_loss(c["feat_rsc1"], c["cam1"], c["feat_rsc2"], c["cam2"], batch["label"],
                              banks["csc1"], banks["csc2"], cfg),
              "psc": psc_loss(c["cam1"], c["feat_psc1"], c["cam2"], c["feat_psc2"], c["y1"], c["y2"],
                              banks["psc1"], banks["psc2"], cfg)}
    for term, (loss, new1, new2) in direct.items():
        assert torch.equal(code_terms[term], loss)
        assert torch.equal(code_new[term + "1"], new1) and torch.equal(code_new[term + "2"], new2)
    assert FORMULATIONS["code"] == (rsc_loss, csc_loss, psc_loss)
    # the paper path: RSC and CSC differ, PSC and the baseline terms are the same
    for term in ("rsc", "csc"):
        assert not torch.allclose(paper_terms[term], code_terms[term]), term
    for term in ("psc", "cls", "er", "ecr"):
        assert torch.equal(paper_terms[term], code_terms[term]), term
    assert torch.equal(paper_new["rsc1"], banks["rsc1"]) and not torch.equal(code_new["rsc1"], banks["rsc1"])
    paper_terms["total"].backward()
    assert torch.isfinite(out1["feat_rsc"].grad).all()


def test_formulation_key_is_validated():
    with pytest.raises(ConfigError, match="loss.formulation"):
        load_config("hsc_seam", ["loss.formulation=equations"])
    with pytest.raises(ConfigError, match="loss.formulation"):
        hsc_losses("equations")
    out1, out2, batch = fake_outputs()
    cfg = LossConfig.official(impl="torch", method="hsc_seam", crf=NO_CRF, contrast_size=4,
                              formulation="equations")
    with pytest.raises(ConfigError, match="loss.formulation"):
        method_losses(out1, out2, batch, PrototypeBanks(0, rsc_dim=16, psc_dim=8), cfg)


def test_presets_and_geometry():
    for name in ("hsc_eps_official", "hsc_seam", "seam", "eps", "ppc_seam", "demo"):
        assert load_config(name).loss.formulation == "code", name
    cfg = load_config("hsc_paper")
    expected = LossConfig.paper()
    for key in ("formulation", "contrast_size", "csc_topk", "psc_topk", "csc_momentum", "psc_momentum"):
        assert getattr(cfg.loss, key) == getattr(expected, key), key
    assert (cfg.loss.formulation, cfg.loss.contrast_size) == ("paper", 16)
    check_geometry(cfg)
    with pytest.raises(ConfigError, match="loss.csc_topk.*one image"):
        check_geometry(load_config("hsc_paper", ["loss.csc_topk=257"]))
    # the update top-k is a code-formulation key: not checked against k_c under the paper's equations
    check_geometry(load_config("demo", ["loss.formulation=paper", "loss.csc_topk=4"]))
    with pytest.raises(ConfigError, match="loss.csc_update_topk"):
        check_geometry(load_config("demo", ["loss.csc_topk=4"]))


# ------------------------------------------------------------------------------------------
# 2 ranks vs 1 process
# ------------------------------------------------------------------------------------------
SPLIT = (3, 1)


def _losses(s, part, scale, ctx):
    cfg = LossConfig.paper(impl="torch", csc_topk=5)
    u1, u2 = s["u1"].detach()[part] * scale, s["u2"].detach()[part] * scale
    r, r1, r2 = rsc_loss_paper(u1, u2, s["y1"][part], s["y2"][part], s["bank_r"], s["bank_r"], cfg, dist_ctx=ctx)
    c, c1, c2 = csc_loss_paper(u1, s["cam1"][part], u2, s["cam2"][part], s["label"][part], s["bank_c1"],
                               s["bank_c2"], cfg, dist_ctx=ctx)
    return torch.stack([r, c]), (r1, r2, c1, c2)


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext()
        for seed in (7, 8):
            s = make_inputs(seed, n=sum(SPLIT), dtype=torch.float32)
            if seed == 8:
                s["label"][: SPLIT[0]] = 0      # rank 1 alone holds the classes
            scale_one = torch.linspace(0.5, 1.5, s["u1"].shape[1]).reshape(-1, 1, 1).requires_grad_(True)
            scale_dist = scale_one.detach().clone().requires_grad_(True)
            one, one_banks = _losses(s, slice(None), scale_one, None)
            one.sum().backward()
            lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
            mine, mine_banks = _losses(s, slice(lo, hi), scale_dist, ctx)
            mine.sum().backward()
            torch.testing.assert_close(mine, one, atol=1e-5, rtol=1e-5)
            for a, b in zip(mine_banks, one_banks):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            grad = scale_dist.grad.clone()
            dist.all_reduce(grad)                   # DeepSpeed: the mean of the per-rank gradients
            torch.testing.assert_close(grad / world, scale_one.grad, atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_whole_batch():
    from hsc_fast.distributed import free_port
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
