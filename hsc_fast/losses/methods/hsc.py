"""HSC (Wu et al. 2023) on the SEAM and EPS baselines: RSC + CSC + PSC with their memory banks.

``loss.formulation`` picks the authors' code (losses/hsc.py) or the paper's equations
(losses/hsc_paper.py); ``loss.use_rsc / use_csc / use_psc`` switch the terms (the ablation).
"""
from hsc_fast.errors import ConfigError
from hsc_fast.losses.hsc_paper import hsc_losses
from hsc_fast.losses.methods import AblationRow, Method, MethodStep, register_method


def hsc_terms(s: MethodStep) -> tuple[dict, dict]:
    cfg, c, old = s.cfg, s.contrast, s.banks
    kw = dict(impl=cfg.impl, dist_ctx=s.dist_ctx)
    rsc_loss, csc_loss, psc_loss = hsc_losses(cfg.formulation)  # code | paper
    terms, new = {}, {}
    if cfg.use_rsc:
        terms["rsc"], new["rsc1"], new["rsc2"] = rsc_loss(
            c["feat_rsc1"], c["feat_rsc2"], c["y1"], c["y2"], old["rsc1"], old["rsc2"], cfg,
            bg_index=c["cam1"].shape[1] - 1, **kw)
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


# Paper Table 4 (on SEAM). Sec. 4.3 fixes what its check-mark table means: PSC, CSC and RSC are added
# on cross supervision (55.4 -> 59.3 -> 60.5 -> 62.6); momentum prototypes and the CRF-refined
# labels then give 64.3 (our loss.crf.enabled refines the labels of PSC and RSC together).
_FULL = ("use_psc", "use_csc", "use_rsc", "cross_supervision", "momentum_prototypes", "train_crf")
_TABLE4 = (
    AblationRow("seam_psc", "+PSC", ("use_psc", "cross_supervision"), paper_seed=59.3),
    AblationRow("seam_psc_csc", "+PSC +CSC", ("use_psc", "use_csc", "cross_supervision"), paper_seed=60.5),
    AblationRow("seam_psc_csc_rsc", "+PSC +CSC +RSC", ("use_psc", "use_csc", "use_rsc", "cross_supervision"),
                paper_seed=62.6),
    AblationRow("hsc_seam", "full HSC (SEAM)", _FULL, paper_seed=64.3),
    # The paper's eq. 3-13 at the shared values; k_c becomes a per-image count (eq. 6), so it is
    # rescaled to the paper's share of an image: 16 of 16x16 -> 4 of the demo's 8x8.
    AblationRow("hsc_seam_paper", "full HSC (SEAM), paper formulation", _FULL, formulation="paper",
                extra=("loss.csc_topk=4",)),
)
_ROWS = {"seam": _TABLE4, "eps": (AblationRow("hsc_eps", "full HSC (EPS)", _FULL, paper_seed=71.8),)}

for _base, _sal in (("seam", False), ("eps", True)):
    register_method(Method(f"hsc_{_base}", f"{_base} + RSC + CSC + PSC" + (" (the official run)" if _sal else ""),
                           saliency=_sal, projectors=True, contrast=True, terms=hsc_terms, check=check_hsc_geometry,
                           baseline=_base, ablation=_ROWS[_base]))
