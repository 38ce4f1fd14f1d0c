"""The synthetic VOC-like generator: determinism, real formats (read back with hsc_fast.data.voc), and
the properties that make it a useful WSSS test bed (part-only class textures, class/scene context)."""
import numpy as np
import pytest
from PIL import Image

from hsc_fast.classes import VOC

from hsc_fast.data import synth
from hsc_fast.cli import synth as CLI_synth
from hsc_fast.data import voc
from hsc_fast.errors import ConfigError

NUM_FG = VOC.num_fg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth.generate(out, n_train=14, n_val=5, seed=3, size=128)
    return out, summary


def _all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_byte_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.generate(a, n_train=5, n_val=2, seed=11, size=96)
    synth.generate(b, n_train=5, n_val=2, seed=11, size=96)
    files_a, files_b = _all_files(a), _all_files(b)
    assert len(files_a) > 20 and files_a.keys() == files_b.keys()
    assert [k for k in files_a if files_a[k] != files_b[k]] == []
    # Another seed gives other images.
    synth.generate(c, n_train=5, n_val=2, seed=12, size=96)
    files_c = _all_files(c)
    jpgs = [k for k in files_a if k.endswith(".jpg") and k in files_c]
    assert jpgs and all(files_a[k] != files_c[k] for k in jpgs)


def test_image_depends_only_on_seed_and_id():
    rgb1, mask1, sal1 = synth.make_image(synth.image_rng(4, "2100_000007"), 96)
    rgb2, mask2, sal2 = synth.make_image(synth.image_rng(4, "2100_000007"), 96)
    assert np.array_equal(rgb1, rgb2) and np.array_equal(mask1, mask2) and np.array_equal(sal1, sal2)
    rgb3, _, _ = synth.make_image(synth.image_rng(4, "2100_000008"), 96)
    assert not np.array_equal(rgb1, rgb3)


def test_splits_and_lists(dataset):
    out, summary = dataset
    lists = out / "VOC2012/ImageSets/Segmentation"
    train_aug = voc.read_id_list(lists / "train_aug.txt")
    train = voc.read_id_list(lists / "train.txt")
    val = voc.read_id_list(lists / "val.txt")
    sbd = sorted(p.stem for p in (out / "SBD/cls").glob("*.mat"))
    assert len(train_aug) == 14 and len(val) == 5
    assert len(sbd) == round(14 * 0.3) == summary["sbd"]
    assert sorted(train + sbd) == sorted(train_aug) and not set(train) & set(sbd)
    assert not set(val) & set(train_aug)
    assert all(len(i) == 11 and i[4] == "_" for i in train_aug + val)  # VOC-like ids


def test_voc_files_are_consistent(dataset):
    out, _ = dataset
    labels = voc.load_cls_labels(out / "cls_labels.npy")
    raw = np.load(out / "cls_labels.npy", allow_pickle=True).item()  # our own file: IRN int keys
    assert all(isinstance(k, int) for k in raw)
    lists = out / "VOC2012/ImageSets/Segmentation"
    voc_ids = voc.read_id_list(lists / "train.txt") + voc.read_id_list(lists / "val.txt")
    assert set(labels) == set(voc.read_id_list(lists / "train_aug.txt")) | set(voc.read_id_list(lists / "val.txt"))
    for image_id in voc_ids:
        with Image.open(out / f"VOC2012/JPEGImages/{image_id}.jpg") as im:
            assert im.mode == "RGB" and im.size == (128, 128)
        mask = voc.read_label_png(out / f"VOC2012/SegmentationClass/{image_id}.png")
        assert mask.shape == (128, 128)
        assert (mask == 255).any(), "VOC masks carry a 255 band on boundaries"
        classes = voc.classes_in_mask(mask)
        assert classes and voc.parse_voc_xml(out / f"VOC2012/Annotations/{image_id}.xml") == classes
        assert voc.multihot_to_classes(labels[image_id]) == classes
        sal = np.asarray(Image.open(out / f"SaliencyMaps/{image_id}.png"))
        assert sal.dtype == np.uint8 and sal.shape == (128, 128)
        fg, bg = (mask > 0) & (mask < 255), mask == 0
        assert sal[fg].mean() > sal[bg].mean() + 60  # a foreground probability, if a noisy one


