"""A dataset over VOC / SBD folder trees: the shard writer's input, and a loader for users without shards.

Where each part of a sample comes from (first match wins):
  * image:    ``VOC/JPEGImages/ID.jpg``, then ``SBD/img/ID.jpg``
  * mask:     ``VOC/SegmentationClass/ID.png``, then ``SBD/cls/ID.mat`` (converted), else none
  * labels:   the cls_labels file when given (an id missing there is an error), else
              ``VOC/Annotations/ID.xml``, else the classes present in the mask, else an error
  * saliency: ``SALIENCY/ID.png`` (or ``.jpg``) when a saliency root is given (then required)
Every path is built with :func:`hsc_fast.data.voc.safe_join`, so a list id cannot escape its root.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from hsc_fast.classes import CLASSES_FILE, VOC, ClassSet
from hsc_fast.classes import load as load_classes
from hsc_fast.errors import DataError
from hsc_fast.data.voc import (check_id, classes_in_mask, encode_label_png, load_cls_labels, multihot_to_classes,
                   parse_voc_xml, read_id_list, read_label_png, read_sbd_mat, safe_join)
from hsc_fast.data import samples as S

PathLike = Union[str, os.PathLike]


def find_voc_root(root: PathLike) -> Path:
    """The folder holding JPEGImages/: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = Path(root)
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(f"{root}: not a VOC root (expected a JPEGImages/ folder in it, or in VOC2012/ below it)")


@dataclass(frozen=True)
class SamplePaths:
    """Where the parts of one sample live (None: absent)."""
    image: Path
    mask: Optional[Path]
    xml: Optional[Path]
    saliency: Optional[Path]


def _first_existing(*paths: Optional[Path]) -> Optional[Path]:
    return next((p for p in paths if p is not None and p.is_file()), None)


