"""AffinityNet training samples (stage refine, step 2): image + affinity label, by id.

PSA's train_aff.py / voc12/data.py ``VOC12AffDataset`` order, which this follows:
ColorJitter on the whole image (``refine.color_jitter``), no rescale (``refine.scale_range``
[1, 1]), a random crop of image and targets together -- a window of a larger image, or the image
at a random offset in a crop-sized container (imutils.RandomCrop) -- with the image padded black
before normalisation (``refine.crop_pad: black``; ``normalized_zero`` pads 0 after it), then a
horizontal flip of both.

Targets (``refine.label_pooling``):
* ``scores`` (PSA): the two CRF score maps stored per image (``{id}.npz``: low, high, keys), cropped
  with 0 padding, average-pooled 8x8 and turned into labels by PSA's rule
  (hsc_fast.eval.affinity_labels.affinity_label_from_scores) -> a label at feature resolution.
* ``vote``: a stride-1 label PNG, padded 255; the trainer takes each 8x8 block's most frequent label.
Disk: the scores are float32, (K+1) x H x W x 2 per image (~4.5 MB for a 500x375 VOC photo with
two classes, before compression), as PSA's la/ha .npy files.
"""
from __future__ import annotations

import io as _bytes_io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsc_fast import io
from hsc_fast.classes import IGNORE_INDEX
from hsc_fast.errors import DataError

SCORES_EXT = "npz"
FEATURE_STRIDE = 8


# ------------------------------------------------------------------------------ stored CRF scores
def save_affinity_scores(path, low: np.ndarray, high: np.ndarray, keys) -> None:
    """{id}.npz: the low- and high-alpha CRF scores ((K+1, H, W) float32, bg first) and the keys."""
    buf = _bytes_io.BytesIO()
    np.savez_compressed(buf, low=np.asarray(low, np.float32), high=np.asarray(high, np.float32),
                        keys=np.asarray(keys, np.int64).reshape(-1))
    io.atomic_write_bytes(Path(path), buf.getvalue())


