"""DeepLab-ASPP for the last stage: a dilated ResNet (output stride 8) with one of three heads.

- aspp_bn (the authors' `segmentation/` "deeplabv2", official): four 3x3 atrous branches (rates
  6/12/18/24) and an image-pooling branch, each conv + BatchNorm (momentum `head_bn_momentum`) +
  ReLU, 256-d; concatenated, 1x1 conv + BN + ReLU + dropout 0.5; dropout 0.5 + 1x1 classifier.
- v2 (Chen et al. 2017): four parallel 3x3 atrous classifiers whose logits are SUMMED.
- v3: atrous branches 12/24/36 with BatchNorm + image pooling, projected, dropout 0.1.
Backbones: resnet101s (PyTorch-Encoding's deep-base stem, the authors' choice) or a torchvision
ResNet. ImageNet initialisation reads a local state dict; there is no download.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from hsc_fast.errors import WeightsError
from hsc_fast.models.backbones import RESNET101S_FILE, deep_base_resnet101
from hsc_fast.models.timm_backbone import LastFeatureMap, TimmBackbone, is_timm, load_backbone_weights

_RESNETS = {"resnet101": torchvision.models.resnet101, "resnet50": torchvision.models.resnet50,
            "resnet18": torchvision.models.resnet18}
HEADS = ("aspp_bn", "v2", "v3")


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


class ASPPBN(nn.Module):
    """The authors' DeepLab head: BN'd atrous branches + image pooling, projected, then classified."""

    def __init__(self, in_ch: int, num_classes: int, rates=(6, 12, 18, 24), width: int = 256,
                 bn_momentum: float = 3e-4):
        super().__init__()

        def conv_bn_relu(cin, k, r):
            return [nn.Conv2d(cin, width, k, padding=r if k == 3 else 0, dilation=r, bias=False),
                    nn.BatchNorm2d(width, momentum=bn_momentum), nn.ReLU(inplace=True)]

        self.branches = nn.ModuleList(nn.Sequential(*conv_bn_relu(in_ch, 3, r)) for r in rates)
        self.pool = nn.Sequential(*conv_bn_relu(in_ch, 1, 1))   # on the 1x1 global average
        self.project = nn.Sequential(*conv_bn_relu((len(rates) + 1) * width, 1, 1), nn.Dropout(0.5))
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        for m in self.modules():   # the reference's init of its new layers (classifier bias: torch default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])  # 1x1 upsampled = copies
        feats = [b(x) for b in self.branches] + [pooled]
        return self.classifier(self.dropout(self.project(torch.cat(feats, 1))))


LR_GROUPS = ("conv_1_2_10_20", "backbone_head")


class DeepLab(nn.Module):
    """Dilated ResNet (OS 8) + ASPP head; `forward` returns logits at the input size.

    align_corners: of the final bilinear upsampling (the authors: True). bn_affine_trained=False
    leaves every BatchNorm weight/bias out of the optimiser (the authors' groups hold conv
    parameters only; here they get requires_grad False, which changes no other gradient)."""

    def __init__(self, backbone: str = "resnet101", head: str = "v2", num_classes: int = 21,
                 frozen_bn: bool = True, *, align_corners: bool = False, head_bn_momentum: float = 3e-4,
                 bn_affine_trained: bool = True, lr_groups: str = "backbone_head"):
        super().__init__()
        self.frozen_bn, self.align_corners = frozen_bn, align_corners
        if lr_groups not in LR_GROUPS:
            raise ValueError(f"deeplab lr_groups '{lr_groups}': expected one of {', '.join(LR_GROUPS)}")
        self.lr_groups = lr_groups
        if is_timm(backbone):  # timm:<name> at output stride 8: its conv6 map (models/timm_backbone.py)
            self.backbone = LastFeatureMap(TimmBackbone(backbone))
            in_ch = self.backbone.out_channels
        else:
            net = _backbone_net(backbone)
            self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                          net.layer1, net.layer2, net.layer3, net.layer4)
            in_ch = net.fc.in_features
        if head not in HEADS:
            raise ValueError(f"deeplab head '{head}': expected one of {', '.join(HEADS)}")
        self.head = {"aspp_bn": lambda: ASPPBN(in_ch, num_classes, bn_momentum=head_bn_momentum),
                     "v2": lambda: ASPPv2(in_ch, num_classes), "v3": lambda: ASPPv3(in_ch, num_classes)}[head]()
        if not bn_affine_trained:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def forward(self, x):
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def param_groups(self, lr: float, wd: float, backbone_lr_mult: float = 1.0):
        """`lr_groups`: conv_1_2_10_20 (the authors': backbone conv weights 1x with decay, backbone
        conv biases 2x, head conv weights 10x with decay, head conv biases 20x, no decay on biases;
        BatchNorm parameters in no group) or backbone_head (backbone 1x, head 10x, decay on all).
        ``backbone_lr_mult`` (deeplab.backbone_lr_mult) scales the backbone's groups only."""
        if self.lr_groups == "backbone_head":
            return [
                {"params": list(self.backbone.parameters()), "lr": lr * backbone_lr_mult, "weight_decay": wd,
                 "lr_mult": backbone_lr_mult},
                {"params": list(self.head.parameters()), "lr": 10 * lr, "weight_decay": wd, "lr_mult": 10.0},
            ]
        groups = {name: [] for name in ("weight", "bias", "new_weight", "new_bias")}
        head = set(self.head.modules())
        for m in self.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            prefix = "new_" if m in head else ""
            for kind in ("weight", "bias"):
                p = getattr(m, kind)
                if p is not None and p.requires_grad:
                    groups[prefix + kind].append(p)
        mults = {"weight": backbone_lr_mult, "bias": 2.0 * backbone_lr_mult, "new_weight": 10.0, "new_bias": 20.0}
        return [{"params": ps, "lr": lr * mults[n], "lr_mult": mults[n], "name": n,
                 "weight_decay": 0.0 if n.endswith("bias") else wd} for n, ps in groups.items()]

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


