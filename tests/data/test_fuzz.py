"""Property-based fuzzing of every reader of untrusted bytes: id lists, cls_labels (.json/.npy),
VOC XML, SBD .mat, shard members (JPEG, label/saliency PNG, cls.json) and whole shards.

Property: any input either parses into a valid value or raises `hsc_fast.errors.DataError`;
never another exception type, never a hang (pytest-timeout bounds each test). Inputs are random
bytes and mutations (bit flips, truncations, insertions, block overwrites) of valid files, plus
hand-written adversarial examples.
"""
import io
import json
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from hsc_fast.classes import VOC

from hsc_fast.data import samples as S
from hsc_fast.errors import DataError
from hsc_fast.data.shard import verify_shards, write_tar
from hsc_fast.data.voc import (check_id, encode_label_png, load_cls_labels, parse_voc_xml, read_id_list,
                          read_label_png, read_sbd_mat, safe_join, save_cls_labels_npy, write_sbd_mat)

NUM_FG = VOC.num_fg

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------- valid seeds
def _seg() -> np.ndarray:
    seg = np.zeros((12, 16), np.uint8)
    seg[2:8, 3:9] = 15
    seg[5:10, 10:14] = 7
    seg[1, :] = 255
    return seg


def _jpeg(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _grey_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(192, dtype=np.uint8).reshape(12, 16)).save(buf, "PNG")
    return buf.getvalue()


def _mat() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_sbd_mat(Path(d) / "x.mat", _seg())
        return (Path(d) / "x.mat").read_bytes()


def _npy() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        labels = {"2007_000032": np.eye(NUM_FG, dtype=np.float32)[0], "2007_000039": np.eye(NUM_FG, dtype=np.float32)[19]}
        save_cls_labels_npy(Path(d) / "l.npy", labels)
        return (Path(d) / "l.npy").read_bytes()


XML = (b"<annotation><folder>VOC2012</folder><filename>2007_000032.jpg</filename>"
       b"<object><name>aeroplane</name><bndbox><xmin>1</xmin></bndbox></object>"
       b"<object><name>person</name></object></annotation>")
SEEDS = {"jpg": _jpeg(), "png": encode_label_png(_seg()), "sal": _grey_png(), "mat": _mat(), "npy": _npy(), "xml": XML}


@st.composite
def mutated(draw, seed: bytes):
    """`seed` with a few random edits: flip, overwrite, insert, delete, truncate, zero a block."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "zero"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "zero":
            data[pos:pos + 64] = bytes(len(data[pos:pos + 64]))
    return bytes(data)


def inputs(kind: str):
    return st.one_of(mutated(SEEDS[kind]), st.binary(max_size=300))


def parses_or_data_error(fn, *args):
    """fn(*args), or None when it raised DataError; any other exception fails the test."""
    try:
        return fn(*args)
    except DataError as e:
        assert str(e), "DataError without a message"
        return None


@contextmanager
def _file(data: bytes, name: str):
    """`data` as a file named `name` in a temporary folder (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="hsc-fuzz-") as d:
        (Path(d) / name).write_bytes(data)
        yield Path(d) / name


# ------------------------------------------------------------------------------------ id lists
ID_CHARS = st.sampled_from(list("ab_09-./\\ \t#") + ["..", "/JPEGImages/", ".jpg", " /S/x.png", "\x00", "é", "\u2028"])
ID_TEXT = st.lists(st.lists(ID_CHARS, max_size=8).map("".join), max_size=6).map("\n".join)


@FUZZ
@given(st.one_of(ID_TEXT.map(lambda t: t.encode("utf-8")), st.binary(max_size=200)))
@example(b"../../etc/passwd\n")
@example(b"/JPEGImages/../../../etc/passwd.jpg /S/x.png\n")
@example(b"2007_000032\n\xff\xfe\n")
def test_id_list_reader(data):
    with _file(data, "list.txt") as path:
        ids = parses_or_data_error(read_id_list, path)
    for image_id in ids or []:
        assert check_id(image_id, "fuzz") == image_id
        root = Path("/data/voc")
        assert str(safe_join(root, "JPEGImages", f"{image_id}.jpg")).startswith(str(root) + "/")


