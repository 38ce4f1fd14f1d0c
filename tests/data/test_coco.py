"""hsc_fast.data.coco: COCO instances JSON -> shards. A tiny COCO-format tree is generated per test:
polygons, compressed and uncompressed RLE, crowd, overlapping classes, an image without
annotations. The expected masks are built here from numpy rectangles and run lengths, not from
the module's code."""
import copy
import io
import json

import numpy as np
import pycocotools.mask as M
import pytest
import _faultutil as F
from PIL import Image

from hsc_fast import classes as C
from hsc_fast.classes import COCO, COCO_CLASSES
from hsc_fast.cli.shard import main
from hsc_fast.data import samples as S
from hsc_fast.data.coco import category_classes, rle_string_counts, shard_coco
from hsc_fast.data.shard import verify_shards
from hsc_fast.errors import DataError

# The category ids of COCO 2014, written out here (not imported) to check the module's table.
REAL_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
            + [67, 70] + list(range(72, 83)) + list(range(84, 91)))
SPLIT = "train2014"
H, W = 24, 32


def cls(cat_id):
    """Class index of a COCO category id: its position among the sorted ids, from 1."""
    return REAL_IDS.index(cat_id) + 1


def key(image_id):
    return f"COCO_{SPLIT}_{image_id:012d}"


def rect(x0, y0, x1, y1):
    """A polygon with integer corners and its pixels: rows y0..y1-1, columns x0..x1-1."""
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return [x0, y0, x1, y0, x1, y1, x0, y1], m


def runs(m):
    """Uncompressed COCO RLE counts of a bool mask (column-major, starting with a 0-run)."""
    flat = m.flatten(order="F").astype(int)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    lengths = np.diff(bounds).tolist()
    return ([0] + lengths) if flat[0] else lengths


def disc(cx, cy, r):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def build_fixture():
    """(annotation JSON dict, {key: expected mask}, {key: expected labels}, skipped keys)."""
    anns, masks, labels = [], {}, {}

    def add(image_id, cat, seg, crowd=0):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": seg,
                     "iscrowd": crowd, "area": 1.0, "bbox": [0, 0, 1, 1]})

    # 9: two overlapping instances of different classes (person 1, dog 18) + a second person
    # touching the first (same class: no 255 there)
    p1, m_p1 = rect(2, 2, 20, 18)
    dog, m_dog = rect(12, 10, 30, 22)
    p2, m_p2 = rect(0, 14, 6, 24)
    add(9, 1, [p1])
    add(9, 18, [dog])
    add(9, 1, [p2])
    exp = np.zeros((H, W), np.uint8)
    exp[m_p1 | m_p2] = cls(1)
    exp[m_dog] = cls(18)
    exp[10:18, 12:20] = 255  # person x dog: the explicit overlap
    masks[key(9)], labels[key(9)] = exp, [cls(1), cls(18)]

    # 25: a car as compressed RLE, a crowd of people (uncompressed RLE) over part of it: crowd
    # pixels outside the car are 255, inside stay car; people are not a label (crowd only)
    m_car = disc(10, 12, 7)
    car_rle = M.encode(np.asfortranarray(m_car.astype(np.uint8)))
    add(25, 3, {"size": [H, W], "counts": car_rle["counts"].decode("ascii")})
    m_crowd = np.zeros((H, W), bool)
    m_crowd[4:20, 12:28] = True
    add(25, 1, {"size": [H, W], "counts": runs(m_crowd)}, crowd=1)
    exp = np.zeros((H, W), np.uint8)
    exp[m_crowd] = 255
    exp[m_car] = cls(3)
    masks[key(25)], labels[key(25)] = exp, [cls(3)]

    # 30: a toothbrush (id 90, class 80) as uncompressed RLE, a bottle (44) polygon of two parts
    m_tb = disc(24, 6, 5)
    add(30, 90, {"size": [H, W], "counts": runs(m_tb)})
    b1, m_b1 = rect(1, 15, 8, 23)
    b2, m_b2 = rect(10, 18, 14, 22)
    add(30, 44, [b1, b2])
    exp = np.zeros((H, W), np.uint8)
    exp[m_tb] = cls(90)
    exp[m_b1 | m_b2] = cls(44)
    masks[key(30)], labels[key(30)] = exp, [cls(44), cls(90)]

    # 61: one polygon plus a degenerate 2-point one (no area) in one annotation
    z, m_z = rect(5, 5, 9, 20)
    add(61, 25, [z, [1, 1, 3, 3]])
    exp = np.zeros((H, W), np.uint8)
    exp[m_z] = cls(25)
    masks[key(61)], labels[key(61)] = exp, [cls(25)]

    # 42: no annotation at all; 57: a crowd only
    add(57, 1, {"size": [H, W], "counts": runs(disc(5, 5, 3))}, crowd=1)

    images = [{"id": i, "file_name": f"{key(i)}.jpg", "height": H, "width": W, "license": 1}
              for i in (61, 9, 42, 25, 57, 30)]  # not sorted: the shards are in key order anyway
    cats = [{"id": c, "name": n, "supercategory": "thing"} for c, n in zip(REAL_IDS, COCO_CLASSES)]
    data = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats[::-1]}
    return data, masks, labels


