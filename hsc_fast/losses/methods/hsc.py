"""HSC (Wu et al. 2023) on the SEAM and EPS baselines: RSC + CSC + PSC with their memory banks.

``loss.formulation`` picks the authors' code (losses/hsc.py) or the paper's equations
(losses/hsc_paper.py); ``loss.use_rsc / use_csc / use_psc`` switch the terms (the ablation).
"""
from hsc_fast.errors import ConfigError
from hsc_fast.losses.hsc_paper import hsc_losses
from hsc_fast.losses.methods import Method, MethodStep, register_method


def hsc_terms(s: MethodStep) -> tuple[dict, dict]:
    cfg, c, old = s.cfg, s.contrast, s.banks
    kw = dict(impl=cfg.impl, dist_ctx=s.dist_ctx)
    rsc_loss, csc_loss, psc_loss = hsc_losses(cfg.formulation)  # code | paper
    terms, new = {}, {}
    if cfg.use_rsc:
        terms["rsc"], new["rsc1"], new["rsc2"] = rsc_loss(
            c["feat_rsc1"], c["feat_rsc2"], c["y1"], c["y2"], old["rsc1"], old["rsc2"], cfg, **kw)
    if cfg.use_csc:
        terms["csc"], new["csc1"], new["csc2"] = csc_loss(
            c["feat_rsc1"], c["cam1"], c["feat_rsc2"], c["cam2"], s.batch["label"],
            old["csc1"], old["csc2"], cfg, **kw)
    if cfg.use_psc:
        terms["psc"], new["psc1"], new["psc2"] = psc_loss(
            c["cam1"], c["feat_psc1"], c["cam2"], c["feat_psc2"], c["y1"], c["y2"],
            old["psc1"], old["psc2"], cfg, **kw)
    return terms, new


def check_hsc_geometry(cfg, *, side: int, image_side: int) -> None:
    """The batch-wide (code) or per-image (paper, eq. 6) top-k sizes must fit in the contrast pixels."""
    loss = cfg.loss
    per_image = loss.formulation == "paper"  # eq. 6: the top-k_c pixels of each image; no update top-k
    if loss.use_csc and per_image and loss.csc_topk > image_side ** 2:
        raise ConfigError(f"config key 'loss.csc_topk': {loss.csc_topk} exceeds the {image_side}x{image_side} contrast "
                          "pixels of one image (loss.formulation paper takes the top-k_c pixels per image, eq. 6)")
    pixels = cfg.data.batch_size * side * side
    if loss.use_csc and loss.csc_topk > pixels:
        raise ConfigError(f"config key 'loss.csc_topk': {loss.csc_topk} exceeds the {pixels} contrast pixels "
                          f"of a batch (data.batch_size {cfg.data.batch_size} x {side}x{side})")
    if loss.use_csc and not per_image and loss.csc_update_topk > loss.csc_topk:
        raise ConfigError(f"config key 'loss.csc_update_topk': {loss.csc_update_topk} exceeds loss.csc_topk {loss.csc_topk}")
    if loss.use_psc and loss.psc_topk > pixels:
        raise ConfigError(f"config key 'loss.psc_topk': {loss.psc_topk} exceeds the {pixels} contrast pixels of a batch")


for _base, _sal in (("seam", False), ("eps", True)):
    register_method(Method(f"hsc_{_base}", f"{_base} + RSC + CSC + PSC" + (" (the official run)" if _sal else ""),
                           saliency=_sal, projectors=True, contrast=True, terms=hsc_terms, check=check_hsc_geometry))
