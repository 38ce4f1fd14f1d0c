"""A COCO-format dataset with its own categories (ids 3, 7, 19 with gaps, names not COCO's) goes
shard -> train -> evaluate. The fixture is generated here: 64x64 noise JPEGs with rectangle
polygons, so every expected mask is a numpy rectangle."""
import json

import numpy as np
import pytest
import _faultutil as F
from PIL import Image

from hsc_fast import classes as C
from hsc_fast.cli import evaluate as EV
from hsc_fast.cli.shard import main as shard_main
from hsc_fast.data import samples as S
from hsc_fast.data.voc import write_label_png

SPLIT = "train"
SIZE = 64
# (id, name) in file order (not sorted): sorted ids 3, 7, 19 are classes 1, 2, 3
CATEGORIES = [(19, "weld seam"), (3, "crack"), (7, "rust")]
EXPECTED_NAMES = ("crack", "rust", "weld seam")
LABEL = {3: 1, 7: 2, 19: 3}
# image id -> [(category id, (x0, y0, x1, y1))]; no two boxes of an image overlap
BOXES = {
    1: [(3, (4, 4, 30, 40))],
    2: [(7, (10, 20, 60, 50))],
    3: [(19, (0, 0, 64, 12)), (3, (20, 30, 40, 60))],
    4: [(7, (30, 2, 62, 30)), (19, (2, 40, 50, 62))],
    5: [(3, (8, 8, 56, 56))],
    6: [(19, (16, 16, 48, 48)), (7, (0, 50, 20, 64))],
}


def annotation_json() -> dict:
    images = [{"id": i, "file_name": f"img{i:03d}.jpg", "height": SIZE, "width": SIZE} for i in BOXES]
    anns = []
    for image_id, boxes in BOXES.items():
        for cat, (x0, y0, x1, y1) in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    cats = [{"id": i, "name": n, "supercategory": "defect"} for i, n in CATEGORIES]
    return {"images": images, "annotations": anns, "categories": cats}


def expected_mask(image_id: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    for cat, (x0, y0, x1, y1) in BOXES[image_id]:
        m[y0:y1, x0:x1] = LABEL[cat]
    return m


def write_dataset(root, data: dict):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / SPLIT).mkdir(exist_ok=True)
    rng = np.random.default_rng(11)
    for im in data["images"]:
        mask = expected_mask(im["id"])
        pixels = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8) + (mask[..., None] * 50).astype(np.uint8)
        Image.fromarray(pixels).save(root / SPLIT / im["file_name"], quality=90)
    path = root / "annotations" / f"instances_{SPLIT}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "defects"
    return root, write_dataset(root, annotation_json())


shard_members = F.read_shard_members


def shard(root, out, *extra) -> int:
    return shard_main(["--coco-root", str(root), "--coco-split", SPLIT, "--out", str(out), "--quiet",
                       "--shard-size", "4", *extra])