class FolderDataset:
    """Map-style dataset over a VOC tree (+ SBD, labels, saliency).

    ``ds[i]`` -> ``(key, image uint8 (H, W, 3), label float32 (K,), mask uint8 (H, W) or None)``;
    ``ds.raw_sample(id)`` -> the shard-format dict of bytes (see :mod:`hsc_fast.data.samples`).
    ``ds.class_set``: VOC, or the set of a ``classes.json`` in the VOC root (a VOC-layout tree of
    another dataset, e.g. the synthetic set with K classes); every label file is read against it.
    """

    def __init__(self, voc_root: PathLike, id_list: Union[PathLike, Sequence[str]], sbd_root: Optional[PathLike] = None,
                 cls_labels: Union[PathLike, dict, None] = None, saliency_root: Optional[PathLike] = None):
        self.voc_root = find_voc_root(voc_root)
        self.class_set = folder_classes(self.voc_root)
        self.sbd_root = Path(sbd_root) if sbd_root else None
        self.saliency_root = Path(saliency_root) if saliency_root else None
        if self.saliency_root is not None and not self.saliency_root.is_dir():
            raise DataError(f"{self.saliency_root}: saliency root is not a folder")
        if isinstance(id_list, (str, os.PathLike)):
            self.ids = read_id_list(id_list)
        else:
            self.ids = [check_id(i, "id list") for i in id_list]
        if isinstance(cls_labels, dict) or cls_labels is None:
            self.labels = cls_labels
        else:
            self.labels = load_cls_labels(cls_labels, self.class_set)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_saliency(self) -> bool:
        return self.saliency_root is not None

    # ---------------------------------------------------------------------------- locating files
    def paths(self, image_id: str) -> SamplePaths:
        """The files of ``image_id``; DataError (naming the id and the places looked) if no image."""
        voc, sbd = self.voc_root, self.sbd_root
        jpg_voc = safe_join(voc, "JPEGImages", f"{image_id}.jpg")
        jpg_sbd = safe_join(sbd, "img", f"{image_id}.jpg") if sbd else None
        image = _first_existing(jpg_voc, jpg_sbd)
        if image is None:
            looked = " or ".join(str(p) for p in (jpg_voc, jpg_sbd) if p is not None)
            raise DataError(f"{image_id}: image not found (looked for {looked})")
        mask = _first_existing(safe_join(voc, "SegmentationClass", f"{image_id}.png"),
                               safe_join(sbd, "cls", f"{image_id}.mat") if sbd else None)
        xml = _first_existing(safe_join(voc, "Annotations", f"{image_id}.xml"))
        saliency = None
        if self.saliency_root is not None:
            cands = [safe_join(self.saliency_root, f"{image_id}{ext}") for ext in (".png", ".jpg")]
            saliency = _first_existing(*cands)
            if saliency is None:
                raise DataError(f"{image_id}: saliency map not found (looked for {cands[0]})")
        return SamplePaths(image, mask, xml, saliency)

    # ------------------------------------------------------------------------------ reading parts
    def read_mask(self, path: Path) -> np.ndarray:
        """uint8 (H, W) class mask from a VOC PNG or an SBD .mat."""
        return read_sbd_mat(path, self.class_set) if path.suffix == ".mat" else read_label_png(path, self.class_set)

    def classes(self, image_id: str, paths: SamplePaths, mask: Optional[np.ndarray] = None) -> list[int]:
        """Sorted class indices 1..K of ``image_id`` (see the module docstring for the order of sources)."""
        if self.labels is not None:
            if image_id not in self.labels:
                raise DataError(f"{image_id}: no image-level label in the cls_labels file")
            return multihot_to_classes(self.labels[image_id])
        if paths.xml is not None:
            return parse_voc_xml(paths.xml, self.class_set)
        if paths.mask is not None:
            return classes_in_mask(self.read_mask(paths.mask) if mask is None else mask, self.class_set)
        raise DataError(f"{image_id}: no label source (no cls_labels file, no {self.voc_root}/Annotations/"
                        f"{image_id}.xml and no segmentation mask)")

    def _mask_png(self, image_id: str, path: Path, mask: np.ndarray) -> bytes:
        """The mask as palette PNG bytes: the original file when it already is one, else re-encoded."""
        if path.suffix == ".png":
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                if im.mode == "P":
                    return data
        return encode_label_png(mask, self.class_set)

    def raw_sample(self, image_id: str, with_mask: bool = True, validate: bool = False) -> dict:
        """The shard-format dict of ``image_id``.

        ``validate``: decode the image, mask and saliency fully and check their sizes agree (the
        shard writer does this so a bad file is found before anything is published). Errors are
        DataError naming the id and the file.
        """
        try:
            return self._raw_sample(image_id, with_mask, validate)
        except DataError as e:
            msg = str(e)
            raise DataError(msg if msg.startswith(f"{image_id}:") else f"{image_id}: {msg}") from e
        except OSError as e:
            raise DataError(f"{image_id}: {e.filename or ''}: cannot read ({e.strerror or e})") from e

    def _raw_sample(self, image_id: str, with_mask: bool, validate: bool) -> dict:
        S.check_key(image_id, "id list")
        paths = self.paths(image_id)
        sample = {S.KEY: image_id, S.IMAGE: paths.image.read_bytes()}
        size = S.open_jpeg(sample[S.IMAGE], str(paths.image)).size if validate else None
        mask = None
        if paths.mask is not None and (with_mask or (self.labels is None and paths.xml is None)):
            mask = self.read_mask(paths.mask)
            if size is not None and mask.shape != (size[1], size[0]):
                raise DataError(f"{paths.mask}: mask is {mask.shape[1]}x{mask.shape[0]}; expected the image size "
                                f"{size[0]}x{size[1]}")
            if with_mask:
                sample[S.MASK] = self._mask_png(image_id, paths.mask, mask)
        sample[S.LABELS] = S.encode_labels(self.classes(image_id, paths, mask))
        if paths.saliency is not None:
            sample[S.SALIENCY] = paths.saliency.read_bytes()
            if validate:
                S.open_saliency(sample[S.SALIENCY], str(paths.saliency), size)
        return sample

    # ---------------------------------------------------------------------------- decoded access
    def __getitem__(self, index: int):
        image_id = self.ids[index]
        return decode_eval_sample(self.raw_sample(image_id, with_mask=True), self.class_set)


def folder_classes(voc_root: Path) -> ClassSet:
    """The class set of a VOC-layout tree: its ``classes.json`` when it has one, else VOC."""
    path = Path(voc_root) / CLASSES_FILE
    return load_classes(path) if path.is_file() else VOC


def decode_eval_sample(sample: dict, classes: ClassSet = VOC):
    """A raw sample -> ``(key, image uint8 (H, W, 3), label float32 (K,), mask uint8 (H, W) or None)``."""
    where = S.sample_where(sample)
    image = np.asarray(S.open_jpeg(S.member(sample, S.IMAGE, where), where))
    label = S.decode_labels(S.member(sample, S.LABELS, where), where, classes)
    mask = S.decode_mask(sample[S.MASK], where, classes) if sample.get(S.MASK) is not None else None
    return sample[S.KEY], image, label, mask
