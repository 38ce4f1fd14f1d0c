"""Class sets (issue 18): the dataset's description replaces the VOC constants."""
import json

import numpy as np
import pytest

from hsc_fast import classes as C
from hsc_fast.config import apply_class_set, load_config, run_class_set
from hsc_fast.errors import ConfigError, DataError


def test_builtin_sets_and_their_derived_sizes():
    assert (C.VOC.num_fg, C.VOC.num_classes, C.VOC.bg_index) == (20, 21, 20)
    assert (C.COCO.num_fg, C.COCO.num_classes, C.COCO.bg_index) == (80, 81, 80)
    assert C.COCO.label_names[1] == "person" and C.COCO.label_names[80] == "toothbrush"
    assert C.synthetic(20) is C.VOC
    assert C.synthetic(7).names == tuple(f"synth{c:02d}" for c in range(1, 8))
    assert C.resolve("synthetic:80").num_classes == 81 and C.resolve("coco") is C.COCO


def test_palette_is_the_voc_bit_map_for_all_indices():
    assert C.PALETTE.shape == (256, 3)
    assert C.PALETTE[1].tolist() == [128, 0, 0] and C.PALETTE[15].tolist() == [192, 128, 128]
    assert C.PALETTE[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in C.PALETTE[:81]}) == 81  # COCO's 81 labels get distinct colours


def test_json_round_trip_and_errors_name_the_file(tmp_path):
    custom = C.ClassSet("mine", ("cat", "dog", "cow"))
    path = tmp_path / "classes.json"
    C.save(path, custom)
    assert C.load(path) == custom and C.resolve(str(path)) == custom
    index = {"shards": [], "classes": custom.to_json()}
    assert C.from_index(index, "x") == custom
    assert C.from_index({"shards": []}, "x") is C.VOC  # indexes from before the key
    (tmp_path / "bad.json").write_text(json.dumps({"names": ["a", "a"]}))
    with pytest.raises(DataError, match="bad.json.*distinct"):
        C.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="data.classes.*synthetic:K"):
        C.resolve("cityscapes")
    with pytest.raises(DataError, match="1..254"):
        C.ClassSet("big", tuple(f"c{i}" for i in range(255)))


def test_a_run_records_its_class_set_and_refuses_contradictions():
    cfg = load_config("seam")
    apply_class_set(cfg, C.COCO)
    assert (cfg.data.classes, cfg.model.num_classes) == ("coco", 81)
    assert run_class_set(cfg) is C.COCO
    coco = load_config("hsc_coco_seam")
    with pytest.raises(ConfigError, match="data.classes.*coco.*voc"):
        apply_class_set(coco, C.VOC)
    fixed = load_config("seam", ["model.num_classes=21"])
    with pytest.raises(ConfigError, match="model.num_classes.*81"):
        apply_class_set(fixed, C.COCO)
    assert run_class_set(load_config("seam")) is C.VOC  # unresolved 'auto' (configs from before the key)


def test_coco_presets_differ_from_the_official_recipe_only_in_data():
    official, coco, eps = load_config("hsc_seam"), load_config("hsc_coco_seam"), load_config("hsc_coco_eps")
    assert coco.data.classes == "coco" and eps.loss.method == "hsc_eps" and coco.loss.method == "hsc_seam"
    for section in ("model", "optim", "train"):
        assert getattr(coco, section) == getattr(official, section), section
    assert coco.loss == official.loss and coco.data.crop_size == official.data.crop_size == 448


def test_synthetic_set_with_80_classes_keeps_the_first_20_and_reads_back(tmp_path):
    from hsc_fast.data.folder import FolderDataset
    from hsc_fast.data.synth import CLASS_SPECS, class_spec, generate
    assert all(class_spec(c) is CLASS_SPECS[c] for c in range(1, 21))
    assert class_spec(57) == class_spec(57) and class_spec(57) != class_spec(37)
    generate(tmp_path, 40, 0, 3, 64, num_fg=80)
    ds = FolderDataset(tmp_path / "VOC2012", tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt",
                       tmp_path / "SBD", tmp_path / "cls_labels.npy")
    assert ds.class_set == C.synthetic(80)
    seen = set()
    for i in range(len(ds)):
        _, _, label, mask = ds[i]
        assert label.shape == (80,)
        present = {int(v) for v in np.unique(mask)} - {0, 255}
        assert present == set((np.flatnonzero(label) + 1).tolist())  # labels agree with the masks
        seen |= present
    assert max(seen) > 20


def test_eps_without_saliency_maps_stops_before_any_work(tmp_path):
    from hsc_fast.data.synth import generate
    from hsc_fast.engine.cam_trainer import check_saliency_source
    generate(tmp_path, 4, 0, 0, 64)
    lst = tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt"
    cfg = load_config("hsc_coco_eps", [f"data.train={tmp_path / 'VOC2012'}", f"data.train_list={lst}",
                                       f"data.sbd_root={tmp_path / 'SBD'}"])
    with pytest.raises(ConfigError, match="loss.method.*hsc_eps.*needs saliency maps.*COCO"):
        check_saliency_source(cfg)
    cfg.data.saliency_root = str(tmp_path / "SaliencyMaps")
    check_saliency_source(cfg)  # with the maps: accepted
    check_saliency_source(load_config("hsc_coco_seam", [f"data.train={tmp_path / 'VOC2012'}",
                                                         f"data.train_list={lst}"]))  # SEAM needs none
