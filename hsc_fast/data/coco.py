"""MS COCO 2014/2017, or any COCO-format dataset (instances JSON + images) -> the same WebDataset
shards as VOC.

    python -m hsc_fast.shard --coco-root COCO --coco-split train2014 --out shards/coco_train2014 \\
        [--classes SPEC] [--shard-size 1000] [--workers 8] [--skip-bad]

Input (the layout of the official download)::

    COCO/annotations/instances_train2014.json      (and instances_val2014.json)
    COCO/train2014/COCO_train2014_000000000009.jpg (the 'file_name' of each image record)

One sample per image, keyed by the file name's stem (``COCO_train2014_000000000009``), holding the
original JPEG bytes, ``cls.json`` and ``seg.png`` (see :mod:`hsc_fast.data.samples`).

Classes come from the file's ``categories`` (:func:`category_classes`): when its (id, name) pairs
are exactly COCO 2014/2017's, the canonical 80 (:data:`hsc_fast.classes.COCO`); else the names
sorted by category id are class indices 1..K (a 'custom' set: ids 3, 7, 19 -> 1, 2, 3). A
``classes`` override (``--classes``) maps each category to its name's index in the given set. The
set is recorded in index.json (``classes``, and ``sources.category_ids``: the id of each class) and
in ``out/classes.json``.

The rules (all independent of the order of the annotations in the file):

* **image labels** (``cls.json``): the classes with at least one non-crowd (``iscrowd`` 0)
  annotation. A class seen only in crowd annotations is not a label (its pixels are 255 below).
* **mask** (``seg.png``, palette PNG, 0 = background): a pixel covered by non-crowd instances of
  exactly one class gets that class (two instances of the same class overlapping are still that
  class); a pixel covered by non-crowd instances of two or more different classes is 255; a pixel
  covered by no non-crowd instance but by a crowd (``iscrowd`` 1) region is 255; every other pixel
  is 0. Instance masks are pycocotools' (``frPyObjects`` / ``merge`` / ``decode``, what
  ``COCO.annToMask`` does) for polygons, compressed and uncompressed RLE.
* **skipped** (listed in index.json ``skipped`` as ``{"id", "error"}``, never an error): images with
  no annotation (``"no object annotations"``) and images whose annotations are all crowd (no label
  to train on).
* a polygon of fewer than 3 points (under 6 numbers) has no area and adds no pixels (pycocotools
  would read a 4-number one as a box); it still counts for the image labels.
* a missing ``iscrowd`` is 0 (as in pycocotools, which never reads it for masks).

How this differs from the masks WSSS works publish for COCO (the ``coco_seg_anno`` PNGs and the
``cls_labels.npy`` used with IRN / RIB and their successors): those paint every annotation of the
image in file order, each later one overwriting the earlier ones, crowd regions included with their
class, and take the image labels from all annotations, crowd included. There an overlap pixel gets
whichever instance comes last in the file, and a crowd region is trained on as a full object. Here
a pixel whose class the annotations disagree on, or that a crowd region covers only roughly, is
ignored (255) instead of guessed, and the result does not depend on the annotation order. Both
give identical masks wherever the annotations neither overlap across classes nor include crowd.

Checks: the annotation file is read and checked completely before any image is read; a bad file
(invalid or truncated JSON, a missing or wrong 'images' / 'annotations' / 'categories', an
annotation with a missing or invalid 'segmentation', 'category_id', 'image_id' or 'iscrowd') or a
missing image file raises DataError naming the file and the field, and nothing is written (a
missing image with ``skip_bad`` is skipped instead). An image that does not decode or whose size
differs from its record is a bad sample like a VOC one (``skip_bad`` leaves it out).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from pycocotools import mask as mask_utils

from hsc_fast.classes import CLASSES_FILE, COCO, COCO_CLASSES, IGNORE_INDEX, ClassSet
from hsc_fast.classes import save as save_classes
from hsc_fast.data import samples as S
from hsc_fast.data.shard import _bad_summary, base_index, write_shards
from hsc_fast.data.voc import encode_label_png, safe_join
from hsc_fast.errors import DataError

PathLike = Union[str, os.PathLike]

# The category ids of COCO 2014 (and 2017), in the order of COCO_CLASSES: class index i+1 = i-th id.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)
NO_ANNOTATIONS = "no object annotations"
ONLY_CROWD = "only crowd (iscrowd=1) annotations, no image label"
MEMBERS = (S.IMAGE, S.LABELS, S.MASK)


@dataclass(frozen=True)
class Instance:
    """One annotation: its class index 1..80, crowd flag and checked segmentation (a list of
    polygons, or an RLE dict with 'size' and 'counts')."""
    label: int
    crowd: bool
    segmentation: object


@dataclass(frozen=True)
class CocoImage:
    """One image record and its instances (what a shard worker needs to build the sample)."""
    key: str
    file_name: str
    height: int
    width: int
    instances: tuple


# ------------------------------------------------------------------------------- paths and JSON
def annotation_path(coco_root: PathLike, split: str) -> Path:
    """``COCO/annotations/instances_<split>.json``."""
    return safe_join(coco_root, "annotations", f"instances_{split}.json")


def image_root(coco_root: PathLike, split: str) -> Path:
    """``COCO/<split>/``, the folder the records' file names are relative to."""
    return safe_join(coco_root, split)


