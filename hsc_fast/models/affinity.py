"""AffinityNet of PSA (Ahn & Kwak, CVPR 2018) on the project's OS-8 backbones.

forward(img (N,3,H,W)) -> (N, feat_dim, ceil(H/8), ceil(W/8)) affinity features f; the pair
affinities a_pq = exp(-mean_c |f_p - f_q|) are hsc_fast.ops.random_walk.pairwise_affinity(f, 5).

What PSA's network/resnet38_aff.py does, reproduced here:
- taps the ResNet-38 activations conv4 (BN-ReLU input of b5, 512), conv5 (input of b6, 1024) and
  conv6 (ReLU(bn7), 4096): the backbone's {"conv4", "conv5", "conv6"} (for the torchvision
  ResNets layer2/layer3/layer4, the analogous three deepest stages, all at stride 8);
- 1x1 convs without bias to 64 / 128 / 256 (``f8_3``, ``f8_4``, ``f8_5``), each followed by ELU
  (no normalisation layer: the GroupNorms are only in PSA's VGG-16 variant), concatenated (448),
  then a 1x1 conv 448 -> 448 without bias (``f9``) and ELU;
- init: kaiming_normal_ for f8_*, xavier_uniform_(gain=4) for f9;
- training: BatchNorms frozen in eval mode, conv1a and b2 never trained (resnet38d's ``train``);
  SGD groups backbone weights 1x (wd), biases 2x (no wd), new layers 10x / 20x (train_aff.py), as
  CamNet.param_groups.
The layer names are PSA's, so an authors' resnet38_aff checkpoint maps with a ``backbone.``
prefix for the ResNet-38 part.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from hsc_fast.errors import WeightsError
from hsc_fast.models.backbones import build_backbone
from hsc_fast.models.cam_net import lr_group_dicts

PSA_BRANCH_DIMS = (64, 128, 256)
PSA_FEAT_DIM = 448
HEAD_LAYERS = ("f8_3", "f8_4", "f8_5", "f9")
BACKBONE_PREFIX = "backbone."


class AffinityNet(nn.Module):
    """Backbone + PSA's affinity head; see the module docstring."""

    def __init__(self, backbone: nn.Module, branch_dims: Sequence[int] = PSA_BRANCH_DIMS,
                 feat_dim: int = PSA_FEAT_DIM, frozen_bn: bool = True, freeze_stem: bool = True):
        super().__init__()
        ch = backbone.out_channels
        d3, d4, d5 = branch_dims
        self.backbone = backbone
        self.f8_3 = nn.Conv2d(ch["conv4"], d3, 1, bias=False)
        self.f8_4 = nn.Conv2d(ch["conv5"], d4, 1, bias=False)
        self.f8_5 = nn.Conv2d(ch["conv6"], d5, 1, bias=False)
        self.f9 = nn.Conv2d(d3 + d4 + d5, feat_dim, 1, bias=False)
        for conv in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        self.feat_dim = feat_dim
        self.frozen_bn = frozen_bn
        self.freeze_stem = freeze_stem
        self._freeze()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) -> (N, feat_dim, ceil(H/8), ceil(W/8)):
        f = elu(f9([elu(f8_3 conv4), elu(f8_4 conv5), elu(f8_5 conv6)]))."""
        feats = self.backbone(img)
        x = torch.cat([F.elu(self.f8_3(feats["conv4"])), F.elu(self.f8_4(feats["conv5"])),
                       F.elu(self.f8_5(feats["conv6"]))], dim=1)
        return F.elu(self.f9(x))

    # -- frozen parts (as CamNet: PSA's resnet38d.train) -------------------------------------
    def _frozen_params(self):
        if self.freeze_stem:
            for m in self.backbone.frozen_modules():
                yield from m.parameters()
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    yield from m.parameters()

    def _freeze(self) -> None:
        for p in self._frozen_params():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "AffinityNet":
        """Like nn.Module.train, but frozen BatchNorms stay in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        self._freeze()
        return self

    # -- optimisation --------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """train_aff.py's SGD groups over the trainable parameters (empty groups left out):
        backbone weights lr x1 (wd), backbone biases x2 (no wd), head weights x10 (wd), head
        biases x20 (no wd); ``backbone_lr_mult`` scales the two backbone groups (refine.backbone_lr_mult).
        Each dict: params, lr, lr_mult, name, weight_decay."""
        members = {}
        for pname, p in self.named_parameters():
            if p.requires_grad:
                kind = "bias" if pname.endswith("bias") else "weight"
                where = "backbone" if pname.startswith(BACKBONE_PREFIX) else "new"
                members.setdefault(f"{where}_{kind}", []).append(p)
        return lr_group_dicts(members, lr, weight_decay, backbone_lr_mult)

    # -- weights -------------------------------------------------------------------------------
    def load_backbone_state(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy the backbone tensors of ``state_dict`` into this network; returns the keys used.

        Accepts a CamNet state dict (``backbone.*`` keys; its heads cam_head / pcm / *_proj are
        skipped) or a bare backbone state dict. Every backbone tensor must be there with the
        right shape (WeightsError lists each problem)."""
        return load_backbone_state(self, state_dict)


