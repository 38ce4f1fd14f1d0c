"""CAM network: geometry, ResNet-38 weight mapping, loading errors, frozen BN, lr groups, PCM maths."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from hsc_fast.config import ModelConfig
from hsc_fast.errors import ConfigError, WeightsError
from hsc_fast.models import (CamNet, PixelCorrelation, ResNet38, build_backbone, build_cam_model,
                             load_pretrained, mxnet_key_to_torch, pcm_cam_input, write_mxnet_params)
from hsc_fast.models.backbones import TorchvisionResNet

torch.manual_seed(0)


def mini_net(**kw) -> CamNet:
    """ResNet-38 with every width / 16: same names and geometry, ~0.4 M parameters."""
    return CamNet(build_backbone("resnet38", width_div=16), **kw)


# -- the MXNet key set of ResNet-38, enumerated from the architecture (not from our converter) --
BLOCKS = {2: 3, 3: 3, 4: 6, 5: 3, 6: 1, 7: 1}          # stage -> blocks
PROJECTED = {"2a", "3a", "4a", "5a", "6a", "7a"}        # blocks with a branch1 projection
BOTTLENECK = {6, 7}


def mxnet_resnet38_keys() -> dict:
    """{mxnet key: our backbone key} for the 193 arrays of ilsvrc-cls_rna-a1_cls1000_ep-0001.params."""
    keys = {"arg:conv1a_weight": "conv1a.weight", "arg:linear1000_weight": None, "arg:linear1000_bias": None}
    bn = {"gamma": ("arg", "weight"), "beta": ("arg", "bias"),
          "moving_mean": ("aux", "running_mean"), "moving_var": ("aux", "running_var")}
    for stage, n in BLOCKS.items():
        for i in range(n):
            pos = "a" if i == 0 else f"b{i}"
            ours = f"b{stage}" if i == 0 else f"b{stage}_{i}"
            branches = ["2a", "2b1"] + (["2b2"] if stage in BOTTLENECK else [])
            convs = branches + (["1"] if f"{stage}{pos}" in PROJECTED else [])
            for br in convs:
                keys[f"arg:res{stage}{pos}_branch{br}_weight"] = f"{ours}.conv_branch{br}.weight"
            for br in branches:
                for mx, (kind, pt) in bn.items():
                    keys[f"{kind}:bn{stage}{pos}_branch{br}_{mx}"] = f"{ours}.bn_branch{br}.{pt}"
    for mx, (kind, pt) in bn.items():
        keys[f"{kind}:bn7_{mx}"] = f"bn7.{pt}"
    return keys


def fake_mxnet_weights(backbone: ResNet38, seed: int = 0) -> dict:
    """Random arrays under the real MXNet key names, shaped for `backbone`."""
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    out = {}
    for mx, ours in mxnet_resnet38_keys().items():
        shape = shapes[ours] if ours else (10, shapes["bn7.weight"][0])
        arr = rng.standard_normal(shape).astype(np.float32)
        out[mx] = np.abs(arr) + 0.5 if mx.endswith("moving_var") else arr
    return out


# ---------------------------------------------------------------------------------------------
# Geometry and outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,expect", [((448, 448), (56, 56)), ((128, 128), (16, 16)),
                                         ((65, 97), (9, 13)), ((121, 8), (16, 1))])
def test_resnet38_geometry_is_ceil_of_one_eighth(size, expect):
    net = mini_net().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size))
    assert out["cam"].shape == (1, 21, *expect)
    assert out["cam_rv"].shape == (1, 21, *expect)
    assert out["feat_rsc"].shape == (1, 256, *expect)
    assert out["feat_psc"].shape == (1, 128, *expect)
    assert out["pred"].shape == (1, 21)


@pytest.mark.parametrize("size", [(128, 128), (65, 97), (33, 40)])
def test_resnet18_has_the_same_geometry(size):
    net = build_cam_model(ModelConfig(backbone="resnet18", allow_random_init=True)).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    expect = tuple(math.ceil(s / 8) for s in size)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "cam": (2, 21, *expect), "pred": (2, 21), "cam_rv": (2, 21, *expect), "pred_rv": (2, 21),
        "feat_psc": (2, 128, *expect), "feat_rsc": (2, 256, *expect)}


def test_resnet50_dilation_matches_torchvision_replace_stride_with_dilation():
    ours = TorchvisionResNet("resnet50")
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    ref_convs = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for name, m in ours.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            r = ref_convs[name]
            assert (m.stride, m.dilation, m.padding) == (r.stride, r.dilation, r.padding), name
    assert ours.out_channels == {"conv4": 512, "conv5": 1024, "conv6": 2048}
    with torch.no_grad():
        feats = ours.eval()(torch.randn(1, 3, 57, 64))
    assert [tuple(v.shape[1:]) for v in feats.values()] == [(512, 8, 8), (1024, 8, 8), (2048, 8, 8)]


def test_full_resnet38_network_once():
    """The real 4096-d network: widths, parameter count, outputs on a small input."""
    net = build_cam_model(ModelConfig(allow_random_init=True)).eval()
    assert net.backbone.out_channels == {"conv4": 512, "conv5": 1024, "conv6": 4096}
    assert sum(p.numel() for p in net.backbone.parameters()) == 105_070_912  # ~105 M, as published
    assert tuple(net.cam_head.weight.shape) == (21, 4096, 1, 1)
    assert tuple(net.pcm.fuse.weight.shape) == (192, 195, 1, 1)
    assert [tuple(m.weight.shape) for m in net.rsc_proj if hasattr(m, "weight")] == [
        (256, 4096, 3, 3), (256,), (256, 256, 1, 1)]
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out["cam"].shape == (1, 21, 8, 8) and out["feat_rsc"].shape == (1, 256, 8, 8)
    assert out["feat_psc"].shape == (1, 128, 8, 8) and out["cam_rv"].shape == (1, 21, 8, 8)
    assert (out["feat_psc"] >= 0).all()  # ReLU


def test_cam_head_has_no_bias_and_pred_is_its_average():
    net = mini_net().eval()
    assert net.cam_head.bias is None
    img = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        out = net(img)
        conv6 = net.backbone(img)["conv6"]
    w = net.cam_head.weight[:, :, 0, 0]
    torch.testing.assert_close(out["cam"], torch.einsum("kc,nchw->nkhw", w, conv6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred"], out["cam"].mean(dim=(2, 3)))
    torch.testing.assert_close(net.forward_cam(img), out["cam"])


def test_optional_parts_and_paper_projector():
    cfg = dict(backbone="resnet18", allow_random_init=True)
    out = build_cam_model(ModelConfig(pcm=False, projectors=False, **cfg)).eval()(torch.randn(1, 3, 32, 32))
    assert set(out) == {"cam", "pred"}
    paper = build_cam_model(ModelConfig(rsc_proj="paper", **cfg))
    kinds = [type(m).__name__ for m in paper.rsc_proj]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU"]
    assert (paper.rsc_proj[0].in_channels, paper.rsc_proj[2].out_channels) == (512, 256)
    with pytest.raises(ConfigError, match="model.rsc_proj"):
        mini_net(rsc_proj="mlp")


def test_random_init_needs_permission():
    with pytest.raises(ConfigError, match="allow_random_init"):
        build_cam_model(ModelConfig(backbone="resnet18"))
    with pytest.raises(ConfigError, match="model.backbone"):
        build_backbone("vgg16")


# ---------------------------------------------------------------------------------------------
# MXNet weights
# ---------------------------------------------------------------------------------------------
def test_mxnet_key_names_map_onto_resnet38_exactly():
    keys = mxnet_resnet38_keys()
    assert len(keys) == 193
    for mx, ours in keys.items():
        assert mxnet_key_to_torch(mx) == ours, mx
    with torch.device("meta"):
        model_keys = {k: v.numel() for k, v in ResNet38().state_dict().items()
                      if not k.endswith("num_batches_tracked")}
    assert {v for v in keys.values() if v} == set(model_keys)
    assert sum(model_keys.values()) + 4096 * 1000 + 1000 == 109_215_656  # "~109 M values"
    # spot checks, typed by hand
    assert mxnet_key_to_torch("arg:res2b1_branch2a_weight") == "b2_1.conv_branch2a.weight"
    assert mxnet_key_to_torch("aux:bn5b2_branch2b1_moving_var") == "b5_2.bn_branch2b1.running_var"
    assert mxnet_key_to_torch("arg:res6a_branch2b2_weight") == "b6.conv_branch2b2.weight"
    assert mxnet_key_to_torch("arg:bn7_beta") == "bn7.bias"
    with pytest.raises(KeyError):
        mxnet_key_to_torch("arg:res9z_branch3_weight")


@pytest.mark.parametrize("version", ["legacy", "v1", "v2"])
def test_params_file_loads_into_the_model_exactly(tmp_path, version):
    net = mini_net()
    arrays = fake_mxnet_weights(net.backbone, seed=1)
    path = tmp_path / f"ilsvrc-{version}.params"
    write_mxnet_params(path, arrays, version=version)
    report = load_pretrained(net, path)
    state = net.state_dict()
    for mx, ours in mxnet_resnet38_keys().items():
        if ours:
            assert torch.equal(state["backbone." + ours], torch.from_numpy(arrays[mx])), mx
    assert sorted(report.ignored) == ["arg:linear1000_bias", "arg:linear1000_weight"]
    assert len(report.loaded) == 191
    heads = {k for k in state if not k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    assert set(report.missing_new) == heads
    assert "cam_head.weight" in heads and "pcm.fuse.weight" in heads


def test_mismatched_params_list_every_problem_key(tmp_path):
    net = mini_net()
    arrays = fake_mxnet_weights(net.backbone)
    del arrays["arg:res3b1_branch2a_weight"]
    arrays["arg:res9a_branch2a_weight"] = np.zeros(3, np.float32)
    arrays["aux:bn4a_branch2a_moving_mean"] = np.zeros(5, np.float32)
    path = tmp_path / "bad.params"
    write_mxnet_params(path, arrays)
    with pytest.raises(WeightsError) as e:
        load_pretrained(net, path)
    msg = str(e.value)
    assert "bad.params" in msg
    assert "missing backbone keys [backbone.b3_1.conv_branch2a.weight]" in msg
    assert "unexpected keys [arg:res9a_branch2a_weight (-> backbone.b9.conv_branch2a.weight)]" in msg
    assert ("aux:bn4a_branch2a_moving_mean (-> backbone.b4.bn_branch2a.running_mean): "
            "file (5,), model (16,)") in msg


def test_params_file_refused_for_torchvision_backbone(tmp_path):
    path = tmp_path / "w.params"
    write_mxnet_params(path, {"arg:conv1a_weight": np.zeros((1, 3, 3, 3), np.float32)})
    net = build_cam_model(ModelConfig(backbone="resnet18", allow_random_init=True))
    with pytest.raises(WeightsError, match="torchvision-format .pth"):
        net.load_pretrained(path)


# ---------------------------------------------------------------------------------------------
# torch weights
# ---------------------------------------------------------------------------------------------
def test_torchvision_state_dict_loads_and_fc_is_ignored(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    net = build_cam_model(ModelConfig(backbone="resnet18", weights=str(path)))
    state = net.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(state["backbone." + k], v), k
    assert sorted(net.pretrained_report.ignored) == ["fc.bias", "fc.weight"]


def test_authors_flat_checkpoint_loads_heads_too(tmp_path):
    """A DataParallel checkpoint of the authors' Net (flat backbone names, fc8/f8_3/f9/extra_F)."""
    src = mini_net()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    rename = {"cam_head.": "fc8.", "pcm.conv4_proj.": "f8_3.", "pcm.conv5_proj.": "f8_4.",
              "pcm.fuse.": "f9.", "psc_proj.0.": "proj_fc.", "rsc_proj.": "extra_F.", "backbone.": ""}
    theirs = {}
    for k, v in src.state_dict().items():
        prefix = next(p for p in rename if k.startswith(p))
        theirs["module." + rename[prefix] + k[len(prefix):]] = v
    assert "module.b2_1.conv_branch2a.weight" in theirs and "module.extra_F.1.running_var" in theirs
    path = tmp_path / "hsc_cls.pth"
    torch.save({"state_dict": theirs}, path)
    dst = mini_net()
    report = dst.load_pretrained(path)
    assert report.missing_new == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_bad_torch_files(tmp_path):
    net = mini_net()
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="garbage.pth"):
        net.load_pretrained(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        net.load_pretrained(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="unknown format"):
        (tmp_path / "w.h5").write_bytes(b"x")
        net.load_pretrained(tmp_path / "w.h5")
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"missing backbone keys \[backbone.conv1a.weight.*unexpected keys"):
        net.load_pretrained(wrong)


