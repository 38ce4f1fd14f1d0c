"""The method registry: ``loss.method`` names a registered ``Method``.

A method is one file in this folder that calls ``register_method``: it declares what it needs
(saliency maps, the two contrast projectors, SEAM's PCM, the contrast inputs with the training
CRF), checks its own geometry, and returns its loss terms on top of the shared SEAM baseline
(cls + er + ecr, and EPS's saliency term when it needs saliency). Every module here is imported
when the registry is first read, so adding a method is its file, its preset and its test; the
config's choices, ``--help`` and the generated config reference (docs: reference/config-keys.md) are
read from the registry.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from hsc_fast.registry import METHODS


@dataclass
class MethodStep:
    """What a method's ``terms`` sees of one step."""
    out1: dict                     # view-1 model outputs ("cam", "cam_rv", "feat_rsc", "feat_psc")
    out2: dict                     # view-2 model outputs
    batch: dict                    # "label" (N,20), "img2", "sal" (EPS)
    banks: dict                    # the six prototype banks before this step (rsc1/2, csc1/2, psc1/2)
    cfg: Any                       # LossConfig
    contrast: Optional[dict]       # contrast_inputs(...) when the method asks for them, else None
    dist_ctx: Any = None           # DistContext for batch-wide top-k across ranks
    generator: Optional[torch.Generator] = None


Terms = Callable[[MethodStep], tuple[dict, dict]]   # -> (named loss terms, updated banks)


@dataclass(frozen=True)
class AblationRow:
    """One row of ``launch/ablation.py`` contributed by a method: the method with only the HSC
    switches in ``switches`` on (use_psc, use_csc, use_rsc, cross_supervision, momentum_prototypes,
    train_crf = loss.crf.enabled), compared with the method's ``baseline``."""
    name: str
    title: str
    switches: tuple = ()
    paper_seed: Optional[float] = None   # published VOC train seed mIoU of this row
    formulation: str = "code"            # loss.formulation of this row
    extra: tuple = ()                    # further `--set` strings


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    saliency: bool = False         # needs saliency maps in the batch (EPS)
    projectors: bool = False       # needs the model's RSC/PSC projector outputs
    pcm: bool = True               # uses SEAM's PCM-refined CAM
    contrast: bool = False         # needs contrast_inputs: normalised CAMs, pseudo-labels, training CRF
    terms: Optional[Terms] = None  # extra terms beyond the baseline, in the order they are summed
    check: Optional[Callable[..., None]] = None   # check(cfg, side=, image_side=) -> raises ConfigError
    baseline: str = ""             # the method this one extends (the ablation compares with it)
    ablation: tuple = ()           # AblationRow(s) this method adds to launch/ablation.py, in table order


def register_method(method: Method) -> Method:
    """Make ``method`` selectable as ``loss.method: <method.name>``."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    """The registered method ``name`` (ConfigError naming ``loss.method`` and the choices otherwise)."""
    return METHODS.get(name)


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