def load_affinity_scores(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            low, high, keys = z["low"], z["high"], z["keys"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not an affinity score file (low, high, keys): {e}") from None
    if low.shape != high.shape or low.ndim != 3 or low.shape[0] != keys.size + 1:
        raise DataError(f"{path}: expected two (K+1, H, W) score maps for K = {keys.size} keys, got "
                        f"{low.shape} and {high.shape}")
    return low, high, keys


def scores_to_label(low: np.ndarray, high: np.ndarray, keys, stride: int = FEATURE_STRIDE) -> np.ndarray:
    """PSA's label of a cropped sample: both score maps pooled stride x stride (zero padding at the
    bottom/right), then the rule; uint8 (ceil(H/s), ceil(W/s))."""
    from hsc_fast.eval.affinity_labels import affinity_label_from_scores, downsample_scores
    return affinity_label_from_scores(downsample_scores(low, stride), downsample_scores(high, stride), keys)


# ------------------------------------------------------------------------------ PSA's random crop
def psa_crop_box(height: int, width: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(container top, container left, image top, image left) of imutils.RandomCrop: a random window
    of an image larger than the crop, or the image at a random offset in the crop-sized container."""
    def axis(size):
        space = size - crop
        return (0, int(rng.integers(0, space + 1))) if space > 0 else (int(rng.integers(0, -space + 1)), 0)
    (ct, it), (cl, il) = axis(height), axis(width)
    return ct, cl, it, il


def crop_with_box(x: torch.Tensor, box: Sequence[int], crop: int, fill) -> torch.Tensor:
    """(C, H, W) -> (C, crop, crop): the box's window in a container filled with ``fill`` (a number
    or one value per channel)."""
    ct, cl, it, il = box
    c, h, w = x.shape
    ch, cw = min(crop, h), min(crop, w)
    fill = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1)
    out = fill.expand(c, crop, crop).clone()
    out[:, ct:ct + ch, cl:cl + cw] = x[:, it:it + ch, il:il + cw]
    return out


def pad_fill(crop_pad: str, mean, std) -> torch.Tensor:
    """The normalised value of a padded pixel: 0 (normalized_zero) or black, (0 - mean) / std."""
    if crop_pad == "black":
        return (0.0 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return torch.zeros(3)


# ------------------------------------------------------------------------------ the dataset
class AffinityTrainSet(torch.utils.data.Dataset):
    """{"img": (3, crop, crop) float, "label": int64 (crop, crop) (vote) or (crop/8, crop/8)
    (scores), "key"}; deterministic per (seed, epoch, index)."""

    def __init__(self, ids: Sequence[str], read_image: Callable[[str], np.ndarray], target_dir, *, crop: int,
                 scale_range: Sequence[float], flip: bool, color_jitter: Sequence[float], crop_pad: str,
                 label_pooling: str, seed: int = 0, classes=None):
        from hsc_fast.classes import VOC
        self.ids, self.read_image, self.target_dir = list(ids), read_image, Path(target_dir)
        self.crop, self.scale_range, self.flip = crop, tuple(scale_range), flip
        self.color_jitter, self.crop_pad, self.label_pooling = list(color_jitter), crop_pad, label_pooling
        self.seed, self.classes, self.epoch = seed, classes or VOC, 0

    def __len__(self):
        return len(self.ids)

    def target_path(self, key: str) -> Path:
        from hsc_fast.data.voc import safe_join
        return Path(safe_join(self.target_dir, f"{key}.{SCORES_EXT if self.label_pooling == 'scores' else 'png'}"))

    def _targets(self, key: str) -> tuple[torch.Tensor, np.ndarray]:
        """(C, H, W) float targets and the score keys (scores: [low; high]; vote: the label as one channel)."""
        path = self.target_path(key)
        if not path.is_file():
            raise DataError(f"no affinity label for id '{key}': expected {path}")
        if self.label_pooling == "scores":
            low, high, keys = load_affinity_scores(path)
            return torch.from_numpy(np.concatenate([low, high])), keys
        from hsc_fast.data.voc import read_label_png
        return torch.from_numpy(read_label_png(path, self.classes).astype(np.float32))[None], np.zeros(0, np.int64)

    def __getitem__(self, i):
        from PIL import Image

        from hsc_fast.data.seg_set import IMAGENET_MEAN, IMAGENET_STD, normalize_image
        from hsc_fast.data.transforms import jitter
        key = self.ids[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = self.read_image(key)
        target, keys = self._targets(key)
        if img.shape[:2] != tuple(target.shape[-2:]):
            raise DataError(f"id '{key}': image {img.shape[:2]} and affinity label {tuple(target.shape[-2:])} differ")
        if self.color_jitter and any(self.color_jitter):
            img = np.array(jitter(Image.fromarray(img), self.color_jitter, rng))
        x = normalize_image(img)
        x, target = self._rescale(x, target, rng)
        box = psa_crop_box(x.shape[1], x.shape[2], self.crop, rng)
        scores = self.label_pooling == "scores"
        x = crop_with_box(x, box, self.crop, pad_fill(self.crop_pad, IMAGENET_MEAN, IMAGENET_STD))
        target = crop_with_box(target, box, self.crop, 0.0 if scores else float(IGNORE_INDEX))
        if self.flip and rng.random() < 0.5:
            x, target = x.flip(-1), target.flip(-1)
        if scores:
            low, high = np.split(target.numpy(), 2)
            label = torch.from_numpy(scores_to_label(low, high, keys).astype(np.int64))
        else:
            label = target[0].long()
        return {"img": x.contiguous(), "label": label, "key": key}

    def _rescale(self, x: torch.Tensor, target: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        if lo == hi == 1.0:   # PSA: no rescale (and no resampling at all)
            return x, target
        scale = float(rng.uniform(lo, hi))
        h, w = x.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        mode = "bilinear" if self.label_pooling == "scores" else "nearest"
        target = F.interpolate(target[None], size=size, mode=mode, **({"align_corners": False}
                                                                     if mode == "bilinear" else {}))[0]
        return x, target
