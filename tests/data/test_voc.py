"""VOC/SBD format readers and writers, against the real fixture files and corrupt inputs."""
import io
import json
import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from hsc_fast.data import voc
from hsc_fast.errors import DataError


# ------------------------------------------------------------------------------------- palette/PNG

def test_palette_matches_real_voc_png(fixtures_dir):
    with Image.open(fixtures_dir / "voc/SegmentationClass/2007_000032.png") as im:
        pal = np.array(im.getpalette(), dtype=np.uint8).reshape(-1, 3)[:256]
    assert np.array_equal(pal, voc.VOC_PALETTE)
    assert voc.VOC_PALETTE[255].tolist() == [224, 224, 192]
    assert voc.VOC_PALETTE[15].tolist() == [192, 128, 128]


@pytest.mark.parametrize("name, shape, classes", [
    ("2007_000032", (281, 500), [1, 15]),
    ("2007_000033", (366, 500), [1]),
])
def test_read_real_label_png_and_round_trip(fixtures_dir, name, shape, classes):
    arr = voc.read_label_png(fixtures_dir / f"voc/SegmentationClass/{name}.png")
    assert arr.dtype == np.uint8 and arr.shape == shape
    assert voc.classes_in_mask(arr) == classes
    assert 255 in arr and 0 in arr
    png = voc.encode_label_png(arr)
    assert np.array_equal(voc.read_label_png(png), arr)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "P"
    assert voc.encode_label_png(arr) == png  # deterministic bytes


def test_read_label_png_accepts_grey_L(tmp_path):
    arr = np.array([[0, 3, 255], [20, 1, 0]], dtype=np.uint8)
    p = tmp_path / "m.png"
    Image.fromarray(arr).save(p)  # mode 'L'
    assert np.array_equal(voc.read_label_png(p), arr)
    voc.write_label_png(tmp_path / "w.png", arr)
    assert np.array_equal(voc.read_label_png(tmp_path / "w.png"), arr)


def test_read_label_png_rejects_rgb_and_bad_values(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match="rgb.png"):
        voc.read_label_png(rgb)
    bad = tmp_path / "bad.png"
    Image.fromarray(np.full((4, 4), 37, np.uint8)).save(bad)
    with pytest.raises(DataError, match="bad.png.*37"):
        voc.read_label_png(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="junk.png"):
        voc.read_label_png(junk)
    with pytest.raises(DataError, match="missing.png"):
        voc.read_label_png(tmp_path / "missing.png")
    with pytest.raises(DataError):
        voc.encode_label_png(np.full((2, 2), 100, np.uint8))


def test_classes_in_mask():
    arr = np.array([[0, 255, 7], [7, 20, 1]], dtype=np.uint8)
    assert voc.classes_in_mask(arr) == [1, 7, 20]
    assert voc.classes_in_mask(np.zeros((3, 3), np.uint8)) == []


# -------------------------------------------------------------------------------------- id lists

def test_read_id_list_plain(fixtures_dir):
    ids = voc.read_id_list(fixtures_dir / "lists/train.txt")
    assert len(ids) == 1464 and ids[0] == "2007_000032"
    assert len(voc.read_id_list(fixtures_dir / "lists/train_aug.txt")) == 10582


def test_read_id_list_seam_format_gives_same_ids(fixtures_dir, tmp_path):
    plain = voc.read_id_list(fixtures_dir / "lists/val.txt")[:50]
    seam = tmp_path / "val_seam.txt"
    lines = ["# SEAM-style list", ""]
    lines += [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in plain]
    seam.write_text("\n".join(lines) + "\n")
    assert voc.read_id_list(seam) == plain


@pytest.mark.parametrize("line", ["../etc/passwd", "a/b", "a\\b", "/JPEGImages/../x.jpg /S/x.png",
                                  "2007_000032 extra", ".hidden"])
def test_read_id_list_rejects_unsafe_ids(tmp_path, line):
    p = tmp_path / "list.txt"
    p.write_text("2007_000032\n" + line + "\n")
    with pytest.raises(DataError, match=r"list.txt:2"):
        voc.read_id_list(p)


