"""DeepLab model: geometry, v2 head semantics, ImageNet loading and its errors."""
import pytest
import torch
import torchvision

from hsc_fast.config import DeeplabConfig
from hsc_fast.errors import WeightsError
from hsc_fast.models.deeplab import ASPPv2, DeepLab, build_deeplab, load_imagenet_backbone


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_output_stride_8_and_input_size_logits(backbone):
    model = DeepLab(backbone, "v2").eval()
    feats = model.backbone(torch.zeros(1, 3, 65, 81))
    assert feats.shape[-2:] == (9, 11)  # ceil(65/8), ceil(81/8)
    assert model(torch.zeros(1, 3, 65, 81)).shape == (1, 21, 65, 81)


def test_aspp_v2_sums_its_branches():
    head = ASPPv2(8, 3)
    x = torch.randn(1, 8, 10, 10)
    expected = sum(torch.nn.functional.conv2d(x, b.weight, b.bias, padding=b.padding, dilation=b.dilation)
                   for b in head.branches)
    torch.testing.assert_close(head(x), expected)
    assert [b.dilation[0] for b in head.branches] == [6, 12, 18, 24]


def test_v3_head_shapes():
    model = DeepLab("resnet18", "v3").eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 21, 64, 64)


def test_imagenet_weights_round_trip(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = DeepLab("resnet18", "v2")
    report = load_imagenet_backbone(model, str(path))
    assert report["ignored"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(model.backbone[4][0].conv1.weight, ref.layer1[0].conv1.weight)
    torch.testing.assert_close(model.backbone[1].running_mean, ref.bn1.running_mean)


def test_weight_errors_name_the_problem(tmp_path):
    model = DeepLab("resnet18", "v2")
    with pytest.raises(WeightsError, match="not found"):
        load_imagenet_backbone(model, str(tmp_path / "absent.pth"))
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    state["layer1.0.bn1.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight.*layer1\.0\.bn1\.weight"):
        load_imagenet_backbone(model, str(path))
    with pytest.raises(WeightsError, match="allow_random_init"):
        build_deeplab(DeeplabConfig(backbone="resnet18"))


def test_frozen_bn_stays_fixed_in_training():
    model = DeepLab("resnet18", "v2").train()
    bn = model.backbone[1]
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert not bn.weight.requires_grad


def test_unfrozen_bn_learns_statistics_for_random_init():
    model = DeepLab("resnet18", "v2", frozen_bn=False).train()
    bn = model.backbone[1]
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert bn.training and not torch.equal(bn.running_mean, before)
