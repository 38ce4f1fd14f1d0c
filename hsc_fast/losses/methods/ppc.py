"""PPC (Du et al. 2022) on the SEAM and EPS baselines: pixel-to-prototype contrast of the PSC projector."""
from hsc_fast.losses.baselines import ppc_loss
from hsc_fast.losses.methods import Method, MethodStep, register_method


def ppc_terms(s: MethodStep) -> tuple[dict, dict]:
    c = s.contrast
    return {"ppc": ppc_loss(c["cam1"], c["feat_psc1"], c["cam2"], c["feat_psc2"], c["y1"], c["y2"], s.cfg,
                            impl=s.cfg.impl, generator=s.generator)}, {}


register_method(Method("ppc_seam", "seam + PPC", projectors=True, contrast=True, terms=ppc_terms, baseline="seam"))
register_method(Method("ppc_eps", "eps + PPC", saliency=True, projectors=True, contrast=True, terms=ppc_terms,
                       baseline="eps"))
