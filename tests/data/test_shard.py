"""hsc_fast.data.shard: round trip of real VOC/SBD samples, bad input, --skip-bad, --verify, determinism."""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import _faultutil as F
import scipy.io

from hsc_fast.data import samples as S
from hsc_fast.errors import DataError
from hsc_fast.data.shard import shard_dataset, verify_shards, write_tar
from hsc_fast.cli.shard import main
from hsc_fast.data.voc import load_cls_labels, multihot_to_classes, read_label_png, save_cls_labels_npy

VOC_IDS = ["2007_000032", "2007_000033"]
SBD_ID = "2008_000051"
ALL_IDS = VOC_IDS + [SBD_ID]


@pytest.fixture(scope="module")
def real_labels(fixtures_dir):
    return load_cls_labels(fixtures_dir / "lists" / "cls_labels.npy")


@pytest.fixture
def tree(tmp_path, fixtures_dir, real_labels):
    """A private copy of the real fixture tree (tests corrupt files in it), a plain id list and an
    IRN-format (int keys) label file cut down to our ids (the full one takes ~1 s to load)."""
    voc, sbd = tmp_path / "voc", tmp_path / "sbd"
    shutil.copytree(fixtures_dir / "voc", voc)
    shutil.copytree(fixtures_dir / "sbd", sbd)
    lst = tmp_path / "ids.txt"
    lst.write_text("".join(f"{i}\n" for i in ALL_IDS))
    labels = tmp_path / "cls_labels.npy"
    save_cls_labels_npy(labels, {k: real_labels[k] for k in ALL_IDS})
    return {"voc": voc, "sbd": sbd, "list": lst, "labels": labels, "tmp": tmp_path}


read_members = F.read_shard_members


def run(tree, out_name="out", **kw):
    args = dict(sbd_root=tree["sbd"], cls_labels=tree["labels"], shard_size=2, progress=False)
    args.update(kw)
    out = tree["tmp"] / out_name
    return out, shard_dataset(tree["voc"], args.pop("id_list", tree["list"]), out, **args)


def test_round_trip_of_real_samples(tree, fixtures_dir, real_labels):
    out, index = run(tree, cls_labels=fixtures_dir / "lists" / "cls_labels.npy")  # the real IRN file
    assert index["count"] == 3 and [e["ids"] for e in index["shards"]] == [VOC_IDS, [SBD_ID]]
    assert [e["file"] for e in index["shards"]] == ["ids-000000.tar", "ids-000001.tar"]
    got = read_members(out)
    labels = real_labels
    for key in VOC_IDS:
        src = fixtures_dir / "voc"
        assert got[key]["jpg"] == (src / "JPEGImages" / f"{key}.jpg").read_bytes()  # no re-encode
        assert got[key]["seg.png"] == (src / "SegmentationClass" / f"{key}.png").read_bytes()
        assert json.loads(got[key]["cls.json"]) == multihot_to_classes(labels[key])
    assert got[SBD_ID]["jpg"] == (fixtures_dir / "sbd" / "img" / f"{SBD_ID}.jpg").read_bytes()
    seg = scipy.io.loadmat(fixtures_dir / "sbd" / "cls" / f"{SBD_ID}.mat")["GTcls"]["Segmentation"][0, 0]
    np.testing.assert_array_equal(read_label_png(got[SBD_ID]["seg.png"]), seg)
    assert sorted(np.unique(seg).tolist()) == [0, 5, 9, 15]
    assert json.loads(got[SBD_ID]["cls.json"]) == [5, 9, 15]
    assert json.loads(got["2007_000032"]["cls.json"]) == [1, 15]


def test_webdataset_reads_the_shards(tree):
    import webdataset as wds
    out, index = run(tree)
    urls = [str(out / e["file"]) for e in index["shards"]]
    keys = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
            for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [(k, ["cls.json", "jpg", "seg.png"]) for k in ALL_IDS]


def test_labels_from_xml_then_mask_without_label_file(tree):
    out, _ = run(tree, cls_labels=None)
    got = read_members(out)
    # 2007_000032: XML (aeroplane, person); 2007_000033: no XML -> mask {1}; SBD: .mat classes
    assert [json.loads(got[k]["cls.json"]) for k in ALL_IDS] == [[1, 15], [1], [5, 9, 15]]


def test_both_list_formats_and_label_key_styles_give_identical_shards(tree):
    seam_dir = tree["tmp"] / "seam"
    seam_dir.mkdir()
    seam_list = seam_dir / "ids.txt"  # same stem -> same shard names
    seam_list.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ALL_IDS))
    str_keys = {k: v for k, v in load_cls_labels(tree["labels"]).items() if k in ALL_IDS}
    seam_labels = seam_dir / "cls_labels.npy"
    np.save(seam_labels, np.array(str_keys, dtype=object), allow_pickle=True)  # SEAM: str keys
    _, plain = run(tree, "plain")
    _, seam = run(tree, "seam_out", id_list=seam_list, cls_labels=seam_labels)
    assert [e["sha256"] for e in seam["shards"]] == [e["sha256"] for e in plain["shards"]]


def _assert_nothing_published(out):
    assert not out.exists() or not [p for p in out.iterdir()], list(out.iterdir())