def load_annotation_file(path: Path) -> dict:
    """The parsed JSON object; DataError naming the file for a missing, truncated or invalid file."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, a file cut short
        raise DataError(f"{path}: not valid JSON, truncated or corrupt ({str(e)[:200]})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'; "
                        f"got {type(data).__name__}")
    return data


def _list_field(data: dict, field: str, path: Path) -> list:
    value = data.get(field)
    if not isinstance(value, list):
        what = "missing" if field not in data else f"a {type(value).__name__}, not a list"
        raise DataError(f"{path}: field '{field}' is {what} (expected a list of records)")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ categories
@dataclass(frozen=True)
class Categories:
    """The class set of an annotation file and its category id -> class index 1..K. ``unmapped``:
    the categories (id -> name) a ``--classes`` override has no class for (an annotation using one
    is an error)."""
    classes: ClassSet
    labels: dict
    unmapped: dict


def _category_pairs(categories: list, path: Path) -> list:
    """The checked (id, name) pairs sorted by id: a non-empty list, each an object with an integer
    'id' and a non-empty string 'name', ids and names unique."""
    if not categories:
        raise DataError(f"{path}: field 'categories' is an empty list; expected one {{'id': int, 'name': str}} "
                        f"per class")
    ids, names = {}, {}
    for i, cat in enumerate(categories):
        where = f"{path}: 'categories'[{i}]"
        if not isinstance(cat, dict):
            raise DataError(f"{where}: expected an object {{'id': int, 'name': str}}, got {str(cat)[:100]}")
        cat_id, name = cat.get("id"), cat.get("name")
        if not _is_int(cat_id):
            raise DataError(f"{where}: field 'id' is {'missing' if 'id' not in cat else repr(cat_id)}; "
                            f"expected an integer")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: field 'name' is {'missing' if 'name' not in cat else repr(name)}; "
                            f"expected a non-empty string")
        if cat_id in ids:
            raise DataError(f"{where}: field 'id' {cat_id} is used twice ('categories'[{ids[cat_id]}] too)")
        if name in names:
            raise DataError(f"{where}: field 'name' {name!r} is used twice ('categories'[{names[name]}] too)")
        ids[cat_id], names[name] = i, i
    return sorted((cat["id"], cat["name"]) for cat in categories)


def _file_class_set(pairs: list, path: Path) -> ClassSet:
    """COCO 2014/2017's canonical set when the (id, name) pairs are exactly COCO's, else a
    'custom' set of the names in id order."""
    if pairs == list(zip(COCO_CATEGORY_IDS, COCO_CLASSES)):
        return COCO
    if any(name == "background" for _, name in pairs):
        raise DataError(f"{path}: 'categories' has a category named 'background'; label 0 is the background "
                        f"here. Rename it, or pass --classes with a classes.json of the other names (unused "
                        f"categories outside that set are ignored)")
    try:
        return ClassSet("custom", tuple(name for _, name in pairs))
    except DataError as e:
        raise DataError(f"{path}: 'categories': {e}") from None


def category_classes(categories: list, path: Path, override: Optional[ClassSet] = None) -> Categories:
    """The class set of ``categories`` and each id's class index 1..K.

    Without ``override``: COCO 2014/2017's (:data:`hsc_fast.classes.COCO`) when the (id, name)
    pairs are exactly COCO's, else the names sorted by id as a 'custom' set (smallest id = class 1).
    With ``override`` (``--classes``): each category's index is its name's position in that set;
    categories whose name it lacks are ``unmapped``. DataError naming the file and the field for a
    malformed list (empty, an entry without an integer 'id' or a string 'name', a duplicate id or
    name)."""
    pairs = _category_pairs(categories, path)
    classes = override if override is not None else _file_class_set(pairs, path)
    position = {name: k + 1 for k, name in enumerate(classes.names)}
    labels = {cat_id: position[name] for cat_id, name in pairs if name in position}
    unmapped = {cat_id: name for cat_id, name in pairs if name not in position}
    if not labels:
        raise DataError(f"{path}: no name in 'categories' is a class of --classes {classes.name!r} "
                        f"({', '.join(classes.names[:5])}{', ...' if classes.num_fg > 5 else ''})")
    return Categories(classes, labels, unmapped)


# ------------------------------------------------------------------------------------ image records
def _image_record(i: int, rec, path: Path) -> tuple:
    """(id, key, file_name, height, width) of ``images[i]``, checked."""
    where = f"{path}: 'images'[{i}]"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    for field in ("id", "height", "width"):
        if not _is_int(rec.get(field)) or (field != "id" and rec[field] < 1):
            raise DataError(f"{where}: field '{field}' is {rec.get(field)!r}; expected "
                            + ("an integer" if field == "id" else "a positive integer"))
    file_name = rec.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"{where}: field 'file_name' is {file_name!r}; expected a file name")
    key = S.check_key(Path(file_name).stem, f"{where} 'file_name' {file_name!r}")
    return rec["id"], key, file_name, rec["height"], rec["width"]


def image_records(images: list, path: Path) -> dict:
    """Image id -> (key, file_name, height, width); ids and keys must be unique."""
    records, keys = {}, {}
    for i, rec in enumerate(images):
        image_id, key, file_name, height, width = _image_record(i, rec, path)
        if image_id in records:
            raise DataError(f"{path}: 'images'[{i}]: field 'id' {image_id} is used twice")
        if key in keys:
            raise DataError(f"{path}: 'images'[{i}]: field 'file_name' {file_name!r} gives the key {key!r} "
                            f"of image id {keys[key]} too")
        records[image_id] = (key, file_name, height, width)
        keys[key] = image_id
    return records


# ---------------------------------------------------------------------------------- segmentations
def rle_string_counts(counts: str, where: str) -> list:
    """The run lengths of a compressed RLE string (the COCO mask API's format: 6-bit characters
    from '0', 5 bits of value each, bit 0x20 = more characters follow, bit 0x10 of the last one =
    negative; from the fourth run on the value is the difference to the run two places back)."""
    runs, pos = [], 0
    while pos < len(counts):
        value, shift = 0, 0
        while True:
            if pos >= len(counts):
                raise DataError(f"{where}: compressed RLE 'counts' ends inside a run length")
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                raise DataError(f"{where}: compressed RLE 'counts' has an invalid character {counts[pos]!r}")
            value |= (c & 0x1F) << shift
            pos, shift = pos + 1, shift + 5
            if not c & 0x20:
                if c & 0x10:
                    value |= -1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_runs(runs: list, height: int, width: int, where: str) -> None:
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise DataError(f"{where}: RLE run lengths are negative or do not add up to height x width "
                        f"{height}x{width} = {height * width}")


def _check_rle(seg: dict, height: int, width: int, where: str) -> dict:
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)) or size != [height, width]:
        raise DataError(f"{where}: RLE 'size' is {size!r}; expected the image's [height, width] [{height}, {width}]")
    if isinstance(counts, list):
        if not all(_is_int(v) for v in counts):
            raise DataError(f"{where}: uncompressed RLE 'counts' must be a list of integers")
        _check_runs(counts, height, width, where)
    elif isinstance(counts, str):
        _check_runs(rle_string_counts(counts, where), height, width, where)
    else:
        raise DataError(f"{where}: RLE 'counts' is a {type(counts).__name__}; expected a list of run lengths "
                        f"(uncompressed) or a string (compressed)")
    return {"size": [height, width], "counts": counts}


def _check_polygons(seg: list, where: str) -> list:
    """The polygons with at least 3 points, as lists of floats; DataError for a malformed one."""
    kept = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or not set(map(type, poly)) <= {int, float} \
                or not all(map(math.isfinite, poly)) or len(poly) % 2:
            raise DataError(f"{where}: polygon {k} must be an even-length list of finite numbers "
                            f"[x1, y1, x2, y2, ...]; got {str(poly)[:80]}")
        if len(poly) >= 6:  # fewer than 3 points: no area
            kept.append([float(v) for v in poly])
    return kept


def check_segmentation(seg, height: int, width: int, where: str):
    """A checked 'segmentation' value: polygons (list) or RLE (dict, its size the image's)."""
    if isinstance(seg, list):
        return _check_polygons(seg, where)
    if isinstance(seg, dict):
        return _check_rle(seg, height, width, where)
    raise DataError(f"{where}: is {'missing' if seg is None else type(seg).__name__}; expected a list of "
                    f"polygons or an RLE object {{'size', 'counts'}}")


# ------------------------------------------------------------------------------------ annotations
def parse_annotation(i: int, ann, path: Path, records: dict, categories: Categories) -> tuple:
    """(image id, Instance) of ``annotations[i]``, every field it uses checked."""
    where = f"{path}: 'annotations'[{i}]"
    if not isinstance(ann, dict):
        raise DataError(f"{where}: expected an object, got {type(ann).__name__}")
    where += f" (id {ann.get('id')!r})"
    image_id, cat_id, crowd = ann.get("image_id"), ann.get("category_id"), ann.get("iscrowd", 0)
    if not _is_int(image_id) or image_id not in records:
        raise DataError(f"{where}: field 'image_id' {image_id!r} is not the id of an image in 'images'")
    if _is_int(cat_id) and cat_id in categories.unmapped:
        raise DataError(f"{where}: field 'category_id' {cat_id} is category {categories.unmapped[cat_id]!r}, "
                        f"which is not a class of --classes {categories.classes.name!r}")
    if not _is_int(cat_id) or cat_id not in categories.labels:
        raise DataError(f"{where}: field 'category_id' {cat_id!r} is "
                        f"{'missing' if 'category_id' not in ann else 'not one of the ids in categories'}")
    if not _is_int(crowd) or crowd not in (0, 1):
        raise DataError(f"{where}: field 'iscrowd' is {crowd!r}; expected 0 or 1")
    _, _, height, width = records[image_id]
    seg = check_segmentation(ann.get("segmentation"), height, width, f"{where}: field 'segmentation'")
    return image_id, Instance(categories.labels[cat_id], bool(crowd), seg)


@dataclass(frozen=True)
class CocoSplit:
    """A checked annotation file: the images to shard (sorted by key), the ones skipped and its
    categories (class set and id -> class index)."""
    annotations: Path
    image_root: Path
    images: tuple
    skipped: tuple
    categories: Categories


def read_split(coco_root: PathLike, split: str, classes: Optional[ClassSet] = None) -> CocoSplit:
    """Read and check ``instances_<split>.json`` completely (DataError naming file and field);
    ``classes``: the ``--classes`` override of the file's categories (:func:`category_classes`)."""
    S.check_key(split, "--coco-split")
    path = annotation_path(coco_root, split)
    root = image_root(coco_root, split)
    if not root.is_dir():
        raise DataError(f"{root}: image folder of split {split!r} not found (expected COCO/{split}/*.jpg)")
    data = load_annotation_file(path)
    images, anns, cats = (_list_field(data, f, path) for f in ("images", "annotations", "categories"))
    categories = category_classes(cats, path, classes)
    records = image_records(images, path)
    per_image = {image_id: [] for image_id in records}
    for i, ann in enumerate(anns):
        image_id, instance = parse_annotation(i, ann, path, records, categories)
        per_image[image_id].append(instance)
    kept, skipped = [], []
    for image_id, (key, file_name, height, width) in records.items():
        instances = per_image[image_id]
        if not instances:
            skipped.append({"id": key, "error": NO_ANNOTATIONS})
        elif all(inst.crowd for inst in instances):
            skipped.append({"id": key, "error": ONLY_CROWD})
        else:
            kept.append(CocoImage(key, file_name, height, width, tuple(instances)))
    kept.sort(key=lambda im: im.key)
    skipped.sort(key=lambda s: s["id"])
    return CocoSplit(path, root, tuple(kept), tuple(skipped), categories)


# ------------------------------------------------------------------------------- labels and masks
def image_labels(image: CocoImage) -> list:
    """Sorted class indices with at least one non-crowd annotation."""
    return sorted({inst.label for inst in image.instances if not inst.crowd})


def instance_rles(segmentation, height: int, width: int) -> list:
    """pycocotools RLEs of one checked segmentation (as ``COCO.annToRLE`` builds them)."""
    if isinstance(segmentation, list):
        return mask_utils.frPyObjects(segmentation, height, width) if segmentation else []
    if isinstance(segmentation["counts"], list):
        return [mask_utils.frPyObjects(segmentation, height, width)]
    return [segmentation]


def union_mask(segmentations: list, height: int, width: int) -> np.ndarray:
    """bool (H, W): the pixels of any of ``segmentations``."""
    rles = [r for seg in segmentations for r in instance_rles(seg, height, width)]
    if not rles:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(mask_utils.merge(rles, intersect=False)).astype(bool)


def semantic_mask(image: CocoImage) -> np.ndarray:
    """uint8 (H, W): the mask rule of the module docstring (one class -> it, several -> 255,
    only crowd -> 255, nothing -> 0)."""
    h, w = image.height, image.width
    by_class: dict = {}
    for inst in image.instances:
        if not inst.crowd:
            by_class.setdefault(inst.label, []).append(inst.segmentation)
    owner = np.zeros((h, w), dtype=np.uint8)
    claims = np.zeros((h, w), dtype=np.uint8)  # how many different classes cover a pixel (<= 254)
    for label in sorted(by_class):
        covered = union_mask(by_class[label], h, w)
        owner[covered] = label
        claims += covered
    crowd = union_mask([inst.segmentation for inst in image.instances if inst.crowd], h, w)
    mask = np.where(claims == 1, owner, 0).astype(np.uint8)
    mask[claims >= 2] = IGNORE_INDEX
    mask[(claims == 0) & crowd] = IGNORE_INDEX
    return mask


# --------------------------------------------------------------------------------------- samples
class CocoBuilder:
    """A :class:`CocoImage` -> its raw sample (the JPEG checked against the record's size; the mask
    checked against ``classes``; with ``saliency_root``, the user's saliency map ``<id>.png`` /
    ``.jpg`` of the same size: COCO ships none, the EPS methods need them)."""

    def __init__(self, root: PathLike, saliency_root: Optional[PathLike] = None, classes: ClassSet = COCO):
        self.root = Path(root)
        self.saliency_root = Path(saliency_root) if saliency_root else None
        self.classes = classes

    def __call__(self, image: CocoImage) -> dict:
        path = safe_join(self.root, image.file_name)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{image.key}: {path}: cannot read ({e.strerror or e})") from e
        size = S.open_jpeg(data, f"{image.key}: {path}").size
        if size != (image.width, image.height):
            raise DataError(f"{image.key}: {path}: image is {size[0]}x{size[1]}; the annotation file says "
                            f"{image.width}x{image.height}")
        sample = {S.KEY: image.key, S.IMAGE: data, S.LABELS: S.encode_labels(image_labels(image)),
                  S.MASK: encode_label_png(semantic_mask(image), self.classes)}
        if self.saliency_root is not None:
            sample[S.SALIENCY] = self._saliency(image, size)
        return sample

    def _saliency(self, image: CocoImage, size: tuple) -> bytes:
        candidates = [safe_join(self.saliency_root, f"{image.key}{ext}") for ext in (".png", ".jpg")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{image.key}: saliency map not found (looked for {candidates[0]})")
        data = path.read_bytes()
        S.open_saliency(data, str(path), size)
        return data


def _missing_images(split: CocoSplit) -> list:
    return [{"id": im.key, "error": f"{im.key}: image not found ({split.image_root / im.file_name})"}
            for im in split.images if not safe_join(split.image_root, im.file_name).is_file()]


def category_ids(categories: Categories) -> list:
    """The category id of each class 1..K (None for a ``--classes`` class no category names)."""
    by_label = {label: cat_id for cat_id, label in categories.labels.items()}
    return [by_label.get(k) for k in range(1, categories.classes.num_fg + 1)]


def shard_coco(coco_root: PathLike, split: str, out: PathLike, *, shard_size: int = 1000, workers: int = 1,
               skip_bad: bool = False, name: Optional[str] = None, progress: bool = True,
               saliency_root: Optional[PathLike] = None, classes: Optional[ClassSet] = None) -> dict:
    """Write the shards of one COCO-format split into ``out`` (``{name}-{k:06d}.tar``, name = the
    split); returns the index (also written as index.json). Its ``classes`` is the file's class set
    (:func:`category_classes`; ``classes`` overrides it), also written as ``out/classes.json``;
    ``sources.category_ids`` lists the category id of each class 1..K. Nothing is written when the
    annotation file is bad, an image is missing (unless ``skip_bad``) or a sample is bad (unless
    ``skip_bad``)."""
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: expected >= 1")
    if saliency_root is not None and not Path(saliency_root).is_dir():
        raise DataError(f"--saliency-root {saliency_root}: not a folder")
    name = S.check_key(name or split, "shard name")
    data = read_split(coco_root, split, classes)
    class_set = data.categories.classes
    missing = _missing_images(data)
    if missing and not skip_bad:
        raise DataError(_bad_summary(missing))
    lost = {m["id"] for m in missing}
    items = [(im.key, im) for im in data.images if im.key not in lost]
    sources = {"coco_root": str(Path(coco_root).resolve()), "annotations": str(data.annotations.resolve()),
               "split": split, "saliency_root": str(Path(saliency_root).resolve()) if saliency_root else None,
               "category_ids": category_ids(data.categories)}
    members = MEMBERS + ((S.SALIENCY,) if saliency_root else ())

    def make_index(results: list, bad: list) -> dict:
        skipped = sorted([*data.skipped, *missing, *bad], key=lambda s: s["id"])
        return base_index(name, results, skipped, shard_size, class_set, members, sources,
                          has_saliency=saliency_root is not None)

    sal = str(saliency_root) if saliency_root else None
    index = write_shards(out, name, items, CocoBuilder(data.image_root, sal, class_set), CocoBuilder,
                         (str(data.image_root), sal, class_set), shard_size=shard_size, workers=workers,
                         skip_bad=skip_bad, progress=progress, make_index=make_index)
    save_classes(Path(out) / CLASSES_FILE, class_set)  # what evaluate / make_seeds look for beside data
    return index