def _backbone_part(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The backbone tensors of a CamNet / AffinityNet state dict, or a bare backbone one, keyed
    without the prefix."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    values = list(state_dict.values())
    if any(k.startswith(BACKBONE_PREFIX) for k in keys):
        return {k[len(BACKBONE_PREFIX):]: v for k, v in zip(keys, values) if k.startswith(BACKBONE_PREFIX)}
    return dict(zip(keys, values))


def load_backbone_state(net: AffinityNet, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """See AffinityNet.load_backbone_state."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"affinity weights: expected a state dict of tensors, got {type(state_dict).__name__}")
    theirs = _backbone_part(state_dict)
    own = net.backbone.state_dict()
    missing = [k for k in own if k not in theirs and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in theirs if k not in own and not net.backbone.is_unused_pretrained_key(k)]
    mismatched = [f"{k}: given {tuple(v.shape)}, model {tuple(own[k].shape)}"
                  for k, v in theirs.items() if k in own and v.shape != own[k].shape]
    problems = [f"{what} [{', '.join(keys[:25])}{' ...' if len(keys) > 25 else ''}]"
                for what, keys in (("missing backbone keys", missing), ("unexpected backbone keys", unexpected),
                                   ("shape mismatches", mismatched)) if keys]
    if problems:
        raise WeightsError(f"affinity weights do not fit the {type(net.backbone).__name__} backbone: "
                           + "; ".join(problems))
    with torch.no_grad():
        for k, v in theirs.items():
            if k in own:
                own[k].copy_(v)
    return sorted(BACKBONE_PREFIX + k for k in theirs if k in own)


def build_affinity_net(backbone: str, width_div: int = 1,
                       weights_state_dict: Optional[Mapping[str, torch.Tensor]] = None, *,
                       branch_dims: Sequence[int] = PSA_BRANCH_DIMS, feat_dim: int = PSA_FEAT_DIM,
                       frozen_bn: bool = True, freeze_stem: bool = True) -> AffinityNet:
    """'resnet38' | 'resnet18' | 'resnet50' -> AffinityNet; with ``weights_state_dict`` (a CamNet
    state dict, e.g. a CAM run's final/model.pt, or a bare backbone state dict) its backbone
    starts from those weights, the head from PSA's init. PSA itself starts from the ImageNet
    ResNet-38: load that into a CamNet (load_pretrained) and pass its state_dict()."""
    net = AffinityNet(build_backbone(backbone, width_div), branch_dims=branch_dims, feat_dim=feat_dim,
                      frozen_bn=frozen_bn, freeze_stem=freeze_stem)
    if weights_state_dict is not None:
        net.load_backbone_state(weights_state_dict)
    return net