# ---------------------------------------------------------------------------------------------
# Frozen BN, frozen stem, optimiser groups
# ---------------------------------------------------------------------------------------------
def _bn_snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "bn" in k or "rsc_proj.1" in k}


def _one_sgd_step(net, img):
    opt = torch.optim.SGD(net.param_groups(0.1, 5e-4), lr=0.1, momentum=0.9)
    out = net(img)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_frozen_bn_stays_frozen_after_train_and_a_step():
    net = mini_net().train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 15 * 2 + 2 * 3 + 1 + 1  # 15 blocks, 2 bottlenecks, bn7, projector BN
    assert net.training and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = _bn_snapshot(net)
    stem_before = [p.clone() for m in net.backbone.frozen_modules() for p in m.parameters()]
    head_before = net.cam_head.weight.clone()
    _one_sgd_step(net, torch.randn(2, 3, 32, 32))
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    stem_after = [p for m in net.backbone.frozen_modules() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(stem_before, stem_after))
    assert not torch.equal(net.cam_head.weight, head_before)  # the rest does train
    assert all(not m.training for m in bns)


def test_unfrozen_bn_does_train():
    """Control: the same step with frozen_bn off moves the running statistics."""
    net = mini_net(frozen_bn=False).train()
    before = net.backbone.b4.bn_branch2a.running_mean.clone()
    _one_sgd_step(net, torch.randn(2, 3, 32, 32))
    assert net.backbone.b4.bn_branch2a.training
    assert not torch.equal(net.backbone.b4.bn_branch2a.running_mean, before)


