"""DeepLab-ASPP for the last stage: a dilated ResNet (output stride 8) with the v2 or v3 head.

v2 (Chen et al. 2017, the WSSS standard): four parallel 3x3 atrous classifiers (rates 6/12/18/24)
whose logits are SUMMED. v3-style (the option the authors' segmentation code offered): atrous
branches with BatchNorm + image pooling, concatenated and projected, then a 1x1 classifier.
ImageNet initialisation reads a local torchvision-format state dict; there is no download.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from hsc_fast.errors import WeightsError
from hsc_fast.models.timm_backbone import LastFeatureMap, TimmBackbone, is_timm, load_backbone_weights

_RESNETS = {"resnet101": torchvision.models.resnet101, "resnet50": torchvision.models.resnet50,
            "resnet18": torchvision.models.resnet18}


class ASPPv2(nn.Module):
    """Summed atrous classifiers (DeepLab v2)."""

    def __init__(self, in_ch: int, num_classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


class ASPPv3(nn.Module):
    """Atrous branches + image pooling, concatenated and projected (DeepLab v3 style)."""

    def __init__(self, in_ch: int, num_classes: int, rates=(12, 24, 36), width: int = 256):
        super().__init__()

        def conv_bn(k, r):
            pad = 0 if k == 1 else r
            return nn.Sequential(nn.Conv2d(in_ch, width, k, padding=pad, dilation=r, bias=False),
                                 nn.BatchNorm2d(width), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([conv_bn(1, 1)] + [conv_bn(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, width, 1, bias=False),
                                  nn.ReLU(inplace=True))
        n = len(self.branches) + 1
        self.project = nn.Sequential(nn.Conv2d(n * width, width, 1, bias=False), nn.BatchNorm2d(width),
                                     nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        feats = [b(x) for b in self.branches] + [pooled]
        return self.classifier(self.project(torch.cat(feats, 1)))


class DeepLab(nn.Module):
    """Dilated ResNet (OS 8) + ASPP head; `forward` returns logits at the input size."""

    def __init__(self, backbone: str = "resnet101", head: str = "v2", num_classes: int = 21,
                 frozen_bn: bool = True):
        super().__init__()
        self.frozen_bn = frozen_bn
        if is_timm(backbone):  # timm:<name> at output stride 8: its conv6 map (models/timm_backbone.py)
            self.backbone = LastFeatureMap(TimmBackbone(backbone))
            self.head = ASPPv2(self.backbone.out_channels, num_classes) if head == "v2" else \
                ASPPv3(self.backbone.out_channels, num_classes)
            return
        if backbone not in _RESNETS:
            raise ValueError(f"deeplab backbone '{backbone}': expected one of {', '.join(_RESNETS)}")
        if backbone == "resnet18":  # BasicBlock cannot dilate: stride-8 by hand below
            net = _RESNETS[backbone](weights=None)
            _dilate_basic_layers(net)
        else:
            net = _RESNETS[backbone](weights=None, replace_stride_with_dilation=[False, True, True])
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                      net.layer1, net.layer2, net.layer3, net.layer4)
        in_ch = net.fc.in_features
        self.head = ASPPv2(in_ch, num_classes) if head == "v2" else ASPPv3(in_ch, num_classes)

    def forward(self, x):
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, wd: float):
        """Backbone at lr, head at 10x lr (the reference recipe)."""
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "weight_decay": wd, "lr_mult": 1.0},
            {"params": list(self.head.parameters()), "lr": 10 * lr, "weight_decay": wd, "lr_mult": 10.0},
        ]

    def freeze_bn(self):
        """Keep backbone BatchNorm statistics fixed (small per-GPU batches; ImageNet statistics)."""
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_bn:
            self.freeze_bn()
        return self


# Names of the torchvision ResNet submodules in the order they sit in `self.backbone`.
_BACKBONE_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _dilate_basic_layers(net) -> None:
    """Output stride 8 for BasicBlock ResNets: strides 1 with dilation 2/4 in layer3/layer4."""
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            for conv in (block.conv1, block.conv2):
                conv.stride = (1, 1)
                conv.dilation = (dilation, dilation)
                conv.padding = (dilation, dilation)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def load_imagenet_backbone(model: DeepLab, path: str) -> dict:
    """Load a torchvision-format ImageNet state dict into the backbone; fc.* is ignored.

    Raises WeightsError naming the file and the missing/unexpected/mismatched keys. A timm
    backbone takes its own formats (timm_backbone.load_backbone_weights, imagenet:<name> too)."""
    if isinstance(model.backbone, LastFeatureMap):
        return load_backbone_weights(model.backbone.net, path)
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"DeepLab ImageNet weights '{path}' not found (give a local torchvision "
                           "ResNet state dict, or set deeplab.allow_random_init=true)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"DeepLab weights '{path}': not a readable torch state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = {}
    for idx, name in enumerate(_BACKBONE_ORDER):
        for k, v in model.backbone[idx].state_dict().items():
            target[f"{name}.{k}"] = (idx, k, v)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target and not k.startswith("fc.")]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k][2].shape)}"
                  for k in target if k in state and tuple(state[k].shape) != tuple(target[k][2].shape)]
    if missing or mismatched or unexpected:
        raise WeightsError(
            f"DeepLab weights '{path}' do not fit the backbone: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}, "
            f"shape-mismatched {mismatched[:10]}")
    with torch.no_grad():
        for k, (idx, sub, tensor) in target.items():
            tensor.copy_(state[k])
    return {"loaded": len(target), "ignored": [k for k in state if k.startswith("fc.")]}


def build_deeplab(cfg, num_classes: int = 21) -> DeepLab:
    """From `hsc_fast.config.DeeplabConfig` and the class count K+1 (21 VOC, 81 COCO): weights are
    required unless random init is allowed."""
    model = DeepLab(cfg.backbone, cfg.head, num_classes=num_classes, frozen_bn=cfg.frozen_bn)
    if cfg.weights:
        load_imagenet_backbone(model, cfg.weights)
    elif not cfg.allow_random_init:
        raise WeightsError("deeplab.weights is empty: give a local ImageNet torchvision state dict "
                           "or set deeplab.allow_random_init=true")
    return model
