"""`method_losses`: every loss term of one training step for the configured method.

Methods (``loss.method``) are registered in hsc_fast/losses/methods/ (one file each): seam, eps,
ppc_seam, ppc_eps, hsc_seam, hsc_eps (the official run). All are two-view (view 2 = view 1
resized), as the authors' code. Every method gets the SEAM baseline terms (cls + er + ecr, and
EPS's saliency term when it declares ``saliency``); its own ``terms`` are added after them, in
their order. Ablation switches: use_rsc / use_csc / use_psc, cross_supervision,
momentum_prototypes, crf.enabled (CRF-refined pseudo-labels for RSC/PSC; off: the argmax labels).
formulation: the HSC equations of the authors' code (hsc.py) or of the paper (hsc_paper.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from hsc_fast.ops import upcast, LossInputError
from hsc_fast.precision import fp32_losses
from hsc_fast.losses.prototypes import DistContext, PrototypeBanks
from hsc_fast.losses.baselines import adaptive_min_pooling_loss, eps_saliency_loss, seam_er_ecr
from hsc_fast.losses.cam import (classification_loss, contrast_hw, crf_images, normalize_cam, pseudo_labels,
                  resize_to)
from hsc_fast.losses.methods import MethodStep, get_method
from hsc_fast.registry import METHODS  # noqa: F401 - the registered names (hsc_fast.losses.METHODS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_crf_fn(backend: str = "lattice"):
    """The training CRF of `loss.crf.backend` (lattice | dense | pydensecrf; hsc_fast.crf.train)."""
    from hsc_fast.crf.train import train_crf_fn  # lazy: tests and CRF-free runs never import it
    return train_crf_fn(backend)


def _refined_labels(cam_map, label, images, cfg, crf_fn):
    labels = pseudo_labels(cam_map, label)
    if not cfg.crf.enabled:
        return labels
    crf_fn = crf_fn or default_crf_fn(cfg.crf.backend)
    out = crf_fn(images, labels, n_labels=cam_map.shape[1], gt_prob=cfg.crf.gt_prob, **cfg.crf.params())
    return torch.as_tensor(out).to(device=labels.device, dtype=torch.int64)


def contrast_inputs(out1, out2, batch, cfg, crf_fn=None, img_mean=IMAGENET_MEAN, img_std=IMAGENET_STD):
    """Everything the HSC/PPC losses compare, at the contrast resolution: normalised CAMs,
    pseudo-labels (CRF-refined with the view-2 image, as the official code), both projector maps."""
    cam1, cam2 = out1.get("cam_rv", out1["cam"]), out2.get("cam_rv", out2["cam"])
    hw = contrast_hw(cfg.contrast_size, cam1)
    c = {"cam1": normalize_cam(resize_to(cam1, hw), cfg.bg_threshold),
         "cam2": normalize_cam(resize_to(cam2, hw), cfg.bg_threshold)}
    for key in ("feat_rsc", "feat_psc"):
        if key in out1:
            c[key + "1"] = resize_to(out1[key], hw)
            c[key + "2"] = resize_to(out2[key], hw)
    label = batch["label"]
    images = crf_images(batch["img2"], hw, img_mean, img_std) if cfg.crf.enabled else None
    with torch.no_grad():
        c["y1"] = _refined_labels(c["cam1"], label, images, cfg, crf_fn)
        c["y2"] = _refined_labels(c["cam2"], label, images, cfg, crf_fn)
    return c


def baseline_terms(out1, out2, batch, cfg, with_saliency: bool) -> dict[str, torch.Tensor]:
    """cls (+ min-pooling), er, ecr and optionally EPS's saliency term, as the official run."""
    label = upcast(batch["label"])
    cam1, cam2 = out1["cam"], out2["cam"]
    rv1, rv2 = out1.get("cam_rv", cam1), out2.get("cam_rv", cam2)
    terms = {}
    terms["cls"] = ((classification_loss(cam1, label) + classification_loss(cam2, label)) / 2 +
                    (adaptive_min_pooling_loss(rv1, label) + adaptive_min_pooling_loss(rv2, label)) / 2)
    er, ecr = seam_er_ecr(cam1, cam2, rv1, rv2, label, onehot_fixed=cfg.ecr_onehot_fix)
    terms["er"], terms["ecr"] = cfg.seam_er_weight * er, cfg.seam_ecr_weight * ecr
    if with_saliency:
        if "sal" not in batch:
            raise LossInputError(f"method {cfg.method!r} needs saliency maps: batch has no 'sal' "
                                 "(set data.saliency_root or use a shard set with saliency)")
        sal1 = upcast(batch["sal"])
        sal2 = resize_to(sal1, tuple(batch["img2"].shape[-2:]))
        sal = lambda cam, s: eps_saliency_loss(cam, s, label, cfg.eps_tau, cfg.eps_alpha)  # noqa: E731
        terms["sal"] = cfg.eps_sal_weight * ((sal(cam1, sal1) + sal(cam2, sal2)) / 2 +
                                             (sal(rv1, sal1) + sal(rv2, sal2)) / 2)
    return terms


def _bank_dict(banks) -> dict[str, torch.Tensor]:
    if isinstance(banks, PrototypeBanks):
        return banks.as_dict()
    if isinstance(banks, dict):
        return banks
    raise LossInputError(f"banks: expected PrototypeBanks or a dict of tensors, got {type(banks).__name__}")


@fp32_losses
def method_losses(out1: dict, out2: dict, batch: dict, banks, cfg, crf_fn: Optional[Callable] = None, *,
                  dist_ctx: Optional[DistContext] = None, img_mean=IMAGENET_MEAN, img_std=IMAGENET_STD,
                  generator: Optional[torch.Generator] = None):
    """All loss terms of one step -> (dict of named terms incl. "total", new banks dict).

    out1/out2: model outputs for view 1 / view 2 ("cam", "cam_rv", "feat_rsc", "feat_psc").
    batch: "label" (N,20), "img2" (view 2, normalised), "sal" for the EPS methods.
    banks: PrototypeBanks or dict rsc1/rsc2/csc1/csc2/psc1/psc2; the returned dict holds the
    updated banks (unchanged ones included); copy them back with PrototypeBanks.update_.
    """
    method = get_method(cfg.method)
    if method.projectors and "feat_psc" not in out1:
        raise LossInputError(f"method {cfg.method!r} needs the contrast projectors: the model outputs have no "
                             "'feat_psc' / 'feat_rsc'")
    terms = baseline_terms(out1, out2, batch, cfg, with_saliency=method.saliency)
    old = _bank_dict(banks)
    new = dict(old)
    if method.terms is not None:
        c = contrast_inputs(out1, out2, batch, cfg, crf_fn, img_mean, img_std) if method.contrast else None
        extra, updated = method.terms(MethodStep(out1, out2, batch, old, cfg, c, dist_ctx, generator))
        terms.update(extra)
        new.update(updated)
    terms["total"] = sum(terms.values())
    return terms, new