def _groups_by_name(net, lr=0.01, wd=5e-4):
    groups = net.param_groups(lr, wd)
    names = {id(p): n for n, p in net.named_parameters()}
    return {g["name"]: (g, {names[id(p)] for p in g["params"]}) for g in groups}


def test_param_groups_official_membership_and_multipliers():
    net = mini_net()
    groups = _groups_by_name(net)
    assert list(groups) == ["backbone_weight", "backbone_bias", "new_weight"]
    for name, mult, wd in [("backbone_weight", 1, 5e-4), ("backbone_bias", 2, 0.0), ("new_weight", 10, 5e-4)]:
        g, _ = groups[name]
        assert g["lr_mult"] == mult and g["lr"] == pytest.approx(0.01 * mult) and g["weight_decay"] == wd
    bw, bb, nw = (groups[n][1] for n in ("backbone_weight", "backbone_bias", "new_weight"))
    assert nw == {"cam_head.weight", "pcm.conv4_proj.weight", "pcm.conv5_proj.weight", "pcm.fuse.weight",
                  "psc_proj.0.weight"}
    # the official quirk: the projector Sequential's convs sit in the backbone groups
    assert bb == {"rsc_proj.0.bias", "rsc_proj.3.bias"}
    assert {"rsc_proj.0.weight", "rsc_proj.3.weight", "backbone.b3.conv_branch2a.weight",
            "backbone.b7.conv_branch1.weight"} <= bw
    # frozen: conv1a, stage b2 and every BN are in no group
    everything = bw | bb | nw
    assert not any(k.startswith(("backbone.conv1a", "backbone.b2.", "backbone.b2_")) for k in everything)
    assert not any("bn" in k or k.startswith("rsc_proj.1") for k in everything)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert everything == trainable and len(bw) + len(bb) + len(nw) == len(trainable)