def test_read_id_list_rejects_duplicates_and_empty(tmp_path):
    p = tmp_path / "dup.txt"
    p.write_text("a\nb\na\n")
    with pytest.raises(DataError, match="dup.txt:3.*duplicate"):
        voc.read_id_list(p)
    e = tmp_path / "empty.txt"
    e.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="empty.txt"):
        voc.read_id_list(e)


# ----------------------------------------------------------------------------------- cls labels

def test_load_cls_labels_irn_int_keys_and_str_copy(fixtures_dir, tmp_path):
    labels = voc.load_cls_labels(fixtures_dir / "lists/cls_labels.npy")
    assert len(labels) == 12031
    assert voc.multihot_to_classes(labels["2007_000032"]) == [1, 15]
    assert labels["2007_000033"].dtype == np.float32 and labels["2007_000033"].shape == (20,)
    # Every train_aug and val id has an entry.
    ids = voc.read_id_list(fixtures_dir / "lists/train_aug.txt") + voc.read_id_list(fixtures_dir / "lists/val.txt")
    assert set(ids) <= set(labels)
    # The SEAM variant (str keys) loads to the identical dict.
    seam = tmp_path / "cls_labels_seam.npy"
    np.save(seam, {k: v for k, v in labels.items()})
    seam_labels = voc.load_cls_labels(seam)
    assert seam_labels.keys() == labels.keys()
    assert all(np.array_equal(seam_labels[k], labels[k]) for k in labels)
    # Our writer produces IRN's format (int keys), which the raw loader sees as ints.
    irn = tmp_path / "irn.npy"
    voc.save_cls_labels_npy(irn, {k: labels[k] for k in list(labels)[:10]})
    raw = np.load(irn, allow_pickle=True).item()
    assert all(isinstance(k, int) for k in raw) and 2007000032 in raw
    assert voc.load_cls_labels(irn).keys() == set(list(labels)[:10])


def test_load_cls_labels_json(tmp_path):
    p = tmp_path / "labels.json"
    vec = [0] * 20
    vec[14] = 1
    p.write_text(json.dumps({"2007_000032": [1, 15], "2007_000033": vec}))
    out = voc.load_cls_labels(p)
    assert voc.multihot_to_classes(out["2007_000032"]) == [1, 15]
    assert voc.multihot_to_classes(out["2007_000033"]) == [15]


@pytest.mark.parametrize("content, match", [
    ({"2007_000032": np.zeros(19, np.float32)}, "2007_000032"),
    ({"2007_000032": np.full(20, 2.0, np.float32)}, "2007_000032"),
    ({"../x": np.zeros(20, np.float32)}, r"\.\./x"),
    ({12: np.zeros(20, np.float32)}, "12"),
    ({3.5: np.zeros(20, np.float32)}, "3.5"),
    ({}, "non-empty dict"),
])
def test_load_cls_labels_rejects_bad_npy(tmp_path, content, match):
    p = tmp_path / "bad.npy"
    np.save(p, content)
    with pytest.raises(DataError, match=match):
        voc.load_cls_labels(p)


class _CallsAFunction:
    """Unpickles by calling os.getcwd (harmless here, but any callable could be named)."""
    def __reduce__(self):
        return (os.getcwd, ())


def test_load_cls_labels_refuses_arbitrary_pickles(tmp_path):
    p = tmp_path / "evil.npy"
    np.save(p, {"2007_000032": _CallsAFunction()})
    with pytest.raises(DataError, match="evil.npy.*not allowed"):
        voc.load_cls_labels(p)
    plain = tmp_path / "array.npy"
    np.save(plain, np.zeros((3, 20), np.float32))
    with pytest.raises(DataError, match="array.npy"):
        voc.load_cls_labels(plain)


