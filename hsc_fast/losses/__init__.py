"""HSC losses and the baselines they build on (see hsc.py, baselines.py, method.py)."""
from hsc_fast.losses.baselines import (adaptive_min_pooling_loss, eps_saliency_loss, max_onehot, ppc_intra, ppc_loss,
                        seam_er_ecr, seam_max_norm)
from hsc_fast.losses.cam import (classification_loss, contrast_hw, crf_images, label_scores, label_with_bg, normalize_cam,
                  pseudo_labels, resize_to, resize_to_contrast)
from hsc_fast.losses.hsc import csc_loss, psc_loss, rsc_loss
from hsc_fast.losses.method import METHODS, baseline_terms, contrast_inputs, method_losses

__all__ = [
    "adaptive_min_pooling_loss", "eps_saliency_loss", "max_onehot", "ppc_intra", "ppc_loss", "seam_er_ecr",
    "seam_max_norm", "classification_loss", "contrast_hw", "crf_images", "label_scores", "label_with_bg",
    "normalize_cam", "pseudo_labels", "resize_to", "resize_to_contrast", "csc_loss", "psc_loss", "rsc_loss",
    "METHODS", "baseline_terms", "contrast_inputs", "method_losses",
]