def test_param_groups_without_quirk_put_the_projector_in_new_groups():
    groups = _groups_by_name(mini_net(proj_lr_quirk=False))
    assert list(groups) == ["backbone_weight", "new_weight", "new_bias"]
    assert groups["new_bias"][1] == {"rsc_proj.0.bias", "rsc_proj.3.bias"}
    assert groups["new_bias"][0]["lr_mult"] == 20 and groups["new_bias"][0]["weight_decay"] == 0.0
    assert {"rsc_proj.0.weight", "rsc_proj.3.weight"} <= groups["new_weight"][1]


# ---------------------------------------------------------------------------------------------
# PCM
# ---------------------------------------------------------------------------------------------
def naive_pcm_input(cam: np.ndarray) -> np.ndarray:
    """Per image, class, pixel loops of the official normalisation (bg = last channel)."""
    n, c, h, w = cam.shape
    out = np.zeros_like(cam)
    for b in range(n):
        relu = np.maximum(cam[b], 0)
        for k in range(c):
            peak = relu[k].max() + 1e-5
            out[b, k] = np.maximum(relu[k] - 1e-5, 0) / peak
        for y in range(h):
            for x in range(w):
                fg = out[b, :-1, y, x].copy()
                out[b, -1, y, x] = 1 - fg.max()
                out[b, :-1, y, x] = np.where(fg < fg.max(), 0, fg)
    return out