@pytest.mark.parametrize("content, match", [
    ('{"2007_000032": [0, 21]}', "2007_000032"),
    ('{"2007_000032": [1, 1]}', "2007_000032"),
    ('[1, 2]', "dict"),
    ('{"a": ', "JSON"),
])
def test_load_cls_labels_rejects_bad_json(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        voc.load_cls_labels(p)


# ------------------------------------------------------------------------------------------ VOC XML

def test_parse_voc_xml_real(fixtures_dir):
    path = fixtures_dir / "voc/Annotations/2007_000032.xml"
    assert voc.parse_voc_xml(path) == [1, 15]
    assert voc.parse_voc_xml(path.read_bytes()) == [1, 15]


@pytest.mark.parametrize("xml, match", [
    (b"<annotation><object><name>unicorn</name></object></annotation>", "unicorn"),
    (b"<annotation><object><name>dog</name></object>", "malformed"),
    (b"<annotation><object><pose>Left</pose></object></annotation>", "without <name>"),
    (b"<foo/>", "annotation"),
    (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><annotation/>', "DOCTYPE"),
])
def test_parse_voc_xml_rejects(xml, match):
    with pytest.raises(DataError, match=match):
        voc.parse_voc_xml(xml)


# ------------------------------------------------------------------------------------------ SBD

def test_read_real_sbd_mat(fixtures_dir):
    path = fixtures_dir / "sbd/cls/2008_000051.mat"
    seg = voc.read_sbd_mat(path)
    assert seg.dtype == np.uint8 and seg.shape == (371, 500)
    assert np.unique(seg).tolist() == [0, 5, 9, 15]
    assert np.array_equal(voc.read_sbd_mat(path.read_bytes()), seg)


def test_write_sbd_mat_round_trip_matches_real_structure(fixtures_dir, tmp_path):
    real_path = fixtures_dir / "sbd/cls/2008_000051.mat"
    seg = voc.read_sbd_mat(real_path)
    ours_path = tmp_path / "ours.mat"
    voc.write_sbd_mat(ours_path, seg)
    assert np.array_equal(voc.read_sbd_mat(ours_path), seg)
    real = scipy.io.loadmat(real_path)["GTcls"]
    ours = scipy.io.loadmat(ours_path)["GTcls"]
    assert set(real.dtype.names) == set(ours.dtype.names) and ours.shape == real.shape == (1, 1)
    for field in real.dtype.names:
        r, o = real[field][0, 0], ours[field][0, 0]
        assert (r.dtype, r.shape) == (o.dtype, o.shape), field
    assert ours["CategoriesPresent"][0, 0].ravel().tolist() == [5, 9, 15]
    rb, ob = real["Boundaries"][0, 0], ours["Boundaries"][0, 0]
    for c in range(20):
        assert ob[c, 0].shape == rb[c, 0].shape == seg.shape
        assert (ob[c, 0].nnz > 0) == (rb[c, 0].nnz > 0), c  # contours exactly for the present classes
        # Our contour pixels lie on the class region (SBD's are within a pixel of it).
        assert np.all(seg[ob[c, 0].toarray() > 0] == c + 1)
    # Reproducible bytes (no timestamp in the header).
    again = tmp_path / "again.mat"
    voc.write_sbd_mat(again, seg)
    assert again.read_bytes() == ours_path.read_bytes()


def test_read_sbd_mat_rejects(tmp_path):
    with pytest.raises(DataError, match="junk.mat"):
        p = tmp_path / "junk.mat"
        p.write_bytes(b"\x00" * 300)
        voc.read_sbd_mat(p)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"GTinst": np.zeros((2, 2))})
    with pytest.raises(DataError, match="other.mat.*GTcls"):
        voc.read_sbd_mat(other)
    badval = tmp_path / "badval.mat"
    gt = np.empty((1, 1), dtype=[("Segmentation", object)])
    gt[0, 0] = (np.full((3, 3), 50, np.uint8),)
    scipy.io.savemat(badval, {"GTcls": gt})
    with pytest.raises(DataError, match="badval.mat.*50"):
        voc.read_sbd_mat(badval)


# ------------------------------------------------------------------------------------------ paths

def test_safe_join(tmp_path):
    assert voc.safe_join(tmp_path, "JPEGImages", "2007_000032.jpg") == tmp_path / "JPEGImages" / "2007_000032.jpg"
    assert voc.safe_join(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    for bad in ("../x", "/etc/passwd", "a/../../x", "a\\b", ""):
        with pytest.raises(DataError):
            voc.safe_join(tmp_path, bad)
