"""PASCAL VOC / SBD file formats: label PNGs, id lists, image-level label files, VOC XML, SBD .mat.

Every reader validates what it reads and raises :class:`hsc_fast.errors.DataError` naming the file
(and line / key / field) and what was expected. Readers accept a path or the raw bytes (shard
members arrive as bytes). Writers are deterministic: same input -> byte-identical file.

Class indices follow VOC: 0 background, 1..20 the classes of ``hsc_fast.classes.VOC_CLASSES`` (index - 1),
255 ignore. Image-level labels are 20-element multi-hot vectors without background (position c-1
for class c), as in IRN's ``cls_labels.npy``. The label helpers take a ``classes`` ClassSet
(default VOC): COCO and synthetic sets use them with their own class count (1..K).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from hsc_fast.classes import IGNORE_INDEX, PALETTE, VOC, ClassSet
from hsc_fast.errors import DataError

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]

VOC_CLASS_NAMES = VOC.label_names  # index -> name, 0..20
_VOC_INDEX = {name: i for i, name in enumerate(VOC_CLASS_NAMES)}  # VOC XML name -> index

# An id is one path component made of safe characters (VOC ids look like 2007_000032).
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


VOC_PALETTE = PALETTE  # (256, 3) uint8; entry 255 is (224, 224, 192), the VOC boundary colour


# ----------------------------------------------------------------------------------------- helpers

def _describe(src: PathOrBytes) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _read_bytes(src: PathOrBytes) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    try:
        return Path(src).read_bytes()
    except OSError as e:
        raise DataError(f"{src}: cannot read file ({e.strerror or e})") from e


def class_name(index: int, classes: ClassSet = VOC) -> str:
    """Name of class ``index`` (0 = 'background')."""
    if not 0 <= int(index) <= classes.num_fg:
        raise DataError(f"class index {index}: expected 0..{classes.num_fg}")
    return classes.label_names[int(index)]


def class_index(name: str, classes: ClassSet = VOC) -> int:
    """Class index (1..K, or 0 for 'background') of ``name``."""
    try:
        return classes.label_names.index(name)
    except ValueError:
        raise DataError(f"class name {name!r}: expected one of {', '.join(classes.names)}") from None


def classes_to_multihot(classes_present: Iterable[int], classes: ClassSet = VOC) -> np.ndarray:
    """Class indices 1..K -> float32 (K,) multi-hot (no background)."""
    vec = np.zeros(classes.num_fg, dtype=np.float32)
    for c in classes_present:
        if not 1 <= int(c) <= classes.num_fg:
            raise DataError(f"class index {c}: expected 1..{classes.num_fg}")
        vec[int(c) - 1] = 1.0
    return vec


def multihot_to_classes(vec: np.ndarray) -> list[int]:
    """float (K,) multi-hot -> sorted class indices 1..K."""
    return [int(i) + 1 for i in np.flatnonzero(np.asarray(vec) > 0.5)]


def check_id(image_id: str, where: str) -> str:
    """Return ``image_id`` if it is a safe single path component, else raise DataError naming ``where``."""
    if (not isinstance(image_id, str) or not _SAFE_ID.match(image_id) or ".." in image_id):
        raise DataError(f"{where}: unsafe or malformed image id {image_id!r} "
                        "(expected letters, digits, '_', '-', '.', no '/', '\\\\' or '..')")
    return image_id


def safe_join(root: Union[str, os.PathLike], *parts: str) -> Path:
    """``root / parts...``, refusing absolute parts, '..' components and anything resolving outside root."""
    root_path = Path(root)
    for part in parts:
        p = str(part)
        if not p or os.path.isabs(p) or "\\" in p or "\x00" in p:
            raise DataError(f"path part {p!r} under {root}: expected a non-empty relative path")
        if any(comp == ".." for comp in p.split("/")):
            raise DataError(f"path part {p!r} under {root}: '..' would escape the root")
    joined = root_path.joinpath(*parts)
    base = os.path.normpath(os.path.abspath(root_path))
    full = os.path.normpath(os.path.abspath(joined))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise DataError(f"path {joined}: escapes the root {root}")
    return joined


def classes_in_mask(arr: np.ndarray, classes: ClassSet = VOC) -> list[int]:
    """Sorted foreground classes (1..K) present in a label mask (0 and 255 are not classes)."""
    counts = np.bincount(np.asarray(arr, dtype=np.uint8).ravel(), minlength=256)
    return [c for c in range(1, classes.num_fg + 1) if counts[c] > 0]


def _check_label_values(arr: np.ndarray, where: str, classes: ClassSet) -> None:
    counts = np.bincount(arr.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if classes.num_fg < v < IGNORE_INDEX]
    if bad:
        raise DataError(f"{where}: label values {[int(v) for v in bad[:5]]} outside 0..{classes.num_fg} and {IGNORE_INDEX}")


# ------------------------------------------------------------------------------------ label PNGs

def read_label_png(src: PathOrBytes, classes: ClassSet = VOC) -> np.ndarray:
    """Read a label PNG (palette 'P' or 8-bit grey 'L') -> uint8 (H, W) class indices 0..K, 255."""
    where = _describe(src)
    data = _read_bytes(src)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{where}: label image mode {im.mode!r}; expected a palette ('P') "
                                "or 8-bit grey ('L') PNG of class indices (an RGB colour mask is not supported)")
            arr = np.array(im, dtype=np.uint8)  # for 'P' this is the palette index, i.e. the class
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: not a readable PNG label image ({e})") from e
    if arr.ndim != 2:
        raise DataError(f"{where}: label image has shape {arr.shape}; expected (H, W)")
    _check_label_values(arr, where, classes)
    return arr


def encode_label_png(arr: np.ndarray, classes: ClassSet = VOC) -> bytes:
    """uint8 (H, W) class indices -> palette PNG bytes with the VOC colour map (deterministic; the
    map covers all 256 indices, so COCO's labels use it too)."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise DataError(f"label array: got {arr.dtype} {arr.shape}; expected uint8 (H, W)")
    _check_label_values(arr, "label array", classes)
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    im.putpalette(VOC_PALETTE.ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_label_png(path: Union[str, os.PathLike], arr: np.ndarray, classes: ClassSet = VOC) -> None:
    """Write ``arr`` as a palette PNG at ``path``."""
    Path(path).write_bytes(encode_label_png(arr, classes))


# -------------------------------------------------------------------------------------- id lists

def _id_from_line(line: str, where: str) -> str:
    fields = line.split()
    first = fields[0]
    if first.lower().endswith(_IMAGE_EXTS) and ("/" in first or len(fields) == 2):
        # SEAM/EPS format: "/JPEGImages/ID.jpg /SegmentationClassAug/ID.png" -> ID
        if "\\" in first or ".." in first.split("/"):
            raise DataError(f"{where}: unsafe image path {first!r}")
        return check_id(Path(first).stem, where)
    if len(fields) != 1:
        raise DataError(f"{where}: expected 'ID' or '/JPEGImages/ID.jpg /SegmentationClassAug/ID.png', got {line!r}")
    return check_id(first, where)


def read_id_list(path: Union[str, os.PathLike]) -> list[str]:
    """Image ids of a list file, in file order.

    Accepts one id per line (IRN: ``2007_000032``) or the SEAM/EPS format
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` (the id is the stem of the
    first field). Blank lines and lines starting with '#' are skipped. Unsafe ids, duplicates and
    an empty list raise DataError naming the file and line.
    """
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: id list is not UTF-8 text ({e})") from e
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        image_id = _id_from_line(line, where)
        if image_id in seen:
            raise DataError(f"{where}: duplicate id {image_id!r} (first on line {seen[image_id]})")
        seen[image_id] = lineno
        ids.append(image_id)
    if not ids:
        raise DataError(f"{path}: id list contains no ids")
    return ids


# ----------------------------------------------------------------------------- image-level labels

def int_key_to_id(key: int) -> str:
    """IRN's integer key 2007000032 -> '2007_000032'."""
    s = str(int(key))
    return s[:4] + "_" + s[4:]


def id_to_int_key(image_id: str) -> int:
    """'2007_000032' -> 2007000032 (IRN's cls_labels.npy key); only for VOC-style YYYY_NNNNNN ids."""
    if not re.fullmatch(r"\d{4}_\d{6}", image_id):
        raise DataError(f"image id {image_id!r}: IRN integer keys need the VOC form YYYY_NNNNNN")
    return int(image_id.replace("_", ""))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what ``np.save`` writes for a dict of numpy arrays / numpy scalars.

    The IRN label file is a pickled dict; anything needing another global (i.e. able to run code)
    is refused, so a tampered label file cannot execute anything.
    """
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a label file")
        if module == "_codecs":
            import _codecs
            return _codecs.encode
        if module == "numpy":
            return getattr(np, name)
        try:
            from numpy._core import multiarray  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray
        return getattr(multiarray, name)


def load_pickled_npy_dict(path: Union[str, os.PathLike]) -> dict:
    """Read a `.npy` holding a pickled dict (IRN cls_labels, SEAM CAM files) WITHOUT arbitrary
    unpickling: only numpy arrays and scalars are rebuilt; anything else raises DataError."""
    data = _read_bytes(path)
    fmt = np.lib.format
    f = io.BytesIO(data)
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(f)
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise DataError(f"{path}: not a .npy file ({type(e).__name__}: {str(e)[:200]})") from e
    if shape != () or dtype != np.dtype(object):
        raise DataError(f"{path}: .npy holds {dtype} {shape}; expected a pickled dict")
    try:
        obj = _NumpyOnlyUnpickler(f).load()
    except Exception as e:  # any unpickling failure is a malformed label file
        raise DataError(f"{path}: cannot read the pickled dict ({e})") from e
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    return obj


def _label_key(key, path) -> str:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not 10 ** 9 <= int(key) < 10 ** 10:
            raise DataError(f"{path}: key {key!r}: expected an IRN integer key like 2007000032")
        return int_key_to_id(int(key))
    if isinstance(key, str):
        return check_id(key, f"{path}: key {key!r}")
    raise DataError(f"{path}: key {key!r} of type {type(key).__name__}; expected int (IRN) or str (SEAM)")


def _multihot_from_value(value, path, key, classes: ClassSet) -> np.ndarray:
    where = f"{path}: key {key!r}"
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: value is not numeric ({e})") from e
    if arr.shape == (classes.num_fg,) and np.all((arr == 0) | (arr == 1)):
        return arr.astype(np.float32)
    raise DataError(f"{where}: value {np.asarray(value).tolist()!r}; expected {classes.num_fg} values of 0/1")


def _json_value(value, path, key, classes: ClassSet) -> np.ndarray:
    k = classes.num_fg
    if isinstance(value, list) and len(value) == k and all(v in (0, 1) for v in value):
        return _multihot_from_value(value, path, key, classes)
    if (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and all(1 <= v <= k for v in value) and len(set(value)) == len(value)):
        return classes_to_multihot(value, classes)
    raise DataError(f"{path}: key {key!r}: value {value!r}; expected {k} values of 0/1 "
                    f"or a list of distinct class indices 1..{k}")


def load_cls_labels(path: Union[str, os.PathLike], classes: ClassSet = VOC) -> dict[str, np.ndarray]:
    """Image-level labels: id ('2007_000032') -> float32 (K,) multi-hot (no background; K = 20 for VOC).

    Formats:
      * ``.npy`` — a pickled dict as written by IRN (``int`` keys like 2007000032) or SEAM (``str``
        keys like '2007_000032'), values 20-element 0/1 arrays. Only numpy arrays/scalars are
        unpickled (a restricted unpickler), never arbitrary objects.
      * ``.json`` — the safe alternative: ``{"2007_000032": [0, 1, ...20 values], ...}`` or
        ``{"2007_000032": [1, 15], ...}`` (a list of VOC class indices 1..20).
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        try:
            raw = json.loads(_read_bytes(path).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, over-long ints, deep nesting
            raise DataError(f"{path}: not valid JSON ({str(e)[:200]})") from e
        value_of = _json_value
    elif suffix == ".npy":
        raw = load_pickled_npy_dict(path)
        value_of = _multihot_from_value
    else:
        raise DataError(f"{path}: label file must be .npy (IRN/SEAM) or .json")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty dict of id -> labels, got {type(raw).__name__}")
    labels: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        image_id = _label_key(key, path)
        if image_id in labels:
            raise DataError(f"{path}: key {key!r}: id {image_id!r} appears twice")
        labels[image_id] = value_of(value, path, key, classes)
    return labels


def save_cls_labels_npy(path: Union[str, os.PathLike], labels: dict[str, np.ndarray], classes: ClassSet = VOC) -> None:
    """Write labels in IRN's format (int keys, float32 (K,) values); deterministic for a given dict order."""
    out = {id_to_int_key(k): np.asarray(v, dtype=np.float32).reshape(classes.num_fg) for k, v in labels.items()}
    buf = io.BytesIO()
    np.save(buf, np.array(out, dtype=object), allow_pickle=True)
    Path(path).write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------------ VOC XML

def _refuse_declarations(data: bytes, where: str) -> None:
    """Refuse DOCTYPE/ENTITY declarations (the road to entity-expansion bombs) in any encoding:
    expat reports them after decoding, where a byte search misses e.g. UTF-16 files."""
    from xml.parsers import expat

    def refuse(*_):
        raise DataError(f"{where}: XML with DOCTYPE/ENTITY declarations is refused (VOC files have none)")
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except (expat.ExpatError, ValueError, RecursionError) as e:
        raise DataError(f"{where}: malformed XML ({e})") from e


def parse_voc_xml(src: PathOrBytes, classes: ClassSet = VOC) -> list[int]:
    """VOC annotation XML -> sorted unique class indices (1..K) of its <object><name>s."""
    where = _describe(src)
    data = _read_bytes(src)
    _refuse_declarations(data, where)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(f"{where}: malformed XML ({e})") from e
    if root.tag != "annotation":
        raise DataError(f"{where}: root element <{root.tag}>; expected <annotation>")
    index_of = _VOC_INDEX if classes is VOC else {n: i for i, n in enumerate(classes.label_names)}
    found = set()
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is None:
            raise DataError(f"{where}: <object> without <name>")
        idx = index_of.get(name.strip())
        if not idx:  # unknown or 'background'
            raise DataError(f"{where}: unknown class name {name.strip()!r}; expected one of {', '.join(classes.names)}")
        found.add(idx)
    return sorted(found)


# ------------------------------------------------------------------------------------------ SBD .mat

# MAT v5 data types and array classes (MathWorks "MAT-File Format", level 5).
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED, _MX_STRUCT = 5, 6, 14, 15, 2
_MAT_MAX_BYTES = 1 << 28  # decompressed-size guard (a zlib bomb is refused, not inflated)


class _Mat5:
    """A bounds-checked reader of the MAT v5 subset SBD uses (compressed or not): it walks data
    elements itself and only decodes what it is asked for. scipy's C reader is not used on these
    untrusted files: a few flipped bytes make it crash the process (segfault) -- found by fuzzing."""

    def __init__(self, data: bytes, where: str):
        self.where = where
        if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
            raise self.error("not a MATLAB v5 .mat file (no v5 header; v4 and v7.3/HDF5 files are not supported)")
        self.end = "<" if data[126:128] == b"IM" else ">"
        self.variables = {}
        for mtype, payload in self.elements(data[128:]):
            if mtype == _MI_COMPRESSED:
                mtype, payload = self.single_element(self.inflate(payload))
            if mtype == _MI_MATRIX and payload:
                self.variables[self.header(payload)[2]] = payload

    def error(self, what: str) -> DataError:
        return DataError(f"{self.where}: {what}")

    def inflate(self, payload: bytes) -> bytes:
        import zlib
        d = zlib.decompressobj()
        try:
            out = d.decompress(payload, _MAT_MAX_BYTES)
        except zlib.error as e:
            raise self.error(f"corrupt compressed element ({e})") from e
        if d.unconsumed_tail:
            raise self.error(f"compressed element inflates beyond {_MAT_MAX_BYTES} bytes")
        return out

    def elements(self, buf: bytes):
        """(type, payload) of each data element in ``buf``, checking every size against the buffer."""
        pos = 0
        while pos < len(buf):
            if len(buf) - pos < 8:
                raise self.error(f"truncated data element at byte {pos}")
            first, second = np.frombuffer(buf, self.end + "u4", 2, pos).tolist()
            if first >> 16:  # small element: type and size packed into 4 bytes, data in the next 4
                mtype, size, start, pos = first & 0xFFFF, first >> 16, pos + 4, pos + 8
                if size > 4:
                    raise self.error(f"small data element of {size} bytes (at most 4)")
            else:
                mtype, size, start = first, second, pos + 8
                if size > len(buf) - start:
                    raise self.error(f"data element of {size} bytes overruns the file (at byte {pos})")
                pos = start + size + (0 if mtype == _MI_COMPRESSED else -size % 8)
            yield mtype, buf[start:start + size]

    def single_element(self, buf: bytes) -> tuple:
        found = list(self.elements(buf))
        if len(found) != 1:
            raise self.error(f"compressed element holds {len(found)} data elements; expected 1")
        return found[0]

    def numbers(self, mtype: int, payload: bytes, what: str) -> np.ndarray:
        if mtype not in _MI_DTYPES:
            raise self.error(f"{what}: unsupported data type {mtype}")
        dtype = np.dtype(self.end + _MI_DTYPES[mtype])
        if len(payload) % dtype.itemsize:
            raise self.error(f"{what}: {len(payload)} bytes is not a whole number of {dtype} values")
        return np.frombuffer(payload, dtype)

    def header(self, payload: bytes) -> tuple:
        """A matrix element -> (array class, dims, name, the remaining sub-elements)."""
        subs = list(self.elements(payload))
        if len(subs) < 3 or subs[0][0] != _MI_UINT32 or len(subs[0][1]) != 8 or subs[1][0] != _MI_INT32:
            raise self.error("malformed matrix element (expected array flags, dimensions, name)")
        cls = int(self.numbers(*subs[0], "array flags")[0]) & 0xFF
        dims = self.numbers(*subs[1], "dimensions").astype(np.int64)
        if dims.size < 2 or (dims < 0).any() or int(np.prod(dims, dtype=np.float64)) > _MAT_MAX_BYTES:
            raise self.error(f"matrix dimensions {dims.tolist()} out of range")
        try:
            name = bytes(subs[2][1]).decode("ascii")
        except UnicodeDecodeError as e:
            raise self.error("matrix name is not ASCII") from e
        return cls, tuple(dims.tolist()), name, subs[3:]

    def struct_field(self, payload: bytes, field: str, what: str) -> bytes:
        """The matrix element of ``field`` in a 1x1 struct (other fields are never decoded)."""
        cls, dims, _, subs = self.header(payload)
        if cls != _MX_STRUCT or dims != (1, 1) or len(subs) < 2:
            raise self.error(f"expected {what} to be a 1x1 struct")
        width = self.numbers(*subs[0], f"{what} field name length")
        names_raw = bytes(subs[1][1])
        if width.size != 1 or int(width[0]) <= 0 or len(names_raw) % int(width[0]):
            raise self.error(f"{what}: malformed field names")
        width = int(width[0])
        names = [names_raw[i:i + width].split(b"\0")[0].decode("ascii", "replace") for i in range(0, len(names_raw), width)]
        values = subs[2:]
        if len(values) != len(names) or any(t != _MI_MATRIX for t, _ in values):
            raise self.error(f"{what}: {len(names)} field names but {len(values)} field values")
        if field not in names:
            raise self.error(f"{what} has no field '{field}' (fields: {', '.join(names)})")
        return values[names.index(field)][1]

    def numeric(self, payload: bytes, what: str) -> np.ndarray:
        cls, dims, _, subs = self.header(payload) if payload else (9, (0, 0), "", [(2, b"")])
        if cls not in _MX_DTYPES or not subs:
            raise self.error(f"{what} is not a numeric matrix (array class {cls})")
        values = self.numbers(*subs[0], what)
        if values.size != int(np.prod(dims)):
            raise self.error(f"{what}: {values.size} values for dimensions {list(dims)}")
        return values.astype(_MX_DTYPES[cls]).reshape(dims, order="F")


def read_sbd_mat(src: PathOrBytes, classes: ClassSet = VOC) -> np.ndarray:
    """SBD ``cls/*.mat`` -> uint8 (H, W) class indices (``GTcls.Segmentation``)."""
    where = _describe(src)
    mat = _Mat5(_read_bytes(src), where)
    if "GTcls" not in mat.variables:
        raise DataError(f"{where}: expected a struct 'GTcls' with field 'Segmentation' (SBD cls format); "
                        f"variables: {', '.join(mat.variables) or 'none'}")
    seg = mat.numeric(mat.struct_field(mat.variables["GTcls"], "Segmentation", "GTcls"), "GTcls.Segmentation")
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
        raise DataError(f"{where}: GTcls.Segmentation is {seg.dtype} {seg.shape}; expected an integer (H, W) matrix")
    if seg.min() < 0 or seg.max() > IGNORE_INDEX:
        raise DataError(f"{where}: GTcls.Segmentation values outside 0..{IGNORE_INDEX}")
    seg = seg.astype(np.uint8)
    _check_label_values(seg, f"{where}: GTcls.Segmentation", classes)
    return seg


def _contour_pixels(seg: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label: each region's contour lies on its own side."""
    edge = np.zeros(seg.shape, bool)
    dx = seg[:, 1:] != seg[:, :-1]
    dy = seg[1:, :] != seg[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


# MATLAB writes this 116-byte text header with the creation time; we fix it so files are reproducible.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: hsc-fast, Created by: hsc_fast.data.voc.write_sbd_mat"


def write_sbd_mat(path: Union[str, os.PathLike], seg: np.ndarray, classes: ClassSet = VOC) -> None:
    """Write ``seg`` (uint8 (H, W), values 0..K) as an SBD ``cls`` file.

    Struct ``GTcls`` with Segmentation (uint8), Boundaries (Kx1 cell of sparse logical contours)
    and CategoriesPresent (uint8 column of the classes present), like the real SBD files.
    """
    import scipy.io
    import scipy.sparse
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.dtype != np.uint8:
        raise DataError(f"{path}: segmentation is {seg.dtype} {seg.shape}; expected uint8 (H, W)")
    _check_label_values(seg, str(path), classes)
    present_classes = classes_in_mask(seg, classes)
    contour = _contour_pixels(seg)
    boundaries = np.empty((classes.num_fg, 1), dtype=object)
    for c in range(1, classes.num_fg + 1):
        boundaries[c - 1, 0] = (scipy.sparse.csc_matrix(contour & (seg == c)) if c in present_classes
                                else scipy.sparse.csc_matrix(seg.shape, dtype=bool))
    present = np.array(present_classes, dtype=np.uint8).reshape(-1, 1)
    gt = np.empty((1, 1), dtype=[("Boundaries", object), ("Segmentation", object), ("CategoriesPresent", object)])
    gt[0, 0] = (boundaries, seg, present)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": gt}, format="5", do_compression=False, oned_as="column")
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    Path(path).write_bytes(bytes(data))
