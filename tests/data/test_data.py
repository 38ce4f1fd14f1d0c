"""hsc_fast.data: two-view transform, training loader (determinism, resume, equal batch counts,
corrupt samples), evaluation split across ranks x workers, folder dataset vs shards."""
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hsc_fast.data.loader as loader_mod
from hsc_fast.config import DataConfig
from hsc_fast.data import (FolderDataset, TwoViewTransform, build_eval_dataset, build_train_loader, collate,
                           consumed_batches, denormalize, finish_batch, make_view2)
from hsc_fast.data.transforms import jitter, rotate_hue
from hsc_fast.data.shard import shard_dataset, write_tar
from hsc_fast.data.synth import generate
from hsc_fast.data.voc import load_cls_labels, read_label_png

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N_TRAIN = 12


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic VOC/SBD tree (with saliency) and its shards: 12 train ids in 6 shards."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, N_TRAIN, 0, seed=3, size=64)
    lst = root / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt"
    common = dict(sbd_root=root / "SBD", cls_labels=root / "cls_labels.npy", saliency_root=root / "SaliencyMaps")
    index = shard_dataset(root / "VOC2012", lst, root / "shards", shard_size=2, progress=False, **common)
    one = shard_dataset(root / "VOC2012", lst, root / "one_shard", shard_size=100, progress=False, **common)
    return {"root": root, "list": lst, "shards": root / "shards", "one": root / "one_shard", "index": index,
            "ids": [i for e in index["shards"] for i in e["ids"]], "common": common, "n_one": len(one["shards"])}


def cfg_for(source, **kw):
    base = dict(train=str(source), batch_size=2, workers=0, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


# --------------------------------------------------------------------------------------- transform
def test_transform_shapes_ranges_and_padding(fixtures_dir):
    image = Image.open(fixtures_dir / "voc" / "JPEGImages" / "2007_000032.jpg").convert("RGB")  # 500x281
    sal = Image.fromarray(np.full((281, 500), 255, np.uint8), "L")
    t = TwoViewTransform()
    lo = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1)
    for k in range(6):
        out = t(image, np.random.default_rng(k), sal)
        assert out["img"].shape == (3, 448, 448) and out["img"].dtype == torch.uint8
        valid = out["valid"][0]
        assert (out["img"][:, ~valid] == 0).all() and (out["sal"][:, ~valid] == 0).all()
        # long side L in [448, 768] -> width min(L, 448); height round(281 L / 500) (< 448 for L < 797)
        rows, cols = valid.any(1).sum().item(), valid.any(0).sum().item()
        assert cols == 448 and round(281 * 448 / 500) <= rows <= round(281 * 768 / 500)
        assert valid.sum().item() == rows * cols  # the valid region is one rectangle
        batch = finish_batch(collate([dict(out, key="x", label=torch.zeros(20))]), MEAN, STD)
        img, s = batch["img"][0], batch["sal"][0, 0]
        assert img.dtype == torch.float32 and s.dtype == torch.float32
        inside = img[:, valid]
        assert (inside >= lo - 1e-5).all() and (inside <= hi + 1e-5).all()
        assert (img[:, ~valid] == 0).all()  # padding is 0 after normalisation, as the reference
        assert torch.allclose(s[valid], torch.ones(1)) and (s[~valid] == 0).all()
    a, b = t(image, np.random.default_rng(7)), t(image, np.random.default_rng(7))
    assert torch.equal(a["img"], b["img"])  # all randomness comes from the rng


