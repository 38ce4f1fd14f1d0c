"""SEAM (Wang et al. 2020) and EPS (Lee et al. 2021): the baselines, no contrast term of their own.

The shared baseline terms (cls with adaptive min-pooling, er, ecr; EPS adds its saliency term)
are computed for every method by ``losses.method.baseline_terms``.
"""
from hsc_fast.losses.methods import AblationRow, Method, register_method

register_method(Method("seam", "cls + er + ecr (SEAM)", ablation=(AblationRow("seam", "SEAM baseline", paper_seed=55.4),)))
register_method(Method("eps", "seam + EPS saliency loss (the authors' 'EPS' baseline: their run minus HSC)",
                       saliency=True, ablation=(AblationRow("eps", "EPS baseline", paper_seed=69.2),)))