def _backbone_net(name: str) -> nn.Module:
    """A torchvision-layout ResNet at output stride 8 (fc kept only for its width)."""
    if name == "resnet101s":
        return deep_base_resnet101(dilated=True)
    if name not in _RESNETS:
        raise ValueError(f"deeplab backbone '{name}': expected one of resnet101s, {', '.join(_RESNETS)}")
    if name == "resnet18":  # BasicBlock cannot dilate: stride-8 by hand below
        net = _RESNETS[name](weights=None)
        _dilate_basic_layers(net)
        return net
    return _RESNETS[name](weights=None, replace_stride_with_dilation=[False, True, True])


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
    """Load an ImageNet state dict into the backbone; fc.* is ignored. The file is a torchvision
    ResNet's for resnet18/50/101, PyTorch-Encoding's `resnet101s-03a0f310.pth` for resnet101s (same
    key names as the module; old files without BatchNorm `num_batches_tracked` entries load too).

    Raises WeightsError naming the file and the missing/unexpected/mismatched keys. A timm
    backbone takes its own formats (timm_backbone.load_backbone_weights, imagenet:<name> too)."""
    if isinstance(model.backbone, LastFeatureMap):
        return load_backbone_weights(model.backbone.net, path)
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"DeepLab ImageNet weights '{path}' not found (give a local ImageNet ResNet state dict "
                           f"-- torchvision's, or {RESNET101S_FILE} for resnet101s -- or set "
                           "deeplab.allow_random_init=true)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"DeepLab weights '{path}': not a readable torch state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = {}
    for idx, name in enumerate(_BACKBONE_ORDER):
        for k, v in model.backbone[idx].state_dict().items():
            target[f"{name}.{k}"] = v
    optional = [k for k in target if k.endswith("num_batches_tracked")]
    missing = [k for k in target if k not in state and k not in optional]
    unexpected = [k for k in state if k not in target and not k.startswith("fc.")]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or mismatched or unexpected:
        raise WeightsError(
            f"DeepLab weights '{path}' do not fit the backbone: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}, "
            f"shape-mismatched {mismatched[:10]}{_backbone_hint(state, target)}")
    with torch.no_grad():
        for k, tensor in target.items():
            if k in state:
                tensor.copy_(state[k])
    return {"loaded": len([k for k in target if k in state]), "ignored": [k for k in state if k.startswith("fc.")]}


def _backbone_hint(state: dict, target: dict) -> str:
    """Name the likely mix-up of a deep-base file and a torchvision one."""
    if "conv1.0.weight" in state and "conv1.weight" in target:
        return f" -- this looks like a deep-base file ({RESNET101S_FILE}): set deeplab.backbone=resnet101s"
    if "conv1.weight" in state and "conv1.0.weight" in target:
        return " -- this looks like a torchvision ResNet file: set deeplab.backbone=resnet101 (or give " \
               f"{RESNET101S_FILE})"
    return ""


def deeplab_from_config(cfg, num_classes: int = 21) -> DeepLab:
    """The randomly initialised network of `hsc_fast.config.DeeplabConfig`."""
    return DeepLab(cfg.backbone, cfg.head, num_classes=num_classes, frozen_bn=cfg.frozen_bn,
                   align_corners=cfg.align_corners, head_bn_momentum=cfg.head_bn_momentum,
                   bn_affine_trained=cfg.bn_affine_trained, lr_groups=cfg.lr_groups)


def build_deeplab(cfg, num_classes: int = 21) -> DeepLab:
    """From `hsc_fast.config.DeeplabConfig` and the class count K+1 (21 VOC, 81 COCO): weights are
    required unless random init is allowed."""
    model = deeplab_from_config(cfg, num_classes)
    if cfg.weights:
        load_imagenet_backbone(model, cfg.weights)
    elif not cfg.allow_random_init:
        raise WeightsError("deeplab.weights is empty: give a local ImageNet state dict (torchvision's ResNet, or "
                           f"{RESNET101S_FILE} for deeplab.backbone=resnet101s) or set deeplab.allow_random_init=true")
    return model