def write_tree(root, data):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / SPLIT).mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    for im in data["images"]:
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        pic = Image.fromarray(pixels)
        if im["id"] == 61:
            pic = pic.convert("L")  # COCO has grey JPEGs too
        pic.save(root / SPLIT / im["file_name"], quality=85)
    (root / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(data))


@pytest.fixture
def coco(tmp_path):
    data, masks, labels = build_fixture()
    root = tmp_path / "coco"
    write_tree(root, data)
    return {"root": root, "data": data, "masks": masks, "labels": labels, "tmp": tmp_path,
            "json": root / "annotations" / f"instances_{SPLIT}.json"}


read_members = F.read_shard_members


def files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_masks_labels_and_jpegs_read_back_exactly(coco):
    out = coco["tmp"] / "shards"
    index = shard_coco(coco["root"], SPLIT, out, shard_size=3, progress=False)
    kept = sorted(coco["masks"])
    assert index["count"] == 4 and [e["ids"] for e in index["shards"]] == [kept[:3], kept[3:]]
    assert [e["file"] for e in index["shards"]] == ["train2014-000000.tar", "train2014-000001.tar"]
    assert index["classes"] == COCO.to_json() and index["members"] == ["jpg", "cls.json", "seg.png"]
    assert index["has_saliency"] is False
    assert index["sources"] == {"coco_root": str(coco["root"].resolve()), "annotations": str(coco["json"].resolve()),
                                "split": SPLIT, "saliency_root": None, "category_ids": REAL_IDS}
    assert C.load(out / C.CLASSES_FILE) == COCO
    assert index["skipped"] == [{"id": key(42), "error": "no object annotations"},
                                {"id": key(57), "error": "only crowd (iscrowd=1) annotations, no image label"}]
    members = read_members(out)
    assert sorted(members) == kept
    for k in kept:
        got = members[k]
        assert set(got) == {"jpg", "cls.json", "seg.png"}
        assert got["jpg"] == (coco["root"] / SPLIT / f"{k}.jpg").read_bytes()
        assert json.loads(got["cls.json"]) == coco["labels"][k]
        mask = S.decode_mask(got["seg.png"], k, COCO)
        np.testing.assert_array_equal(mask, coco["masks"][k], err_msg=k)
        with Image.open(io.BytesIO(got["seg.png"])) as im:
            assert im.mode == "P"
    assert (S.decode_mask(members[key(9)]["seg.png"], "9", COCO)[10:18, 12:20] == 255).all()
    assert json.loads(members[key(30)]["cls.json"])[-1] == 80  # toothbrush, the last class


def test_rerun_is_byte_identical_any_worker_count_or_annotation_order(coco):
    out = coco["tmp"] / "shards"
    shard_coco(coco["root"], SPLIT, out, shard_size=2, progress=False)
    first = files(out)
    assert main(["--coco-root", str(coco["root"]), "--coco-split", SPLIT, "--out", str(out), "--shard-size", "2",
                 "--workers", "2", "--quiet"]) == 0
    assert files(out) == first
    shuffled = copy.deepcopy(coco["data"])
    shuffled["annotations"].reverse()
    shuffled["images"].reverse()
    coco["json"].write_text(json.dumps(shuffled))
    shard_coco(coco["root"], SPLIT, out, shard_size=2, progress=False)
    assert files(out) == first


def test_verify_reads_coco_classes_from_the_index(coco, capsys):
    out = coco["tmp"] / "shards"
    shard_coco(coco["root"], SPLIT, out, shard_size=2, progress=False)
    report = verify_shards(out)
    assert report["ok"], report["problems"]
    assert report["samples"] == 4
    assert main(["--verify", str(out)]) == 0
    # without the COCO class set, class 80 and COCO masks would not decode: the index is what decides
    index = json.loads((out / "index.json").read_text())
    del index["classes"]
    (out / "index.json").write_text(json.dumps(index))
    problems = verify_shards(out)["problems"]
    assert any(p["key"] == key(30) and "cls.json" in p["problem"] for p in problems)


def _drop_segmentation(d):
    del d["annotations"][1]["segmentation"]


def _missing_images(d):
    del d["images"]


def _unknown_category_id(d):
    d["annotations"][0]["category_id"] = 12  # not a COCO 2014 id


def _odd_polygon(d):
    d["annotations"][0]["segmentation"] = [[1, 2, 3, 4, 5, 6, 7]]


def _short_runs(d):
    d["annotations"][4]["segmentation"]["counts"] = [3, 4]


def _rle_size(d):
    d["annotations"][3]["segmentation"]["size"] = [W, H]