# -------------------------------------------------------------------------------- cls_labels
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 25) | st.floats(allow_nan=True) | st.text(max_size=4),
                           lambda c: st.lists(c, max_size=21) | st.dictionaries(st.text(max_size=12), c, max_size=3),
                           max_leaves=30)
LABEL_KEYS = st.sampled_from(["2007_000032", "../x", "", "a/b", "2007_000033"]) | st.text(max_size=12)


def _check_labels(labels):
    for image_id, vec in (labels or {}).items():
        assert check_id(image_id, "fuzz") == image_id
        assert vec.dtype == np.float32 and vec.shape == (NUM_FG,) and set(np.unique(vec)) <= {0.0, 1.0}


@FUZZ
@given(st.one_of(st.dictionaries(LABEL_KEYS, JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
                 JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.binary(max_size=100)))
@example(b"[" * 100000)
@example(b'{"2007_000032": ' + b"1" * 5000 + b"}")
@example(b'{"2007_000032": [' + b"1" * 5000 + b"]}")
def test_cls_labels_json_reader(data):
    with _file(data, "labels.json") as path:
        _check_labels(parses_or_data_error(load_cls_labels, path))


def _npy_with_pickle(payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    return buf.getvalue() + payload


PICKLABLE = st.recursive(st.none() | st.integers() | st.floats() | st.text(max_size=5) | st.binary(max_size=5),
                         lambda c: st.lists(c, max_size=3) | st.tuples(c, c) | st.dictionaries(st.integers() | st.text(max_size=12), c, max_size=3),
                         max_leaves=12)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


@FUZZ
@given(st.one_of(inputs("npy"), PICKLABLE.map(lambda v: _npy_with_pickle(pickle.dumps(v, protocol=2))),
                 st.binary(max_size=60).map(_npy_with_pickle)))
@example(_npy_with_pickle(pickle.dumps(_Evil())))
@example(_npy_with_pickle(pickle.dumps({2007000032: np.ones(20, np.float32)}, protocol=5)))
def test_cls_labels_npy_reader(data):
    with _file(data, "labels.npy") as path:
        _check_labels(parses_or_data_error(load_cls_labels, path))


# -------------------------------------------------------------------------------------- VOC XML
TAGS = st.sampled_from(["annotation", "object", "name", "part", "bndbox", "size"])
NAMES = st.sampled_from(["person", "cat", "background", " dog ", "", "Person", "tvmonitor"]) | st.text(max_size=6)


@st.composite
def xml_trees(draw, depth=0):
    tag = draw(TAGS) if depth else draw(st.sampled_from(["annotation", "annotation", "root"]))
    if tag == "name" or depth >= 3:
        inner = "".join(c for c in draw(NAMES) if c not in "<&")
    else:
        inner = "".join(draw(st.lists(xml_trees(depth + 1), max_size=3)))
    return f"<{tag}>{inner}</{tag}>"


BOMB = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><annotation><object><name>&c;</name></object></annotation>')
UTF16_DTD = ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE annotation [<!ENTITY p "person">]>'
             '<annotation><object><name>&p;</name></object></annotation>').encode("utf-16")


@FUZZ
@given(st.one_of(xml_trees().map(str.encode), inputs("xml")))
@example(BOMB)
@example(UTF16_DTD)
@example(b"<annotation>" * 50000)
def test_voc_xml_reader(data):
    classes = parses_or_data_error(parse_voc_xml, data)
    if classes is not None:
        assert classes == sorted(set(classes)) and all(1 <= c <= NUM_FG for c in classes)


def test_xml_declarations_are_refused_in_any_encoding():
    """Entity declarations (the road to entity-expansion bombs) are refused however the file is encoded."""
    for data in (BOMB, UTF16_DTD, BOMB.decode().encode("utf-16")):
        with pytest.raises(DataError, match="DOCTYPE"):
            parse_voc_xml(data)


# ------------------------------------------------------------------------------------- SBD .mat
@settings(FUZZ, max_examples=300)  # scipy's C reader segfaulted on ~1 in 3 of these
@given(inputs("mat"))
def test_sbd_mat_reader(data):
    seg = parses_or_data_error(read_sbd_mat, data)
    if seg is not None:
        assert seg.dtype == np.uint8 and seg.ndim == 2
        assert set(np.unique(seg)) <= set(range(NUM_FG + 1)) | {255}


# --------------------------------------------------------------------------------- shard members
def _bomb_jpeg() -> bytes:
    """A real JPEG whose frame header claims 65000 x 65000 pixels."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2
    return bytes(data)


def _bomb_png() -> bytes:
    data = bytearray(encode_label_png(_seg()))
    data[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width, height
    return bytes(data)


@FUZZ
@given(inputs("jpg"))
@example(_bomb_jpeg())
def test_shard_jpeg_member(data):
    im = parses_or_data_error(S.open_jpeg, data, "fuzz: jpg")
    if im is not None:
        assert im.mode == "RGB" and np.asarray(im).shape[2] == 3


@FUZZ
@given(inputs("png"))
@example(_bomb_png())
def test_shard_mask_member(data):
    for reader in (lambda d: S.decode_mask(d, "fuzz: seg.png"), read_label_png):
        mask = parses_or_data_error(reader, data)
        if mask is not None:
            assert mask.dtype == np.uint8 and mask.ndim == 2


@FUZZ
@given(inputs("sal"))
@example(_bomb_png())
def test_shard_saliency_member(data):
    im = parses_or_data_error(S.open_saliency, data, "fuzz: sal.png")
    if im is not None:
        assert im.mode == "L"


@FUZZ
@given(st.one_of(JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40)))
@example(b"[" * 100000)
@example(b"[" + b"9" * 5000 + b"]")
@example(b"[1, 1]")
def test_shard_labels_member(data):
    vec = parses_or_data_error(S.decode_labels, data, "fuzz: cls.json")
    if vec is not None:
        assert vec.shape == (NUM_FG,) and vec.sum() == len(json.loads(data))


# -------------------------------------------------------------------------------- whole shards
def _shard_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        samples = [{S.KEY: f"2007_00003{i}", S.IMAGE: SEEDS["jpg"], S.LABELS: b"[1,15]", S.MASK: SEEDS["png"]}
                   for i in range(2)]
        write_tar(Path(d) / "x.tar", samples)
        return (Path(d) / "x.tar").read_bytes()


SHARD = _shard_bytes()


@settings(FUZZ, max_examples=40)
@given(mutated(SHARD))
def test_verify_reports_any_damaged_shard(data):
    with _file(data, "x-000000.tar") as tar:
        ids = ["2007_000030", "2007_000031"]
        (tar.parent / "index.json").write_text(json.dumps({"shards": [{"file": tar.name, "ids": ids, "sha256": "?"}]}))
        report = verify_shards(tar.parent)  # never raises: every problem is a row naming the shard
    assert not report["ok"] and all(p["shard"] == "x-000000.tar" for p in report["problems"])


@settings(FUZZ, max_examples=15)
@given(mutated(SHARD))
@example(bytes(len(SHARD)))  # an all-zero file is a valid, empty tar
def test_training_loader_never_crashes_or_hangs_on_a_damaged_shard(data):
    from hsc_fast.config import DataConfig
    from hsc_fast.data import build_train_loader
    with _file(data, "x-000000.tar") as tar:
        cfg = DataConfig(train=str(tar), batch_size=1, workers=0, shuffle_buffer=1,
                         resize_long=[16, 24], crop_size=16, view2_size=16)
        loader = build_train_loader(cfg, 0, 1, epoch_samples=2)
        batch = parses_or_data_error(lambda: next(iter(loader)))
    if batch is not None:
        assert batch["img"].shape == (1, 3, 16, 16) and batch["key"][0] in ("2007_000030", "2007_000031")