def _authors_view(image: Image.Image, saliency: Image.Image, long_side: int, flip: bool, start, offset, crop: int):
    """HSC dataset.py / imutils.py re-derived for given draws (no jitter): whole-image resize to the
    long side (short side int(round(short * L / long)), PIL bicubic), saliency likewise as an RGB
    image, flip, normalise (float64 -> float32) and /255., crop into zero float32 canvases, saliency
    averaged over its channels. Returns (3, S, S) image and (1, S, S) saliency tensors."""
    w, h = image.size
    size = (int(round(w * long_side / h)), long_side) if w < h else (long_side, int(round(h * long_side / w)))
    img, sal = image.resize(size, Image.BICUBIC), saliency.convert("RGB").resize(size, Image.BICUBIC)
    if flip:
        img, sal = img.transpose(Image.FLIP_LEFT_RIGHT), sal.transpose(Image.FLIP_LEFT_RIGHT)
    img = _authors_normalisation(np.asarray(img)).transpose(1, 2, 0)
    sal = np.asarray(sal) / 255.
    (x, y), (ox, oy) = start, offset
    ch, cw = min(crop, size[1]), min(crop, size[0])
    canvas, canvas_sal = np.zeros((crop, crop, 3), np.float32), np.zeros((crop, crop, 3), np.float32)
    canvas[oy:oy + ch, ox:ox + cw] = img[y:y + ch, x:x + cw]
    canvas_sal[oy:oy + ch, ox:ox + cw] = sal[y:y + ch, x:x + cw]
    return torch.from_numpy(canvas.transpose(2, 0, 1)), torch.from_numpy(canvas_sal.transpose(2, 0, 1)).mean(0, keepdim=True)


@pytest.mark.parametrize("photo", ["2007_000032", "2007_000033"])
@pytest.mark.parametrize("portrait", [False, True])
def test_view1_equals_the_authors_whole_resize_then_crop(fixtures_dir, photo, portrait):
    image = Image.open(fixtures_dir / "voc" / "JPEGImages" / f"{photo}.jpg").convert("RGB")
    if portrait:
        image = image.transpose(Image.TRANSPOSE)
    grey = np.asarray(image.convert("L"))
    saliency = Image.fromarray(np.clip(grey.astype(np.int16) * 2 - 100, 0, 255).astype(np.uint8), "L")
    t = TwoViewTransform(crop_size=448, color_jitter=(0, 0, 0, 0))   # official: resize_mode whole
    assert t.resize_mode == "whole"
    flips = set()
    for k in range(6):
        rng = np.random.default_rng(k)
        draw = t.draw(image.width, image.height, rng)
        flips.add(draw.flip)
        out = finish_batch(collate([dict(t.apply(image, draw, rng, saliency), key="x", label=torch.zeros(20))]),
                           MEAN, STD)
        ref_img, ref_sal = _authors_view(image, saliency, draw.long_side, draw.flip, draw.start, draw.offset, 448)
        assert torch.equal(out["img"][0], ref_img)                      # bit for bit
        assert torch.allclose(out["sal"][0], ref_sal, rtol=0, atol=1e-7)  # their 3-channel mean: fp32 round-off
    assert flips == {False, True}


def test_window_resize_mode_is_not_the_same_pixels(fixtures_dir):
    """The faster window resize samples a different grid: same draws, a few grey levels apart."""
    image = Image.open(fixtures_dir / "voc" / "JPEGImages" / "2007_000033.jpg").convert("RGB").transpose(Image.TRANSPOSE)
    whole = TwoViewTransform(color_jitter=(0, 0, 0, 0))
    window = TwoViewTransform(color_jitter=(0, 0, 0, 0), resize_mode="window")
    rng = np.random.default_rng(3)
    draw = whole.draw(image.width, image.height, rng)
    a, b = (m.apply(image, draw, rng)["img"].int() for m in (whole, window))
    diff = (a - b).abs()[:, whole.apply(image, draw, rng)["valid"][0]]
    assert 0 < diff.max() <= 20 and diff.float().mean() < 1.0


def test_resized_size_rounds_as_the_authors():
    from hsc_fast.data.transforms import resized_size
    for w in range(1, 400, 7):
        for h in range(1, 400, 11):
            for long_side in (448, 523, 768):
                ref = (int(round(w * long_side / h)), long_side) if w < h else (long_side, int(round(h * long_side / w)))
                assert resized_size(w, h, long_side) == (max(1, ref[0]), max(1, ref[1]))
    # at exact halves the order of the operations matters: 201 * (448 / 384) = 234.50000000000003 rounds
    # up, the authors' 201 * 448 / 384 = 234.5 rounds to even (the old rule gave 235)
    assert resized_size(384, 201, 448) == (448, 234) and round(201 * (448 / 384)) == 235


