"""ResNet-38 "A1" (Wu et al., "Wider or Deeper", 2019) at output stride 8: the backbone of PSA/SEAM/EPS/HSC.

Pre-activation residual blocks; strides 2 at b2, b3, b4 (so output stride 8), then b5 (dilation 2)
and the two bottleneck blocks b6, b7 (dilation 4, channel dropout 0.3 / 0.5) and a final BN-ReLU
("conv6", 4096 channels). Besides conv6 the network exposes the two BN-ReLU activations SEAM's
PCM taps: "conv4" (the 512-d input of b5) and "conv5" (the 1024-d input of b6).

Module and parameter names follow the authors' PyTorch port (b2, b2_1, ..., conv_branch2a,
bn_branch2b1, bn7), so their converted .pth files load as they are, and the MXNet ImageNet
keys map one-to-one (`mxnet_key_to_torch`): `res2b1_branch2a_weight` -> `b2_1.conv_branch2a.weight`,
`bn4a_branch1_...`, `aux:bn5b2_branch2b1_moving_var` -> `b5_2.bn_branch2b1.running_var`,
`bn7_gamma` -> `bn7.weight`; `linear1000_*` (the ImageNet classifier) is not used.

`width_div` shrinks every width (not the geometry or the names) for fast tests.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# name, kind, in, mid, out, stride, first dilation, dilation, dropout  (widths before width_div)
_STAGES = (
    [("b2", "res", 64, 128, 128, 2, 1, 1, 0.0)]
    + [(f"b2_{i}", "res", 128, 128, 128, 1, 1, 1, 0.0) for i in (1, 2)]
    + [("b3", "res", 128, 256, 256, 2, 1, 1, 0.0)]
    + [(f"b3_{i}", "res", 256, 256, 256, 1, 1, 1, 0.0) for i in (1, 2)]
    + [("b4", "res", 256, 512, 512, 2, 1, 1, 0.0)]
    + [(f"b4_{i}", "res", 512, 512, 512, 1, 1, 1, 0.0) for i in range(1, 6)]
    + [("b5", "res", 512, 512, 1024, 1, 1, 2, 0.0)]
    + [(f"b5_{i}", "res", 1024, 512, 1024, 1, 2, 2, 0.0) for i in (1, 2)]
    + [("b6", "bot", 1024, 0, 2048, 1, 4, 4, 0.3),
       ("b7", "bot", 2048, 0, 4096, 1, 4, 4, 0.5)]
)
STEM_WIDTH = 64
CONV4_INPUT_OF = "b5"   # conv4 = BN-ReLU input of b5
CONV5_INPUT_OF = "b6"   # conv5 = BN-ReLU input of b6
FROZEN = ("conv1a", "b2", "b2_1", "b2_2")  # the official recipe never trains these
MXNET_UNUSED_PREFIX = "linear1000"


class PreActBlock(nn.Module):
    """Two 3x3 convs, pre-activation; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int = 1,
                 first_dilation: int = 1, dilation: int = 1):
        super().__init__()
        self.same_shape = c_in == c_out and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(c_in)
        self.conv_branch2a = nn.Conv2d(c_in, c_mid, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(c_mid)
        self.conv_branch2b1 = nn.Conv2d(c_mid, c_out, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (block output, the BN-ReLU pre-activation of the input)."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y, pre


class PreActBottleneck(nn.Module):
    """1x1 (out/4) -> 3x3 dilated (out/2) -> 1x1 (out), pre-activation, channel dropout."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(c_in)
        self.conv_branch2a = nn.Conv2d(c_in, c_out // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(c_out // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(c_out // 4, c_out // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(c_out // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(c_out // 2, c_out, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(pre)
        y = self.conv_branch2a(pre)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y, pre


class ResNet38(nn.Module):
    """ResNet-38 A1, output stride 8. forward(x) -> {"conv4", "conv5", "conv6"}."""

    def __init__(self, width_div: int = 1):
        super().__init__()
        w = lambda c: max(1, c // width_div)  # noqa: E731
        self.conv1a = nn.Conv2d(3, w(STEM_WIDTH), 3, padding=1, bias=False)
        self.block_names = []
        for name, kind, c_in, c_mid, c_out, stride, first_dil, dil, drop in _STAGES:
            if kind == "res":
                block = PreActBlock(w(c_in), w(c_mid), w(c_out), stride, first_dil, dil)
            else:
                block = PreActBottleneck(w(c_in), w(c_out), stride, dil, drop)
            self.add_module(name, block)
            self.block_names.append(name)
        self.bn7 = nn.BatchNorm2d(w(4096))
        self.out_channels = {"conv4": w(512), "conv5": w(1024), "conv6": w(4096)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        x = self.conv1a(x)
        for name in self.block_names:
            x, pre = getattr(self, name)(x)
            if name == CONV4_INPUT_OF:
                feats["conv4"] = pre
            elif name == CONV5_INPUT_OF:
                feats["conv5"] = pre
        feats["conv6"] = F.relu(self.bn7(x))
        return feats

    def frozen_modules(self) -> list[nn.Module]:
        """Layers the official recipe keeps fixed at their ImageNet values (conv1a and stage b2)."""
        return [getattr(self, n) for n in FROZEN]

    # -- pretrained weights -------------------------------------------------------------------
    supports_mxnet = True

    @staticmethod
    def is_unused_pretrained_key(key: str) -> bool:
        """File keys that are legitimately dropped (the ImageNet classifier)."""
        return key.split(".")[0] == MXNET_UNUSED_PREFIX

    @staticmethod
    def convert_mxnet(arrays: Mapping[str, np.ndarray]):
        return convert_mxnet_resnet38(arrays)


# ------------------------------------------------------------------------------------------------
# MXNet key mapping
# ------------------------------------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"^(res|bn)(\d)(a|b(\d+))_branch(1|2a|2b1|2b2)_"
                        r"(weight|gamma|beta|moving_mean|moving_var)$")
_BN_FIELDS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}


def mxnet_key_to_torch(key: str) -> Optional[str]:
    """'arg:res2b1_branch2a_weight' -> 'b2_1.conv_branch2a.weight'; the ImageNet classifier -> None.

    Raises KeyError for a key that is not part of ResNet-38.
    """
    name = key.split(":", 1)[1] if key[:4] in ("arg:", "aux:") else key
    if name.startswith(MXNET_UNUSED_PREFIX + "_"):
        return None
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("bn7_") and name[4:] in _BN_FIELDS:
        return "bn7." + _BN_FIELDS[name[4:]]
    m = _BLOCK_KEY.match(name)
    if m is None:
        raise KeyError(key)
    layer, stage, pos, sub, branch, field = m.groups()
    block = f"b{stage}" if pos == "a" else f"b{stage}_{sub}"
    if layer == "res" and field == "weight":
        return f"{block}.conv_branch{branch}.weight"
    if layer == "bn" and field in _BN_FIELDS:
        return f"{block}.bn_branch{branch}.{_BN_FIELDS[field]}"
    raise KeyError(key)


def convert_mxnet_resnet38(arrays: Mapping[str, np.ndarray]):
    """MXNet arrays -> (torch state dict for ResNet38, {torch key: file key}, ignored file keys,
    unknown file keys)."""
    state, origin, ignored, unknown = {}, {}, [], []
    for key, arr in arrays.items():
        try:
            name = mxnet_key_to_torch(key)
        except KeyError:
            unknown.append(key)
            continue
        if name is None:
            ignored.append(key)
        else:
            state[name] = torch.from_numpy(np.ascontiguousarray(arr))
            origin[name] = key
    return state, origin, ignored, unknown