@pytest.mark.parametrize("case", ["missing_image", "bad_jpeg", "bad_mat", "missing_label"])
def test_bad_input_names_id_and_path_and_publishes_nothing(tree, case, capsys):
    cls_labels = tree["labels"]
    if case == "missing_image":
        bad_id, path = "2007_000033", tree["voc"] / "JPEGImages" / "2007_000033.jpg"
        path.unlink()
    elif case == "bad_jpeg":
        bad_id, path = "2007_000033", tree["voc"] / "JPEGImages" / "2007_000033.jpg"
        path.write_bytes(path.read_bytes()[:5000])  # truncated JPEG
    elif case == "bad_mat":
        bad_id, path = SBD_ID, tree["sbd"] / "cls" / f"{SBD_ID}.mat"
        path.write_bytes(b"MATLAB 5.0 MAT-file, garbage" + bytes(300))
    else:
        bad_id, path = SBD_ID, None
        cls_labels = tree["tmp"] / "labels.json"
        cls_labels.write_text(json.dumps({"2007_000032": [1, 15], "2007_000033": [1]}))
    out = tree["tmp"] / "out"
    out.mkdir()
    with pytest.raises(DataError) as err:
        run(tree, cls_labels=cls_labels)
    assert bad_id in str(err.value) and (path is None or str(path) in str(err.value))
    _assert_nothing_published(out)
    rc = main(["--voc-root", str(tree["voc"]), "--sbd-root", str(tree["sbd"]), "--list", str(tree["list"]),
               "--cls-labels", str(cls_labels), "--out", str(out), "--quiet"])
    assert rc != 0 and bad_id in capsys.readouterr().err
    _assert_nothing_published(out)


def test_skip_bad_lists_the_bad_ids(tree):
    (tree["voc"] / "JPEGImages" / "2007_000033.jpg").write_bytes(b"not a jpeg")
    out, index = run(tree, skip_bad=True)
    assert [s["id"] for s in index["skipped"]] == ["2007_000033"]
    assert "2007_000033.jpg" in index["skipped"][0]["error"]
    assert [e["ids"] for e in index["shards"]] == [["2007_000032"], [SBD_ID]]
    assert set(read_members(out)) == {"2007_000032", SBD_ID}
    assert verify_shards(out)["ok"]


def test_unsafe_ids_are_refused(tree):
    tree["list"].write_text("2007_000032\n../../etc/passwd\n")
    with pytest.raises(DataError, match="passwd"):
        run(tree)
    tree["list"].write_text("2007_000032\n2007.000033\n")  # a '.' would split the webdataset key
    with pytest.raises(DataError, match="2007.000033"):
        run(tree)


def test_rerun_is_byte_identical_and_drops_stale_shards(tree):
    out, first = run(tree, shard_size=1)
    assert len(first["shards"]) == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _, again = run(tree, shard_size=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _, fewer = run(tree, shard_size=2)  # the third shard of the first run is no longer listed
    assert sorted(p.name for p in out.iterdir()) == ["ids-000000.tar", "ids-000001.tar", "index.json"]


def _problems(out):
    report = verify_shards(out)
    assert not report["ok"]
    return report["problems"]


def test_verify_detects_corrupted_byte(tree, capsys):
    out, index = run(tree)
    assert verify_shards(out) == {"ok": True, "directory": str(out), "shards": 2, "samples": 3, "problems": []}
    tar = out / "ids-000000.tar"
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:  # flip a byte in the middle of the second JPEG's data
        info = tf.getmember("2007_000033.jpg")
    data[info.offset_data + info.size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    probs = _problems(out)
    assert any(p["shard"] == tar.name and "sha256" in p["problem"] for p in probs)
    assert main(["--verify", str(out)]) == 1
    assert "ids-000000.tar" in capsys.readouterr().err


def test_verify_detects_undecodable_member_with_key(tree):
    out, index = run(tree)
    bad = {S.KEY: "2007_000032", "jpg": b"\xff\xd8garbage", "cls.json": b"[1,99]"}
    write_tar(out / "ids-000000.tar", [bad])
    probs = _problems(out)
    keyed = {(p["key"], p["problem"].split(":")[-1].strip()[:10]) for p in probs if p["key"] == "2007_000032"}
    assert len(keyed) >= 2  # the JPEG and the class list are both reported for that key
    assert any("cls.json" in p["problem"] for p in probs)


def test_verify_detects_truncated_tar_and_missing_shard(tree):
    out, index = run(tree)
    tar = out / "ids-000000.tar"
    tar.write_bytes(tar.read_bytes()[:70000])
    (out / "ids-000001.tar").unlink()
    probs = _problems(out)
    assert any(p["shard"] == "ids-000000.tar" and "truncated" in p["problem"] for p in probs)
    assert any(p["shard"] == "ids-000001.tar" and "missing" in p["problem"] for p in probs)


def test_nothing_in_a_shard_is_unpickled_on_verify(tree, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    out, _ = run(tree)
    sample = {S.KEY: "2007_000032", "jpg": (tree["voc"] / "JPEGImages" / "2007_000032.jpg").read_bytes(),
              "cls.json": b"[1,15]"}
    with tarfile.open(out / "ids-000000.tar", "w") as tf:
        for name, data in [("2007_000032.jpg", sample["jpg"]), ("2007_000032.cls.json", sample["cls.json"]),
                           ("2007_000032.pickle", pickle.dumps(Evil()))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    probs = _problems(out)
    assert any("'.pickle'" in p["problem"] for p in probs)
    assert not marker.exists()