def test_sbd_ids_only_in_sbd(dataset):
    out, _ = dataset
    labels = voc.load_cls_labels(out / "cls_labels.npy")
    sbd = sorted(p.stem for p in (out / "SBD/cls").glob("*.mat"))
    assert sbd
    for image_id in sbd:
        seg = voc.read_sbd_mat(out / f"SBD/cls/{image_id}.mat")
        assert seg.shape == (128, 128) and seg.max() <= NUM_FG  # SBD has no ignore band
        assert voc.multihot_to_classes(labels[image_id]) == voc.classes_in_mask(seg)
        assert (out / f"SBD/img/{image_id}.jpg").is_file()
        assert (out / f"SaliencyMaps/{image_id}.png").is_file()
        for missing in (f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png",
                        f"Annotations/{image_id}.xml"):
            assert not (out / "VOC2012" / missing).exists()


def test_ignore_band_separates_regions():
    for i in range(6):
        scene = synth.render_scene(np.random.default_rng(100 + i), 128)
        mask, seg = scene.mask, scene.seg
        known = mask != 255
        assert np.array_equal(mask[known], seg[known])
        # No two different labels touch: the band lies between them.
        for a, b in ((mask[:, 1:], mask[:, :-1]), (mask[1:, :], mask[:-1, :])):
            both = (a != 255) & (b != 255)
            assert np.all(a[both] == b[both])
        # The band is narrow (at most 2 px from a label change of the unbanded mask).
        change = np.zeros(seg.shape, bool)
        change[:, 1:] |= seg[:, 1:] != seg[:, :-1]
        change[1:, :] |= seg[1:, :] != seg[:-1, :]
        near = synth._dilate(change, 3)
        assert np.all(near[mask == 255])
        assert 0 < (mask == 255).mean() < 0.25


def test_make_image_api():
    rgb, mask, sal = synth.make_image(np.random.default_rng(0), 80)
    assert rgb.shape == (80, 80, 3) and rgb.dtype == np.uint8
    assert mask.shape == sal.shape == (80, 80) and mask.dtype == sal.dtype == np.uint8
    assert set(np.unique(mask)) <= set(range(NUM_FG + 1)) | {255}
    assert 1 <= len(voc.classes_in_mask(mask)) <= 3


def test_class_texture_covers_only_part_of_each_object():
    u, v = np.meshgrid(np.linspace(-1.8, 1.8, 181), np.linspace(-1.8, 1.8, 181))
    for c in range(1, NUM_FG + 1):
        whole, part = synth._object_regions(synth.CLASS_SPECS[c], u, v)
        frac = (part & whole).sum() / whole.sum()
        assert 0.08 < frac < 0.7, (c, frac)


def test_backgrounds_correlate_with_classes():
    typical = {"sky": {1, 3}, "water": {4}, "grass": {10, 13, 17}}
    scenes, contains = [], []
    for i in range(200):
        s = synth.render_scene(np.random.default_rng(1000 + i), 96)
        scenes.append(s.scene)
        contains.append(set(voc.classes_in_mask(s.seg)))
    for scene, classes in typical.items():
        with_cls = [sc == scene for sc, cl in zip(scenes, contains) if cl & classes]
        without = [sc == scene for sc, cl in zip(scenes, contains) if not cl & classes]
        assert len(with_cls) >= 8
        assert np.mean(with_cls) > 0.4 and np.mean(with_cls) > 3 * np.mean(without), scene


def test_cli_and_bad_arguments(tmp_path, capsys):
    assert CLI_synth.main(["--out", str(tmp_path / "d"), "--n-train", "2", "--n-val", "1", "--seed", "0",
                       "--size", "64"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert voc.read_id_list(tmp_path / "d/VOC2012/ImageSets/Segmentation/val.txt") == ["2101_000001"]
    assert CLI_synth.main(["--out", str(tmp_path / "e"), "--n-train", "0", "--n-val", "1"]) == 2
    with pytest.raises(ConfigError, match="size"):
        synth.generate(tmp_path / "f", 2, 1, 0, size=16)
