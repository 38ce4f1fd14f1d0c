"""The method registry (hsc_fast/losses/methods/): what is registered is what the config accepts,
and a method added by one register_method call trains through method_losses unchanged."""
import dataclasses

import pytest
import torch

from hsc_fast.config import LossConfig, TrainCrfConfig, load_config
from hsc_fast.errors import ConfigError
from hsc_fast.losses import method_losses
from hsc_fast.losses.methods import Method, get_method, register_method
from hsc_fast.losses.prototypes import PrototypeBanks
from hsc_fast.registry import METHODS
from losses.test_losses import fake_outputs

NO_CRF = TrainCrfConfig(enabled=False)  # the argmax pseudo-labels, no training CRF


def test_the_six_methods_and_their_declared_needs():
    assert set(METHODS) == {"seam", "eps", "ppc_seam", "ppc_eps", "hsc_seam", "hsc_eps"}
    needs = {m: (get_method(m).saliency, get_method(m).projectors, get_method(m).contrast) for m in METHODS}
    assert needs == {"seam": (False, False, False), "eps": (True, False, False),
                     "ppc_seam": (False, True, True), "ppc_eps": (True, True, True),
                     "hsc_seam": (False, True, True), "hsc_eps": (True, True, True)}


def test_unknown_method_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"'loss.method': 'hsc_sem' is not one of .*hsc_seam"):
        load_config("hsc_seam", ["loss.method=hsc_sem"])


def test_a_registered_method_is_a_config_choice_and_adds_its_terms():
    """A toy method: the SEAM baseline plus a term of its own, registered in one call."""
    def centre_term(step):
        return {"centre": step.out1["cam"].float().mean() ** 2}, {}

    toy = Method("toy_seam", "seam + squared mean CAM", terms=centre_term)
    register_method(toy)
    try:
        assert load_config("seam", ["loss.method=toy_seam"]).loss.method == "toy_seam"
        out1, out2, batch = fake_outputs()
        base_cfg = dataclasses.replace(LossConfig(), method="seam", crf=NO_CRF)
        toy_cfg = dataclasses.replace(base_cfg, method="toy_seam")
        base, _ = method_losses(out1, out2, batch, PrototypeBanks(0), base_cfg)
        terms, _ = method_losses(out1, out2, batch, PrototypeBanks(0), toy_cfg)
        assert list(terms) == list(base)[:-1] + ["centre", "total"]   # its term after the baseline
        assert torch.equal(terms["centre"], out1["cam"].float().mean() ** 2)
        torch.testing.assert_close(terms["total"], base["total"] + terms["centre"], rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="registered twice"):
            register_method(Method("toy_seam", "another"))
    finally:
        METHODS._entries.pop("toy_seam")


def test_a_method_that_needs_projectors_says_so():
    out1, out2, batch = fake_outputs()
    for o in (out1, out2):
        del o["feat_psc"], o["feat_rsc"]
    cfg = dataclasses.replace(LossConfig(), method="hsc_seam", crf=NO_CRF)
    with pytest.raises(ValueError, match="'hsc_seam' needs the contrast projectors"):
        method_losses(out1, out2, batch, PrototypeBanks(0), cfg)


@pytest.mark.parametrize("formulation", ["code", "paper"])
def test_contrast_terms_reach_the_cams_only_through_the_features(formulation):
    """RSC / CSC / PSC take no gradient through the CAM or PCM outputs (their pseudo-labels and
    prototype weights are constants): only the projector features, i.e. the backbone, carry them.
    Why HSC cannot change the CAMs where the backbone barely trains (docs: results/ablation.md)."""
    from losses.test_losses import cfg_small
    out1, out2, batch = fake_outputs()
    cfg = cfg_small(method="hsc_seam", crf=NO_CRF, contrast_size=4, formulation=formulation)
    terms, _ = method_losses(out1, out2, batch, PrototypeBanks(0), cfg, generator=torch.Generator().manual_seed(0))
    cams = [o[k] for o in (out1, out2) for k in ("cam", "cam_rv")]
    feats = [o[k] for o in (out1, out2) for k in ("feat_psc", "feat_rsc")]
    for name in ("rsc", "csc", "psc"):
        to_cams = torch.autograd.grad(terms[name], cams, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in to_cams), name
        to_feats = torch.autograd.grad(terms[name], feats, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in to_feats), name
    to_cams = torch.autograd.grad(terms["cls"], cams, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in to_cams)  # the baseline terms do reach them
