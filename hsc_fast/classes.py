"""Class sets: what a dataset's labels mean, as one value instead of module constants.

A :class:`ClassSet` holds the foreground class names in dataset index order (index 1..K; 0 is the
background in label PNGs), the ignore label and the colour map. Everything that depends on the
class count takes it from here: the CAM head has ``num_classes`` = K + 1 channels with the
background LAST (channel ``bg_index`` = K, the EPS convention), image labels are (K,) multi-hot
vectors, confusion matrices are (K+1) x (K+2) (one void column), and label PNGs hold 0..K and the
ignore label.

Where it comes from: the shard index records it (``index.json`` key ``classes``, written by
``hsc_fast.shard``); a run resolves ``data.classes`` (``auto`` = the training data's set) once and
writes it into its config and ``RUN_DIR/classes.json``, which the later stages read. Indexes and
runs from before this key are VOC.

Built in: ``voc`` (PASCAL VOC 2012, 20 classes), ``coco`` (MS COCO 2014, 80 classes, in the order
of the category ids of instances_*.json), and ``synthetic:K`` (the embedded generator with K
classes; K = 20 is VOC's names, so the demo's set is VOC's).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from hsc_fast.errors import DataError

IGNORE_INDEX = 255  # VOC boundary / ignore label; also COCO's crowd / overlap label here

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# The 80 COCO 2014 categories sorted by category id (1..90 with gaps): dataset index i = i-th id.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
CLASSES_FILE = "classes.json"  # beside a run / in a VOC-layout tree of another dataset
MAX_FG = IGNORE_INDEX - 1  # label PNGs are uint8 and 255 is taken


def bit_palette() -> np.ndarray:
    """The VOC colour map, defined for all 256 indices (so for COCO's 81 too): the bits of the
    index are interleaved into R, G, B, most significant first. Entry 255 is (224, 224, 192)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


PALETTE = bit_palette()  # (256, 3) uint8: VOC's and the one COCO WSSS works publish their PNGs with


@dataclass(frozen=True)
class ClassSet:
    """A dataset's classes. ``names``: foreground names, label index 1..K in order."""
    name: str
    names: tuple
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        if not 1 <= len(self.names) <= MAX_FG:
            raise DataError(f"class set {self.name!r}: {len(self.names)} classes; expected 1..{MAX_FG}")
        if len(set(self.names)) != len(self.names) or "background" in self.names:
            raise DataError(f"class set {self.name!r}: class names must be distinct and not 'background'")
        if self.ignore_index != IGNORE_INDEX:
            raise DataError(f"class set {self.name!r}: ignore_index {self.ignore_index}; only {IGNORE_INDEX} is supported")

    @property
    def num_fg(self) -> int:
        """K: foreground classes (image-label length, CAM foreground channels)."""
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """K + 1: with the background (CAM channels, DeepLab outputs, confusion rows)."""
        return len(self.names) + 1

    @property
    def bg_index(self) -> int:
        """The background's CAM channel: the last one (K)."""
        return len(self.names)

    @property
    def label_names(self) -> tuple:
        """Label index -> name, 0 = 'background'."""
        return ("background",) + tuple(self.names)

    def to_json(self) -> dict:
        return {"name": self.name, "names": list(self.names), "ignore_index": self.ignore_index}

    @classmethod
    def from_json(cls, value, where: str) -> "ClassSet":
        """The ``classes`` value of a shard index / classes.json; DataError naming ``where``."""
        if not isinstance(value, dict) or not isinstance(value.get("names"), list) \
                or not all(isinstance(n, str) and n for n in value["names"]):
            raise DataError(f"{where}: 'classes' must be {{'name': str, 'names': [class names], 'ignore_index': 255}}; "
                            f"got {str(value)[:200]}")
        try:
            return cls(str(value.get("name", "custom")), tuple(value["names"]), int(value.get("ignore_index", IGNORE_INDEX)))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None


VOC = ClassSet("voc", VOC_CLASSES)
COCO = ClassSet("coco", COCO_CLASSES)
BUILTIN = {"voc": VOC, "coco": COCO}


def synthetic(num_fg: int) -> ClassSet:
    """The embedded generator's classes: VOC's names for 20, else 'synth01'..'synthK'."""
    if num_fg == VOC.num_fg:
        return VOC
    if not 1 <= num_fg <= MAX_FG:
        raise DataError(f"synthetic class count {num_fg}: expected 1..{MAX_FG}")
    return ClassSet(f"synthetic:{num_fg}", tuple(f"synth{c:02d}" for c in range(1, num_fg + 1)))


def resolve(spec: Union[str, "ClassSet"], where: str = "data.classes") -> ClassSet:
    """'voc' | 'coco' | 'synthetic:K' | a classes.json path -> ClassSet (DataError naming ``where``)."""
    if isinstance(spec, ClassSet):
        return spec
    spec = str(spec).strip()
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("synthetic:"):
        try:
            return synthetic(int(spec.partition(":")[2]))
        except ValueError:
            raise DataError(f"{where}: {spec!r}; expected synthetic:K with an integer K") from None
    if spec.endswith(".json") and os.path.isfile(spec):
        return load(spec)
    raise DataError(f"{where}: {spec!r}; expected voc | coco | synthetic:K | a classes.json file")


def load(path: Union[str, os.PathLike]) -> ClassSet:
    """A classes.json (or a shard index.json with a 'classes' key; without one: VOC)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable classes file ({str(e)[:200]})") from e
    if isinstance(value, dict) and "shards" in value:
        return from_index(value, str(path))
    return ClassSet.from_json(value, str(path))


def from_index(index: dict, where: str) -> ClassSet:
    """The class set recorded in a shard index (indexes written before the key are VOC)."""
    return ClassSet.from_json(index["classes"], where) if "classes" in index else VOC


def save(path: Union[str, os.PathLike], classes: ClassSet) -> None:
    from hsc_fast.io import atomic_write_text
    atomic_write_text(Path(path), json.dumps(classes.to_json(), indent=1) + "\n")
