"""SynthNet pretraining (hsc_fast.engine.pretrain): its images, schedule, weight plumbing and a tiny run
whose output loads into the CAM network and DeepLab exactly like an ImageNet file."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_fast.engine import pretrain as PT
from hsc_fast.config import PretrainConfig, load_config
from hsc_fast.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_examples_are_single_objects_of_balanced_classes_and_deterministic():
    from hsc_fast.data.synth import image_rng, render_scene
    for index in (0, 7, 19, 20, 41):
        rgb, cls = PT.render_example(5, index, 100)
        assert cls == index % 20 and rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8
        scene = render_scene(image_rng(5, PT.image_id(index)), 100, classes=[cls + 1])
        assert [c for c, _, _ in scene.instances] == [cls + 1]          # one object, the labelled class
        assert set(np.unique(scene.seg)) == {0, cls + 1}
        assert np.array_equal(rgb, scene.rgb)                           # same id -> same picture
    assert not np.array_equal(PT.render_example(5, 3, 64)[0], PT.render_example(6, 3, 64)[0])
    # small sizes: rendered at MIN_RENDER and shrunk, so every class (thin bicycle rings too) renders
    small = [PT.render_example(5, i, 32) for i in range(60)]
    assert all(rgb.shape == (32, 32, 3) for rgb, _ in small)
    assert [c for _, c in small] == [i % 20 for i in range(60)]


def test_image_ids_never_meet_the_wsss_set_or_each_other():
    from hsc_fast.data.synth import TRAIN_YEAR, VAL_YEAR
    assert PT.ID_YEAR not in (TRAIN_YEAR, VAL_YEAR)
    train = {PT.image_id(i) for i in PT.rank_share(500, 0, 1)}
    val = {PT.image_id(i) for i in PT.rank_share(100, 0, 1, PT.VAL_OFFSET)}
    assert len(train) == 500 and len(val) == 100 and not train & val


def test_rank_shares_partition_the_indices():
    shares = [list(PT.rank_share(11, r, 3, offset=100)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(100, 111))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_lr_warms_up_linearly_then_follows_a_cosine_to_zero():
    pc = PretrainConfig(lr=0.2, warmup_steps=10, steps=110)
    assert PT.lr_at(0, pc) == pytest.approx(0.02) and PT.lr_at(9, pc) == pytest.approx(0.2)
    assert PT.lr_at(10, pc) == pytest.approx(0.2)
    assert PT.lr_at(60, pc) == pytest.approx(0.1)                     # half way: half the peak
    assert PT.lr_at(110, pc) == pytest.approx(0.0, abs=1e-12)
    values = [PT.lr_at(s, pc) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_augment_is_a_flip_and_shift_of_the_batch():
    import torch.nn.functional as F
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        out = PT.augment(x, gen, pad=2)
        found = [(flip, dy, dx) for flip in (False, True) for dy in range(5) for dx in range(5)
                 if torch.equal(out, F.pad(x.flip(3) if flip else x, (2, 2, 2, 2), mode="reflect")[..., dy:dy + 8, dx:dx + 8])]
        assert len(found) == 1, found                                   # exactly one flip+shift explains it
        seen.add(found[0])
    assert {f for f, _, _ in seen} == {False, True} and len(seen) > 10
    assert torch.equal(PT.augment(x, torch.Generator().manual_seed(1), pad=0).sum(), x.sum())


def test_batch_is_global_and_must_split_evenly():
    cfg = load_config("demo_synthnet", _tiny_overrides() + ["pretrain.batch_size=9"])
    with pytest.raises(ConfigError, match="pretrain.batch_size=9"):
        PT.train_classifier(cfg, "resnet18", rank=0, world=2, progress=False, log=lambda *_: None)


def test_rank_sharing_mode():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert PT.sharing("auto", cpu, 2) == "main" and PT.sharing("auto", gpu, 8) == "all"
    assert PT.sharing("all", cpu, 2) == "all" and PT.sharing("main", gpu, 2) == "main"
    assert PT.sharing("main", cpu, 1) == "all"                         # one rank: nothing to share


def test_precision_choice():
    cpu = torch.device("cpu")
    assert PT.use_bf16("fp32", cpu) is False and PT.use_bf16("bf16", cpu) is True
    assert PT.use_bf16("auto", cpu) is False   # fp32 on every CPU model, AMX or not (issue 26)
    with pytest.raises(ConfigError, match="pretrain.precision"):
        load_config("demo_synthnet", ["pretrain.precision=fp8"])
    with pytest.raises(ConfigError, match="pretrain.steps"):
        load_config("demo_synthnet", ["pretrain.steps=0"])


def test_fill_weights_points_empty_weights_at_the_run_and_nothing_else(tmp_path):
    cfg = load_config("demo_synthnet")
    assert cfg.pretrain.enabled and cfg.model.weights == "" and cfg.deeplab.weights == ""
    assert PT.fill_weights(cfg, tmp_path) == ["model.weights", "deeplab.weights"]
    expected = str(tmp_path / "pretrain" / "synthnet_resnet18.pth")
    assert cfg.model.weights == cfg.deeplab.weights == expected
    assert PT.archs_to_train(cfg, tmp_path) == ["resnet18"]             # one file for both
    given = load_config("demo_synthnet", ["model.weights=/w/imagenet.pth", "deeplab.backbone=resnet50"])
    assert PT.fill_weights(given, tmp_path) == ["deeplab.weights"]
    assert given.model.weights == "/w/imagenet.pth" and PT.archs_to_train(given, tmp_path) == ["resnet50"]
    off = load_config("demo_synthnet", ["pretrain.enabled=false"])
    assert PT.fill_weights(off, tmp_path) == [] and off.model.weights == ""
    r38 = load_config("hsc_eps_official", ["pretrain.enabled=true", "model.weights=", "deeplab.weights=",
                                          "deeplab.backbone=resnet101"])  # SynthNet trains torchvision ResNets
    assert PT.fill_weights(r38, tmp_path) == ["deeplab.weights"] and r38.model.weights == ""
    with pytest.raises(ConfigError, match="ResNet-38"):
        PT.check_arch("resnet38")


def _tiny_overrides():
    return ["pretrain.images=60", "pretrain.val_images=20", "pretrain.size=32", "pretrain.steps=6",
            "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.log_every=2", "pretrain.precision=fp32"]


def test_tiny_pretraining_writes_weights_that_load_like_imagenet_files(tmp_path):
    from hsc_fast.models.cam_net import build_cam_model
    from hsc_fast.models.deeplab import build_deeplab
    cfg = load_config("demo_synthnet", _tiny_overrides())
    out = tmp_path / "synthnet_resnet18.pth"
    summary = PT.pretrain(cfg, "resnet18", out, progress=False, log=lambda *_: None)
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["fc.weight"].shape == (20, 512) and all(torch.isfinite(v.float()).all() for v in state.values())
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["images_seen"] == 6 * 8 and meta["val_images"] == 20 and 0.0 <= meta["val_top1"] <= 100.0
    assert meta == json.loads(json.dumps(summary))
    rows = (tmp_path / "synthnet_resnet18_metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3                                          # header + every 2nd of 6 steps
    cfg.model.weights = str(out)
    net = build_cam_model(cfg.model)
    assert sorted(net.pretrained_report.ignored) == ["fc.bias", "fc.weight"]
    assert torch.equal(net.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    cfg.deeplab.weights = str(out)
    dl = build_deeplab(cfg.deeplab)
    assert torch.equal(dl.backbone[4][0].conv1.weight, state["layer1.0.conv1.weight"])  # [4] = layer1


def test_pretraining_fits_its_training_images(tmp_path):
    """A few dozen steps at 32 px already pull the training loss far below chance (ln 20)."""
    cfg = load_config("demo_synthnet", _tiny_overrides() + ["pretrain.images=200", "pretrain.steps=40",
                                                   "pretrain.batch_size=32", "pretrain.warmup_steps=5",
                                                   "pretrain.log_every=10", "pretrain.lr=0.01"])
    PT.pretrain(cfg, "resnet18", tmp_path / "w.pth", progress=False, log=lambda *_: None)
    from hsc_fast.engine.runlog import read_metrics
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "w_metrics.csv")]
    assert len(losses) == 4 and losses[-1] < 0.75 * math.log(20) and losses[-1] < losses[0] - 0.5, losses
