"""One training sample as stored in a shard (and as a folder dataset yields it), and its codecs.

A raw sample is a webdataset-style dict of bytes::

    {"__key__": "2007_000032",          # the image id
     "jpg": <original JPEG bytes>,      # never re-encoded
     "cls.json": b"[1,15]",             # sorted VOC class indices 1..20 present
     "seg.png": <palette PNG>,          # optional: class mask 0..20 and 255
     "sal.png": <grey PNG>}             # optional: saliency map 0..255

Only JPEG, PNG and JSON are ever decoded here: nothing in a shard is unpickled.
"""
from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from hsc_fast.classes import VOC, ClassSet
from hsc_fast.errors import DataError
from hsc_fast.data.voc import classes_to_multihot, read_label_png

KEY = "__key__"
IMAGE = "jpg"
LABELS = "cls.json"
MASK = "seg.png"
SALIENCY = "sal.png"
MEMBERS = (IMAGE, LABELS, MASK, SALIENCY)  # the order members are written in a shard


def check_key(key: str, where: str) -> str:
    """A webdataset key ends at the first '.', and a '/' would make a tar sub-folder: refuse both."""
    if not key or "." in key or "/" in key or "\\" in key or key.strip() != key:
        raise DataError(f"{where}: image id {key!r} cannot be a shard key (expected no '.', '/' or spaces)")
    return key


def encode_labels(classes) -> bytes:
    """Sorted class indices -> the canonical ``cls.json`` bytes (compact, deterministic)."""
    return json.dumps(sorted(int(c) for c in classes), separators=(",", ":")).encode("ascii")


def decode_labels(data: bytes, where: str, classes: ClassSet = VOC) -> np.ndarray:
    """``cls.json`` bytes -> float32 (K,) multi-hot; the list must be sorted distinct ints 1..K."""
    try:
        labels = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, over-long ints, deep nesting
        raise DataError(f"{where}: {LABELS} is not valid JSON ({str(e)[:200]})") from e
    if (not isinstance(labels, list)
            or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= classes.num_fg for c in labels)
            or labels != sorted(set(labels))):
        raise DataError(f"{where}: {LABELS} is {labels!r}; expected a sorted list of distinct class indices 1..{classes.num_fg}")
    return classes_to_multihot(labels, classes)


def open_jpeg(data: bytes, where: str) -> Image.Image:
    """JPEG bytes -> an RGB PIL image, fully decoded (a truncated or corrupt file raises DataError)."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            raise DataError(f"{where}: image is {im.format}; expected a JPEG")
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: not a decodable JPEG image ({e})") from e


def open_saliency(data: bytes, where: str, size: Optional[tuple] = None) -> Image.Image:
    """Saliency PNG/JPEG bytes -> a grey ('L') PIL image; ``size`` (w, h) must match when given."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: not a decodable saliency image ({e})") from e
    if size is not None and im.size != tuple(size):
        raise DataError(f"{where}: saliency map is {im.size[0]}x{im.size[1]}; expected the image size {size[0]}x{size[1]}")
    return im if im.mode == "L" else im.convert("L")


def decode_mask(data: bytes, where: str, classes: ClassSet = VOC) -> np.ndarray:
    """``seg.png`` bytes -> uint8 (H, W) class indices (decoded ourselves: a generic 'rgb8' decoder
    would expand the palette to three colour channels)."""
    try:
        return read_label_png(bytes(data), classes)
    except DataError as e:
        raise DataError(f"{where}: {MASK}: {e}") from e


def member(sample: dict, name: str, where: str) -> bytes:
    """A required member's bytes, or DataError naming the sample."""
    data = sample.get(name)
    if data is None:
        raise DataError(f"{where}: sample has no '{name}' member")
    return data


def sample_where(sample: dict) -> str:
    """'shard.tar: key' (or just the key) for error messages."""
    url = sample.get("__url__")
    return f"{url}: {sample.get(KEY)}" if url else f"sample {sample.get(KEY)}"