def test_pcm_cam_input_matches_loops():
    cam = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3
    cam[0, 1, 0, 0] = cam[0, 2, 0, 0] = 50.0  # a tie keeps both classes
    got = pcm_cam_input(cam)
    np.testing.assert_allclose(got.numpy(), naive_pcm_input(cam.numpy()), rtol=1e-12, atol=1e-12)
    assert got[0, 1, 0, 0] > 0 and got[0, 2, 0, 0] > 0


def test_pcm_affinity_and_refined_cam_match_loops():
    torch.manual_seed(3)
    pcm = PixelCorrelation(6, 10).double()
    n, h, w = 2, 3, 4
    img = torch.randn(n, 3, 21, 29, dtype=torch.float64)
    c4, c5 = torch.randn(n, 6, h, w, dtype=torch.float64), torch.randn(n, 10, h, w, dtype=torch.float64)
    cam = torch.randn(n, 4, h, w, dtype=torch.float64)
    with torch.no_grad():
        aff = pcm.affinity(img, c4, c5)
        cam_rv = pcm(cam, img, c4, c5)
        small = F.interpolate(img, (h, w), mode="bilinear", align_corners=True)
        feats = torch.cat([small, F.relu(F.conv2d(c4, pcm.conv4_proj.weight)),
                           F.relu(F.conv2d(c5, pcm.conv5_proj.weight))], 1)
        f = F.conv2d(feats, pcm.fuse.weight).flatten(2).numpy()
    cam_in = naive_pcm_input(cam.numpy()).reshape(n, 4, h * w)
    for b in range(n):
        vec = [f[b, :, i] / (np.linalg.norm(f[b, :, i]) + 1e-5) for i in range(h * w)]
        raw = np.array([[max(0.0, float(vec[i] @ vec[j])) for j in range(h * w)] for i in range(h * w)])
        want = raw / (raw.sum(axis=0, keepdims=True) + 1e-5)  # columns normalised
        np.testing.assert_allclose(aff[b].numpy(), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cam_rv[b].reshape(4, -1).numpy(), cam_in[b] @ want, rtol=1e-10, atol=1e-12)
    # invariant: every column sums to 1 (up to the +1e-5 guard), rows need not
    col = aff.sum(dim=1)
    torch.testing.assert_close(col, torch.ones_like(col), rtol=0, atol=1e-4)
    assert (aff >= 0).all()


def test_pcm_trains_only_its_own_layers():
    net = mini_net().train()
    out = net(torch.randn(1, 3, 32, 32))
    out["cam_rv"].sum().backward()
    assert net.pcm.fuse.weight.grad is not None and net.pcm.fuse.weight.grad.abs().sum() > 0
    assert net.pcm.conv4_proj.weight.grad.abs().sum() > 0
    assert net.cam_head.weight.grad is None  # the CAM enters detached
    assert all(p.grad is None for p in net.backbone.parameters())  # conv4/conv5 detached


def test_pcm_affinity_stays_fp32_under_bf16_autocast():
    torch.manual_seed(4)
    pcm = PixelCorrelation(6, 10)
    img, c4, c5 = torch.randn(1, 3, 64, 64), torch.randn(1, 6, 12, 12), torch.randn(1, 10, 12, 12)
    cam = torch.randn(1, 4, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aff = pcm.affinity(img, c4, c5)
        cam_rv = pcm(cam.bfloat16(), img, c4, c5)
    assert aff.dtype == torch.float32 and cam_rv.dtype == torch.bfloat16
    col = aff.sum(dim=1)
    torch.testing.assert_close(col, torch.ones_like(col), rtol=0, atol=1e-4)


def test_width_div_config_builds_a_narrow_resnet38_with_stride_8():
    from hsc_fast.config import ModelConfig
    from hsc_fast.models import build_cam_model
    net = build_cam_model(ModelConfig(backbone="resnet38", width_div=16, allow_random_init=True)).eval()
    assert net.backbone.out_channels["conv6"] == 4096 // 16
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 72))
    assert out["cam"].shape == (1, 21, 8, 9)
    assert out["feat_psc"].shape[1] == 128 and out["feat_rsc"].shape[1] == 256
