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


def resnet101s_file_keys() -> dict:
    """The keys and shapes of PyTorch-Encoding's resnet101s-03a0f310.pth, written from its
    definition (deep-base stem conv1.0/.1/.3/.4/.6 of widths 64/64/128, bn1 128, Bottleneck layers
    3/4/23/3 of widths 64/128/256/512 x4, projections in each first block, fc 2048 -> 1000)."""
    def bn(prefix, n):
        return {f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")}
    keys = {"conv1.0.weight": (64, 3, 3, 3), **bn("conv1.1", 64), "conv1.3.weight": (64, 64, 3, 3),
            **bn("conv1.4", 64), "conv1.6.weight": (128, 64, 3, 3), **bn("bn1", 128)}
    inplanes = 128
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            keys.update({f"{p}.conv1.weight": (planes, inplanes, 1, 1), **bn(f"{p}.bn1", planes),
                         f"{p}.conv2.weight": (planes, planes, 3, 3), **bn(f"{p}.bn2", planes),
                         f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **bn(f"{p}.bn3", planes * 4)})
            if b == 0:
                keys.update({f"{p}.downsample.0.weight": (planes * 4, inplanes, 1, 1), **bn(f"{p}.downsample.1", planes * 4)})
            inplanes = planes * 4
    keys.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    return keys


@pytest.mark.parametrize("with_counters", [False, True])
def test_resnet101s_loads_the_pytorch_encoding_file_layout(tmp_path, with_counters):
    g = torch.Generator().manual_seed(0)
    state = {k: torch.rand(shape, generator=g) + 0.5 for k, shape in resnet101s_file_keys().items()}
    if with_counters:   # files saved by newer torch carry BatchNorm counters
        state.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(7)
                      for k in list(state) if k.endswith("running_mean")})
    path = tmp_path / "resnet101s-03a0f310.pth"
    torch.save(state, path)
    model = DeepLab("resnet101s", "aspp_bn")
    report = load_imagenet_backbone(model, str(path))
    assert report["ignored"] == ["fc.weight", "fc.bias"]
    assert report["loaded"] == len(state) - 2
    loaded = {f"{name}.{k}": v for name, idx in zip(("conv1", "bn1"), (0, 1))
              for k, v in model.backbone[idx].state_dict().items()}
    torch.testing.assert_close(loaded["conv1.6.weight"], state["conv1.6.weight"])
    torch.testing.assert_close(loaded["bn1.running_var"], state["bn1.running_var"])
    torch.testing.assert_close(model.backbone[7][2].conv2.weight, state["layer4.2.conv2.weight"])
    assert model.backbone[6][5].conv2.dilation == (2, 2) and model.backbone[7][0].conv2.dilation == (2, 2)
    assert model.backbone[7][1].conv2.dilation == (4, 4)
    assert model.eval()(torch.zeros(1, 3, 65, 81)).shape == (1, 21, 65, 81)
    assert model.backbone(torch.zeros(1, 3, 65, 81)).shape[-2:] == (9, 11)


def test_torchvision_resnet101_still_loads_and_a_mixed_up_file_is_named(tmp_path):
    tv = torchvision.models.resnet101(weights=None).state_dict()
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(tv, path)
    model = DeepLab("resnet101", "aspp_bn")
    assert load_imagenet_backbone(model, str(path))["loaded"] == len(tv) - 2
    torch.testing.assert_close(model.backbone[0].weight, tv["conv1.weight"])
    with pytest.raises(WeightsError, match="torchvision ResNet file: set deeplab.backbone=resnet101"):
        load_imagenet_backbone(DeepLab("resnet101s", "aspp_bn"), str(path))


def test_aspp_bn_head_is_the_authors_layout():
    from hsc_fast.models.deeplab import ASPPBN
    head = ASPPBN(32, 5).eval()
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.dilation[0], c.out_channels, c.bias is not None) for c in convs] == [
        (3, 6, 256, False), (3, 12, 256, False), (3, 18, 256, False), (3, 24, 256, False), (1, 1, 256, False),
        (1, 1, 256, False), (1, 1, 5, True)]
    assert convs[5].in_channels == 5 * 256
    x = torch.randn(2, 32, 7, 9)
    pooled = head.pool(x.mean((2, 3), keepdim=True))
    feats = torch.cat([b(x) for b in head.branches] + [pooled.expand(-1, -1, 7, 9)], 1)
    torch.testing.assert_close(head(x), head.classifier(head.project(feats)))
