"""The losses return their float32 values whatever the caller's autocast state (hsc_fast.precision).

CPU bf16 autocast applies the same rounding rules that the engine's CUDA autocast applies, so
these tests reproduce on a CPU what a bf16 GPU run would do to the losses: nearly collinear
fg/bg features (cosine ~0.999, the normal case early in training) make RSC infinite in bf16.
"""
from __future__ import annotations

import pytest
import torch

from hsc_fast.config import LossConfig
from hsc_fast.losses import (adaptive_min_pooling_loss, classification_loss, csc_loss, eps_saliency_loss,
                             method_losses, ppc_loss, psc_loss, rsc_loss, seam_er_ecr)
from hsc_fast.losses.cam import normalize_cam, pseudo_labels
from hsc_fast.precision import fp32_losses, no_autocast
from hsc_fast.losses.prototypes import PrototypeBanks

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def collinear_inputs(n=3, hw=6, d_rsc=32, d_psc=16, seed=0):
    """Projector maps whose fg and bg pixels differ by ~1 %: every pooled cosine is ~0.999."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, d_rsc, 1, 1, generator=g) + 0.5
    rsc = base + 0.01 * torch.rand(n, d_rsc, hw, hw, generator=g)
    psc = torch.rand(1, d_psc, 1, 1, generator=g) + 0.01 * torch.rand(n, d_psc, hw, hw, generator=g)
    cam = normalize_cam(torch.randn(n, 21, hw, hw, generator=g) * 3)
    label = torch.zeros(n, 20)
    label[0, 3] = label[1, 3] = label[2, 7] = 1
    y = pseudo_labels(cam, label)
    y[:, :2] = 20  # some background in every image
    banks = PrototypeBanks(seed=0, rsc_dim=d_rsc, psc_dim=d_psc).as_dict()
    return rsc.requires_grad_(True), psc.requires_grad_(True), cam, y, label, banks


def run_both(fn):
    """fn() under CPU bf16 autocast and without autocast -> (autocast result, fp32 result)."""
    with torch.autocast(**BF16):
        low = fn()
    return low, fn()


def flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def assert_same(a, b):
    for x, y in zip(flat(a), flat(b)):
        assert x.dtype == y.dtype == torch.float32
        assert torch.equal(x, y), (x, y)


def test_rsc_is_inf_in_bf16_and_exact_with_the_guard():
    rsc, _, cam, y, label, banks = collinear_inputs()
    cfg = LossConfig.official(impl="torch")
    call = lambda f: f(rsc, rsc * 1.0001, y, y, banks["rsc1"], banks["rsc2"], cfg)  # noqa: E731
    with torch.autocast(**BF16):
        unguarded = call(rsc_loss.__wrapped__)[0]
    low, fp32 = run_both(lambda: call(rsc_loss))
    assert not torch.isfinite(unguarded)  # the failure the guard exists for
    assert torch.isfinite(fp32[0]) and fp32[0] > 1.0
    assert_same(low, fp32)


def test_csc_psc_and_baselines_keep_fp32_values_under_autocast():
    rsc, psc, cam, y, label, banks = collinear_inputs(seed=1)
    cfg = LossConfig.official(impl="torch", csc_topk=16, csc_update_topk=4, psc_topk=4)
    cam2 = normalize_cam(torch.randn_like(cam) * 2)
    sal = torch.rand(3, 1, 6, 6)
    calls = {
        "csc": lambda: csc_loss(rsc, cam, rsc * 0.999, cam2, label, banks["csc1"], banks["csc2"], cfg),
        "psc": lambda: psc_loss(cam, psc, cam2, psc * 1.001, y, y, banks["psc1"], banks["psc2"], cfg),
        "cls": lambda: classification_loss(cam * 3, label),
        "min_pool": lambda: adaptive_min_pooling_loss(cam, label),
        "seam": lambda: seam_er_ecr(cam * 2, cam2 * 2, cam, cam2, label),
        "eps": lambda: eps_saliency_loss(cam * 2, sal, label, 0.5, 0.5),
        "ppc": lambda: ppc_loss(cam, psc, cam2, psc * 1.001, y, y, cfg, impl="torch",
                                generator=torch.Generator().manual_seed(0)),
    }
    for name, call in calls.items():
        low, fp32 = run_both(call)
        assert_same(low, fp32)


def test_bf16_inputs_are_computed_in_fp32():
    """bf16 tensors (a bf16 network's outputs) give the float32 result of their exact upcast,
    with gradients back in bf16."""
    rsc, _, cam, y, label, banks = collinear_inputs(seed=2)
    cfg = LossConfig.official(impl="torch")
    low = rsc.detach().bfloat16().requires_grad_(True)
    with torch.autocast(**BF16):
        got = rsc_loss(low, low, y, y, banks["rsc1"], banks["rsc2"], cfg)[0]
    want = rsc_loss(low.detach().float(), low.detach().float(), y, y, banks["rsc1"], banks["rsc2"], cfg)[0]
    assert torch.equal(got, want)
    got.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize("method", ["hsc_eps", "ppc_seam"])
def test_method_losses_under_autocast_equal_fp32(method):
    from losses.test_losses import fake_outputs
    out1, out2, batch = fake_outputs(n=2, seed=3)
    cfg = LossConfig.official(impl="torch", method=method, contrast_size=4, csc_topk=16,
                              csc_update_topk=4, psc_topk=2)
    call = lambda: method_losses(out1, out2, batch, PrototypeBanks(0), cfg,  # noqa: E731
                                 generator=torch.Generator().manual_seed(0))
    (low_terms, low_banks), (terms, banks) = run_both(call)
    assert low_terms.keys() == terms.keys()
    for k in terms:
        assert torch.equal(low_terms[k], terms[k]), k
    for k in banks:
        assert torch.equal(low_banks[k], banks[k]), k


def test_a_training_step_under_cpu_autocast_computes_the_losses_in_fp32(tmp_path, monkeypatch):
    """Trainer.train_step with train.cpu_bf16_autocast: the network runs in bf16, and the step's
    loss terms equal method_losses recomputed without autocast on the same network outputs."""
    import hsc_fast.losses as losses_pkg
    from engine.test_train import tiny_cfg
    pytest.importorskip("deepspeed")
    from hsc_fast import distributed as D
    from hsc_fast.data import build_train_loader
    from hsc_fast.engine.cam_trainer import Trainer
    from hsc_fast.data.synth import generate

    data = tmp_path / "synth"
    generate(data, 6, 2, 0, 64)
    cfg = tiny_cfg(data, train__cpu_bf16_autocast="true")  # the demo preset: hsc_seam, CRF on
    assert cfg.loss.method == "hsc_seam" and cfg.loss.crf.enabled
    captured = []
    real = losses_pkg.method_losses

    def spy(out1, out2, batch, banks, lcfg, **kw):
        terms, new = real(out1, out2, batch, banks, lcfg, **kw)
        keep = lambda d: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}  # noqa
        captured.append((keep(out1), keep(out2), keep(batch), keep(dict(banks)), lcfg, kw,
                         {k: v.detach().clone() for k, v in terms.items()}))
        return terms, new

    monkeypatch.setattr(losses_pkg, "method_losses", spy)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    info = D.init_distributed(60)
    try:
        trainer = Trainer(cfg, tmp_path / "run", info)
        loader = build_train_loader(cfg.data, 0, 1, cfg.train.seed, trainer.device)
        result = trainer.train_step([next(iter(loader))])
    finally:
        D.shutdown(info)
    out1, out2, batch, banks, lcfg, kw, terms = captured[0]
    assert out1["cam"].dtype == torch.bfloat16  # the network did run in bf16
    assert not result.nonfinite
    with no_autocast():
        again, _ = real(out1, out2, batch, banks, lcfg, **kw)
    for k in terms:
        assert torch.equal(terms[k], again[k].detach()), k


def test_decorator_is_on_every_public_loss():
    from hsc_fast.losses import hsc_paper
    for fn in (rsc_loss, csc_loss, psc_loss, classification_loss, adaptive_min_pooling_loss, seam_er_ecr,
               eps_saliency_loss, ppc_loss, method_losses, hsc_paper.rsc_loss_paper, hsc_paper.csc_loss_paper):
        assert getattr(fn, "fp32_losses", False), fn.__name__
    assert fp32_losses(lambda: None).fp32_losses