def test_resize_mode_is_a_checked_config_key():
    from hsc_fast.config import RunConfig, validate
    from hsc_fast.errors import ConfigError
    cfg = RunConfig()
    cfg.data.resize_mode = "crop"
    with pytest.raises(ConfigError, match="data.resize_mode"):
        validate(cfg)
    with pytest.raises(ConfigError, match="data.resize_mode"):
        TwoViewTransform(resize_mode="crop")


def test_jitter_matches_torchvision_semantics(fixtures_dir):
    import torchvision.transforms.functional as TF
    image = Image.open(fixtures_dir / "voc" / "JPEGImages" / "2007_000032.jpg").convert("RGB")
    ref = np.asarray(image, np.int16)
    diff = lambda a, b: np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()  # noqa: E731
    for f in (0.05, -0.05):  # hue: same direction as torchvision's HSV shift, a few grey levels apart
        assert diff(rotate_hue(image, f), TF.adjust_hue(image, f)) < 4.0
        assert diff(rotate_hue(image, -f), TF.adjust_hue(image, f)) > 2 * diff(rotate_hue(image, f), TF.adjust_hue(image, f))
    assert diff(rotate_hue(image, 0.0), ref) < 0.01
    # factors drawn in torchvision's ranges; each op applied once (random order)
    calls = []
    b0, c0 = TF.adjust_brightness, TF.adjust_contrast
    try:
        TF.adjust_brightness = lambda im, f: calls.append(("b", f)) or b0(im, f)
        TF.adjust_contrast = lambda im, f: calls.append(("c", f)) or c0(im, f)
        for k in range(20):
            jitter(image, (0.3, 0.3, 0.0, 0.0), np.random.default_rng(k))
    finally:
        TF.adjust_brightness, TF.adjust_contrast = b0, c0
    assert len(calls) == 40 and all(0.7 <= f <= 1.3 for _, f in calls)
    assert {tuple(n for n, _ in calls[i:i + 2]) for i in range(0, 40, 2)} == {("b", "c"), ("c", "b")}


def test_make_view2_and_denormalize():
    img = torch.randn(2, 3, 448, 448)
    v2 = make_view2(img, 128)
    assert v2.shape == (2, 3, 128, 128)
    assert torch.allclose(v2, F.interpolate(img, size=(128, 128), mode="bilinear", align_corners=True))
    for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:  # align_corners keeps the corner pixels
        assert torch.allclose(v2[..., y, x], img[..., y, x])
    u8 = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    norm = (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(denormalize(norm, MEAN, STD), u8)


def _authors_normalisation(rgb: np.ndarray) -> np.ndarray:
    """HSC inference.py / imutils.Normalize re-derived: per channel (x / 255. - mean) / std in numpy
    float64, stored into float32; (3, H, W)."""
    out = np.empty(rgb.shape, np.float32)
    for c in range(3):
        out[..., c] = (rgb[..., c] / 255. - MEAN[c]) / STD[c]
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("photo", ["2007_000032", "2007_000033"])
def test_normalisation_is_the_authors_float64_one_bit_for_bit(fixtures_dir, photo):
    from hsc_fast.data.seg_set import normalize_image
    from hsc_fast.data.transforms import normalize
    rgb = np.asarray(Image.open(fixtures_dir / "voc" / "JPEGImages" / f"{photo}.jpg").convert("RGB"))
    ref = _authors_normalisation(rgb)
    ours = normalize_image(rgb).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.int32), ref.view(np.int32))
    # the training normaliser (on the device, with the padding mask) gives the same values
    u8 = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    valid = torch.ones(1, 1, *rgb.shape[:2], dtype=torch.bool)
    valid[..., :10, :] = False
    dev = normalize(u8, valid, MEAN, STD)[0].numpy()
    assert np.array_equal(dev[:, 10:].view(np.int32), ref[:, 10:].view(np.int32)) and (dev[:, :10] == 0).all()
    # float32 arithmetic (what both did before) is not the same: the test can tell them apart
    f32 = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    assert not np.array_equal(f32.numpy(), ref)