@pytest.mark.parametrize("mutate, expected", [
    (_drop_segmentation, ["'annotations'[1]", "'segmentation'", "missing"]),
    (_missing_images, ["'images'", "missing"]),
    (_unknown_category_id, ["'annotations'[0]", "'category_id' 12"]),
    (_odd_polygon, ["'annotations'[0]", "'segmentation'", "even-length"]),
    (_short_runs, ["'annotations'[4]", "'segmentation'", "add up"]),
    (_rle_size, ["'annotations'[3]", "'segmentation'", "'size'"]),
])
def test_bad_annotation_file_names_file_and_field_exit_2_nothing_written(coco, capsys, mutate, expected):
    data = copy.deepcopy(coco["data"])
    mutate(data)
    coco["json"].write_text(json.dumps(data))
    out = coco["tmp"] / "shards"
    assert main(["--coco-root", str(coco["root"]), "--coco-split", SPLIT, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(coco["json"]) in err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


def test_truncated_json_exit_2_nothing_written(coco, capsys):
    text = coco["json"].read_text()
    coco["json"].write_text(text[: len(text) // 2])
    out = coco["tmp"] / "shards"
    assert main(["--coco-root", str(coco["root"]), "--coco-split", SPLIT, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(coco["json"]) in err and "not valid JSON" in err
    assert not out.exists()


def test_missing_image_fails_or_is_skipped(coco, capsys):
    (coco["root"] / SPLIT / f"{key(30)}.jpg").unlink()
    out = coco["tmp"] / "shards"
    argv = ["--coco-root", str(coco["root"]), "--coco-split", SPLIT, "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{key(30)}.jpg" in err and "image not found" in err
    assert not out.exists()
    assert main(argv + ["--skip-bad"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 3 and key(30) in [s["id"] for s in index["skipped"]]


def test_image_size_differing_from_its_record_is_a_bad_sample(coco):
    Image.new("RGB", (W + 1, H)).save(coco["root"] / SPLIT / f"{key(9)}.jpg")
    with pytest.raises(DataError, match=f"{key(9)}.*33x24.*32x24"):
        shard_coco(coco["root"], SPLIT, coco["tmp"] / "shards", progress=False)


def test_cli_refuses_mixed_or_incomplete_sources(coco, capsys):
    root = str(coco["root"])
    with pytest.raises(SystemExit) as e:
        main(["--coco-root", root, "--voc-root", root, "--coco-split", SPLIT, "--out", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--coco-root", root, "--out", "x"])
    assert e.value.code == 2 and "--coco-split" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--coco-root", root, "--coco-split", SPLIT, "--out", "x", "--list", "ids.txt"])
    assert e.value.code == 2 and "--list" in capsys.readouterr().err


def test_compressed_rle_counts_match_pycocotools():
    rng = np.random.default_rng(3)
    for n in range(50):
        m = rng.random((H, W)) < (n % 7) / 6
        rle = M.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_string_counts(rle["counts"].decode("ascii"), "t") == runs(m)
    with pytest.raises(DataError, match="ends inside"):
        rle_string_counts("0`", "t")


def test_user_saliency_maps_ride_along_for_the_eps_methods(coco):
    """COCO ships no saliency maps; --saliency-root adds the user's (EPS needs them), byte for byte."""
    from hsc_fast.data.loader import ShardSet
    sal_dir = coco["tmp"] / "sal"
    sal_dir.mkdir()
    kept = list(coco["labels"])
    for k, image_key in enumerate(kept):
        Image.fromarray(np.full((H, W), 40 * k, np.uint8)).save(sal_dir / f"{image_key}.png")
    out = coco["tmp"] / "shards"
    index = shard_coco(coco["root"], SPLIT, out, progress=False, saliency_root=sal_dir)
    assert index["has_saliency"] is True and "sal.png" in index["members"]
    members = read_members(out)
    assert {k: m["sal.png"] for k, m in members.items()} == {k: (sal_dir / f"{k}.png").read_bytes() for k in kept}
    assert ShardSet(out).has_saliency
    (sal_dir / f"{kept[0]}.png").unlink()
    with pytest.raises(DataError, match=f"{kept[0]}: saliency map not found"):
        shard_coco(coco["root"], SPLIT, coco["tmp"] / "again", progress=False, saliency_root=sal_dir)


def test_coco_categories_are_detected_by_ids_and_names():
    """COCO 2014/2017's (id, name) pairs, in any order, give the canonical set; one name or one id
    changed makes it a custom 80-class set (names sorted by id), not COCO."""
    cats = [{"id": c, "name": n} for c, n in zip(REAL_IDS, COCO_CLASSES)]
    found = category_classes(cats[::-1], "f.json")
    assert found.classes == COCO and found.labels == {c: cls(c) for c in REAL_IDS} and not found.unmapped
    renamed = [dict(c) for c in cats]
    renamed[-1]["name"] = "brush"
    found = category_classes(renamed, "f.json")
    assert found.classes.name == "custom" and found.classes.names[-1] == "brush"
    assert found.classes.names[:-1] == COCO_CLASSES[:-1] and found.labels[90] == 80
    moved = [dict(c) for c in cats]
    moved[0]["id"] = 12                                 # person moves from id 1 to 12: after ids 2..11
    found = category_classes(moved, "f.json")
    assert found.classes != COCO and found.classes.names.index("person") == 10 and found.labels[12] == 11