def test_custom_categories_shard_train_evaluate(dataset, tmp_path, monkeypatch, capsys):
    root, _ = dataset
    shards = tmp_path / "shards"
    assert shard(root, shards) == 0
    index = json.loads((shards / "index.json").read_text())
    custom = C.ClassSet("custom", EXPECTED_NAMES)
    assert index["classes"] == custom.to_json() and index["count"] == len(BOXES)
    assert index["sources"]["category_ids"] == [3, 7, 19]
    assert C.load(shards / C.CLASSES_FILE) == custom
    members = shard_members(shards)
    for image_id, boxes in BOXES.items():
        got = members[f"img{image_id:03d}"]
        np.testing.assert_array_equal(S.decode_mask(got["seg.png"], str(image_id), custom), expected_mask(image_id))
        assert json.loads(got["cls.json"]) == sorted({LABEL[c] for c, _ in boxes})

    # train: a tiny random-init CAM net, 2 steps, on the shards; the run takes K = 3 from the index
    from hsc_fast.config import load_config
    from hsc_fast.engine.session import train
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    run = tmp_path / "run"
    cfg = load_config("demo", [f"data.train={shards}", "data.batch_size=2", "data.workers=0", "data.crop_size=64",
                               "data.resize_long=[64,80]", "data.view2_size=32", "loss.contrast_size=4",
                               "loss.csc_topk=8", "loss.csc_update_topk=4", "loss.psc_topk=1", "loss.crf.iters=2",
                               "train.max_steps=2", "train.save_every=2", "model.allow_random_init=true",
                               "model.weights=", "model.frozen_bn=false", "model.freeze_stem=false"])
    train(cfg, run, progress=False)
    import torch
    state = torch.load(run / "final" / "model.pt", weights_only=True)
    assert state["cam_head.weight"].shape[0] == 4          # K + 1 CAM channels, background last
    assert C.load(run / C.CLASSES_FILE) == custom
    from hsc_fast.config import run_class_set
    assert run_class_set(load_config(str(run / "config.yaml"))) == custom  # later stages resolve it too

    # evaluate: ground truth decoded from the shards, predictions in RUN_DIR/<stage>/<folder>, so
    # the evaluate CLI finds the run's classes.json by default
    gt_dir, pred_dir = tmp_path / "gt" / "SegmentationClass", run / "seeds" / "pseudo_labels"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    for image_id in BOXES:
        gt = expected_mask(image_id)
        pred = gt.copy()
        if image_id == 5:
            pred[gt == 1] = 2                               # crack predicted as rust in one image
        write_label_png(gt_dir / f"img{image_id:03d}.png", gt, custom)
        write_label_png(pred_dir / f"img{image_id:03d}.png", pred, custom)
    out = tmp_path / "eval.json"
    assert EV.main(["--gt", str(gt_dir), "--pred", str(pred_dir), "--json", str(out), "--workers", "0",
                    "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert list(result["iou"]) == ["background", *EXPECTED_NAMES]
    gts = {i: expected_mask(i) for i in BOXES}
    crack = sum(int((g == 1).sum()) for g in gts.values())
    rust = sum(int((g == 2).sum()) for g in gts.values())
    moved = int((gts[5] == 1).sum())
    assert result["iou"]["crack"] == pytest.approx(100 * (crack - moved) / crack)
    assert result["iou"]["rust"] == pytest.approx(100 * rust / (rust + moved))
    assert result["iou"]["weld seam"] == pytest.approx(100.0) and result["iou"]["background"] == pytest.approx(100.0)


def test_classes_override_maps_categories_by_name(dataset, tmp_path):
    """--classes with a classes.json of 4 names in another order: each category gets its name's
    index there; a class no category names stays unused (category id null)."""
    root, _ = dataset
    wanted = C.ClassSet("defects-v2", ("rust", "dent", "weld seam", "crack"))
    spec = tmp_path / "classes.json"
    C.save(spec, wanted)
    out = tmp_path / "shards"
    assert shard(root, out, "--classes", str(spec)) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == wanted.to_json() and index["sources"]["category_ids"] == [7, None, 19, 3]
    relabel = {0: 0, 1: 4, 2: 1, 3: 3}                       # old custom index -> index in `wanted`
    got = S.decode_mask(shard_members(out)["img004"]["seg.png"], "img004", wanted)
    np.testing.assert_array_equal(got, np.vectorize(relabel.get)(expected_mask(4)).astype(np.uint8))
    assert C.load(out / C.CLASSES_FILE) == wanted


def test_override_without_a_used_category_names_the_annotation(dataset, tmp_path, capsys):
    root, path = dataset
    out = tmp_path / "shards"
    assert shard(root, out, "--classes", "voc") == 2      # no VOC class is named crack / rust / weld seam
    err = capsys.readouterr().err
    assert str(path) in err and "'categories'" in err and "'voc'" in err
    spec = tmp_path / "classes.json"
    C.save(spec, C.ClassSet("two", ("crack", "rust")))
    assert shard(root, out, "--classes", str(spec)) == 2  # weld seam (19) is used by images 3, 4, 6
    err = capsys.readouterr().err
    assert str(path) in err and "'category_id' 19" in err and "'weld seam'" in err and "'two'" in err
    assert not out.exists()


def _dup_id(d):
    d["categories"][2]["id"] = 19


def _dup_name(d):
    d["categories"][2]["name"] = "crack"


def _no_name(d):
    del d["categories"][1]["name"]


def _bool_id(d):
    d["categories"][0]["id"] = True


def _empty(d):
    d["categories"] = []


def _background(d):
    d["categories"][0]["name"] = "background"


def _unknown_id(d):
    d["annotations"][1]["category_id"] = 4


@pytest.mark.parametrize("mutate, expected", [
    (_dup_id, ["'categories'[2]", "'id' 19 is used twice", "'categories'[0]"]),
    (_dup_name, ["'categories'[2]", "'name' 'crack' is used twice", "'categories'[1]"]),
    (_no_name, ["'categories'[1]", "'name' is missing"]),
    (_bool_id, ["'categories'[0]", "'id' is True"]),
    (_empty, ["'categories'", "empty list"]),
    (_background, ["'categories'", "'background'"]),
    (_unknown_id, ["'annotations'[1]", "'category_id' 4", "not one of the ids in categories"]),
])
def test_malformed_categories_exit_2_naming_file_and_field(tmp_path, capsys, mutate, expected):
    data = annotation_json()
    mutate(data)
    root = tmp_path / "defects"
    path = write_dataset(root, data)
    out = tmp_path / "shards"
    assert shard(root, out) == 2
    err = capsys.readouterr().err
    assert str(path) in err, err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()