# ---------------------------------------------------------------------------------- train loader
def test_train_batches_have_the_right_content(synth):
    labels = load_cls_labels(synth["root"] / "cls_labels.npy")
    loader = build_train_loader(cfg_for(synth["shards"]), 0, 1, seed=5)
    batches = list(loader)
    assert len(batches) == len(loader) == N_TRAIN // 2
    for b in batches:
        assert b["img"].shape == (2, 3, 448, 448) and b["sal"].shape == (2, 1, 448, 448)
        assert b["valid"].dtype == torch.bool and 0 <= b["sal"].min() and b["sal"].max() <= 1
        assert b["sal"].max() > 0.5  # synthetic saliency maps have confident foreground
        for key, lab in zip(b["key"], b["label"]):
            assert torch.equal(lab, torch.from_numpy(labels[key]))
    assert loader.skip_counter.count == 0


def test_train_stream_is_deterministic_and_rank_dependent(synth):
    cfg = cfg_for(synth["shards"])
    keys = lambda ld: [b["key"] for b in ld]  # noqa: E731
    a, b = build_train_loader(cfg, 0, 2, seed=1), build_train_loader(cfg, 0, 2, seed=1)
    first = list(a)
    assert [x["key"] for x in first] == keys(b)
    assert torch.equal(first[0]["img"], next(iter(build_train_loader(cfg, 0, 2, seed=1)))["img"])
    assert keys(build_train_loader(cfg, 1, 2, seed=1)) != keys(a)
    brace = str(synth["shards"] / "train_aug-{000000..000005}.tar")  # same shards, same order
    assert keys(build_train_loader(cfg_for(brace), 0, 2, seed=1)) == [x["key"] for x in first]
    a.set_epoch(1)
    assert keys(a) != [x["key"] for x in first]
    assert len(a) == N_TRAIN // 2 // 2  # dataset size / world size / batch size


def test_resume_skips_consumed_batches_in_process(synth):
    cfg = cfg_for(synth["shards"])
    full = list(build_train_loader(cfg, 0, 1, seed=9, epoch=2))
    tail = list(build_train_loader(cfg, 0, 1, seed=9, epoch=2, skip_batches=4))
    assert [b["key"] for b in tail] == [b["key"] for b in full[4:]]
    assert all(torch.equal(x["img"], y["img"]) for x, y in zip(tail, full[4:]))


def test_consumed_batches_round_robin():
    for workers in (1, 2, 3):
        for k in range(8):
            assert sum(consumed_batches(k, w, workers) for w in range(workers)) == k
            assert [consumed_batches(k, w, workers) for w in range(workers)] == \
                [len(range(w, k, workers)) for w in range(workers)]


def test_corrupt_sample_is_skipped_and_counted(synth, tmp_path):
    good = FolderDataset(synth["root"] / "VOC2012", synth["list"], **synth["common"])
    samples = [good.raw_sample(i, with_mask=False) for i in good.ids[:4]]
    samples[1] = dict(samples[1], jpg=samples[1]["jpg"][:200])  # truncated JPEG
    samples[2] = dict(samples[2], **{"cls.json": b"[0, 42]"})  # invalid labels
    write_tar(tmp_path / "bad-000000.tar", samples)
    cfg = cfg_for(tmp_path / "bad-000000.tar", shuffle_buffer=1)
    loader = build_train_loader(cfg, 0, 1, seed=0, epoch_samples=6)
    batches = list(loader)
    assert len(batches) == 3
    seen = {k for b in batches for k in b["key"]}
    assert seen == {samples[0]["__key__"], samples[3]["__key__"]}
    assert loader.skip_counter.count >= 2


