"""AffinityNet: geometry, PSA's head layout, CamNet backbone weights, frozen parts, lr groups."""
import math

import pytest
import torch

from hsc_fast.errors import WeightsError
from hsc_fast.models import CamNet, build_backbone
from hsc_fast.models.affinity import AffinityNet, build_affinity_net

torch.manual_seed(0)


@pytest.mark.parametrize("backbone, width_div", [("resnet38", 16), ("resnet18", 1)])
@pytest.mark.parametrize("size", [(65, 97), (33, 40), (57, 8)])
def test_features_are_448_wide_at_stride_8(backbone, width_div, size):
    net = build_affinity_net(backbone, width_div).eval()
    with torch.no_grad():
        f = net(torch.randn(2, 3, *size))
    assert f.shape == (2, 448, *(math.ceil(s / 8) for s in size))
    assert (f >= -1).all()                                   # ELU output


def test_head_is_psas_layout():
    net = build_affinity_net("resnet38", 16)
    ch = net.backbone.out_channels
    assert [tuple(getattr(net, n).weight.shape) for n in ("f8_3", "f8_4", "f8_5", "f9")] == [
        (64, ch["conv4"], 1, 1), (128, ch["conv5"], 1, 1), (256, ch["conv6"], 1, 1), (448, 448, 1, 1)]
    assert all(getattr(net, n).bias is None for n in ("f8_3", "f8_4", "f8_5", "f9"))
    small = build_affinity_net("resnet18", branch_dims=(8, 8, 16), feat_dim=32).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 24, 24)).shape == (1, 32, 3, 3)


@pytest.mark.parametrize("backbone, width_div", [("resnet38", 16), ("resnet18", 1)])
def test_camnet_backbone_weights_are_copied_exactly(backbone, width_div):
    cam = CamNet(build_backbone(backbone, width_div))
    with torch.no_grad():                       # make every backbone tensor (buffers too) distinctive
        for i, t in enumerate(cam.backbone.state_dict().values()):
            if t.dtype.is_floating_point:
                t.copy_(torch.randn_like(t) * 0.1 + i)
    net = build_affinity_net(backbone, width_div, weights_state_dict=cam.state_dict())
    theirs = cam.backbone.state_dict()
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    # a bare backbone state dict works too; the head keeps its own init
    head = net.f9.weight.clone()
    used = net.load_backbone_state(cam.backbone.state_dict())
    assert torch.equal(net.f9.weight, head) and all(k.startswith("backbone.") for k in used)


def test_bad_backbone_weights_list_the_problems():
    net = build_affinity_net("resnet38", 16)
    other = CamNet(build_backbone("resnet38", 8)).state_dict()
    with pytest.raises(WeightsError, match="shape mismatches"):
        net.load_backbone_state(other)
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.b7")}
    with pytest.raises(WeightsError, match="missing backbone keys.*b7"):
        net.load_backbone_state(partial)


def test_frozen_parts_and_lr_groups():
    net = build_affinity_net("resnet38", 16).train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for p in net.backbone.conv1a.parameters())
    assert all(not p.requires_grad for p in net.backbone.b2_2.parameters())
    groups = {g["name"]: g for g in net.param_groups(0.1, 5e-4)}
    assert set(groups) == {"backbone_weight", "new_weight"}      # no biases anywhere (PSA's convs)
    assert groups["backbone_weight"]["lr"] == pytest.approx(0.1)
    assert groups["new_weight"]["lr"] == pytest.approx(1.0) and groups["new_weight"]["weight_decay"] == 5e-4
    assert {id(p) for p in groups["new_weight"]["params"]} == {
        id(getattr(net, n).weight) for n in ("f8_3", "f8_4", "f8_5", "f9")}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g["params"]}
    scaled = {g["name"]: g for g in net.param_groups(0.1, 5e-4, backbone_lr_mult=0.01)}  # refine.backbone_lr_mult
    assert scaled["backbone_weight"]["lr"] == pytest.approx(0.001) and scaled["new_weight"]["lr"] == pytest.approx(1.0)
    assert [id(p) for p in scaled["backbone_weight"]["params"]] == [id(p) for p in groups["backbone_weight"]["params"]]


def test_frozen_bn_can_be_turned_off():
    net = AffinityNet(build_backbone("resnet18"), frozen_bn=False, freeze_stem=False).train()
    assert all(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.requires_grad for p in net.parameters())