def test_nothing_in_a_shard_is_unpickled(synth, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ds = FolderDataset(synth["root"] / "VOC2012", synth["list"], **synth["common"])
    with tarfile.open(tmp_path / "evil-000000.tar", "w") as tf:
        for key in ds.ids[:2]:
            sample = ds.raw_sample(key, with_mask=True)
            sample["pyd"] = pickle.dumps(Evil())
            for name in ("jpg", "cls.json", "seg.png", "sal.png", "pyd"):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(sample[name])
                tf.addfile(info, io.BytesIO(sample[name]))
    list(build_train_loader(cfg_for(tmp_path / "evil-000000.tar"), 0, 1, epoch_samples=4))
    list(build_eval_dataset(str(tmp_path / "evil-000000.tar")))
    assert not marker.exists()


def test_folder_source_trains_and_matches_shards_in_eval(synth):
    cfg = cfg_for(synth["root"] / "VOC2012", train_list=str(synth["list"]), **{
        k: str(v) for k, v in synth["common"].items()})
    batches = list(build_train_loader(cfg, 0, 1, seed=2))
    assert len(batches) == N_TRAIN // 2 and "sal" in batches[0]
    assert sorted(k for b in batches for k in b["key"]) == sorted(synth["ids"])  # one permutation = one pass
    ds = FolderDataset(synth["root"] / "VOC2012", synth["list"], **synth["common"])
    from_shards = {k: (img, lab, m) for k, img, lab, m in build_eval_dataset(synth["shards"])}
    assert len(ds) == len(from_shards) == N_TRAIN
    for i in range(len(ds)):
        key, img, lab, mask = ds[i]
        s_img, s_lab, s_mask = from_shards[key]
        assert np.array_equal(img, s_img) and np.array_equal(lab, s_lab) and np.array_equal(mask, s_mask)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3) and mask.shape == (64, 64)


def test_eval_ids_filter_and_masks(synth):
    want = synth["ids"][3:6]
    got = list(build_eval_dataset(synth["shards"], ids=want))
    assert [k for k, *_ in got] == want
    voc_png = synth["root"] / "VOC2012" / "SegmentationClass"
    for key, _, _, mask in got:
        if (voc_png / f"{key}.png").exists():
            assert np.array_equal(mask, read_label_png(voc_png / f"{key}.png"))


# -------------------------------------------------------------------- rank x worker split, faked
def _fake_workers(monkeypatch, worker, num_workers):
    monkeypatch.setattr(loader_mod, "_worker_slot", lambda: (worker, num_workers))


@pytest.mark.parametrize("source", ["shards", "one", "folder"])
def test_eval_split_is_disjoint_and_complete(synth, monkeypatch, source):
    """2 ranks x 2 workers: each id exactly once, with 6 shards (split by shards), with one shard
    (fewer shards than slots: split by sample index) and from folders."""
    if source == "folder":
        src = FolderDataset(synth["root"] / "VOC2012", synth["list"], **synth["common"])
    else:
        src = synth[source]
    seen = []
    for rank in range(2):
        for worker in range(2):
            _fake_workers(monkeypatch, worker, 2)
            part = [k for k, *_ in build_eval_dataset(src, rank=rank, world_size=2)]
            assert part, f"rank {rank} worker {worker} got nothing"
            seen += part
    assert sorted(seen) == sorted(synth["ids"])


def test_folder_training_split_covers_one_pass_and_feeds_tiny_sets(synth, monkeypatch):
    common = {k: str(v) for k, v in synth["common"].items()}
    cfg = cfg_for(synth["root"] / "VOC2012", train_list=str(synth["list"]), batch_size=1, workers=2,
                  shuffle_buffer=1, **common)
    seen = []
    for rank in range(2):
        ld = build_train_loader(cfg, rank, 2, seed=6)  # 6 samples per rank -> 3 per worker
        for worker in range(2):
            _fake_workers(monkeypatch, worker, 2)
            seen += [k for b in ld._stream() for k in b["key"]]
    assert sorted(seen) == sorted(synth["ids"])  # 4 slots x 3 = one pass, disjoint
    tiny = synth["root"] / "tiny.txt"
    tiny.write_text("".join(f"{i}\n" for i in synth["ids"][:3]))
    cfg.train_list = str(tiny)
    for rank in range(2):
        for worker in range(2):
            _fake_workers(monkeypatch, worker, 2)
            ld = build_train_loader(cfg, rank, 2, seed=0, epoch_samples=4)
            assert sum(len(b["key"]) for b in ld._stream()) == 2  # 3 ids, 4 slots: still fed


def test_train_batch_counts_equal_across_fake_ranks_and_workers(synth, monkeypatch):
    counts = {}
    for rank in range(2):
        ld = build_train_loader(cfg_for(synth["one"], workers=2), rank, 2, seed=0, epoch_samples=7)
        for worker in range(2):
            _fake_workers(monkeypatch, worker, 2)
            counts[rank, worker] = sum(1 for _ in ld._stream())
    assert set(counts.values()) == {2}  # ceil(7 // 2 / 2 workers) per worker, everywhere
