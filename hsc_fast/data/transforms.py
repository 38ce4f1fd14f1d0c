"""The two-view training transform of the reference recipe, and its device-side helpers.

View 1 (per sample, in the loader workers), as the authors' ``dataset.py`` / ``imutils.py``: the whole
image resized (PIL bicubic) to a random long side L in [448, 768] with the short side
``int(round(short * L / long))``, horizontal flip, colour jitter (0.3, 0.3, 0.3, 0.1; the four
adjustments in random order with torchvision's factor ranges) of the whole resized image, then a
random 448 crop with padding. A saliency map is resized bicubic as the image (the authors resize it
as an RGB image and average the channels: for a grey map that is the same value). The workers hand
over uint8 images (4x less to copy between processes and to the GPU); :func:`finish_batch` then
applies the ImageNet normalisation on the training device (the authors' float64 values bit for bit,
see :func:`normalization_table`), with the padding set to 0 *after* it (as the reference, which pads
the normalised image with 0); saliency is padded with 0. View 2 (per batch, on the device):
:func:`make_view2`.

``data.resize_mode: window`` is a faster variant (benchmarks/bench_loader.py), not the authors':
  * only the crop window is resized (PIL ``resize(box=...)`` maps exactly that part of the source,
    the filter reaching outside it as in a full resize, but its sampling grid starts at the
    window, not at the image corner): NOT the same pixels as the whole resize + crop -- up to 7 grey
    levels apart on 7.6 % of a portrait's pixels (issue 25; docs/_incoming/infer.md);
  * jitter runs on the crop, not on the whole resized image. Brightness, saturation, hue and the
    clamping are per-pixel, so this is exact for them; contrast blends with the mean grey, which
    is taken over the crop window instead of the whole image.
In both modes hue is a rotation of the colour about the grey axis by 2*pi*h (a 3x3 colour matrix, as
NVIDIA DALI's hue) instead of torchvision's HSV round trip, which costs ~5x more and dominated the
whole transform. It agrees with the HSV shift to ~3 grey levels on average at h = 0.05 (~6 at the
extreme 0.1). Brightness, contrast and saturation are torchvision's own functions.
All randomness comes from the ``rng`` passed in, so a sample's augmentation depends only on
(seed, epoch, rank, worker, sample index): see the loader.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from hsc_fast.errors import ConfigError


RESIZE_MODES = ("whole", "window")


@dataclass(frozen=True)
class ViewDraw:
    """The random geometry of one view 1: the long side drawn, the whole image's resized size
    (w, h), the crop window's start (x, y) in the resized image and its content size (w, h), the
    content's offset (x, y) inside the padded crop, and the horizontal flip."""
    long_side: int
    resized: tuple
    start: tuple
    size: tuple
    offset: tuple
    flip: bool

    def source_box(self, width: int, height: int) -> tuple:
        """The crop window in source pixels (x0, y0, x1, y1): the part of a ``width`` x ``height``
        image that the window covers after the resize (for PIL ``resize(box=...)``). ``start`` is
        in the resized image after the flip (the authors crop the flipped image): mirrored here."""
        sx, sy = width / self.resized[0], height / self.resized[1]
        (x, y), (w, h) = self.start, self.size
        if self.flip:
            x = self.resized[0] - x - w
        return (x * sx, y * sy, (x + w) * sx, (y + h) * sy)


def resized_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) with the long side ``long_side`` and the short side rounded as the authors do
    (``int(round(short * L / long))``, a square counts as wide); at least 1 pixel."""
    if width < height:
        return max(1, int(round(width * long_side / height))), long_side
    return long_side, max(1, int(round(height * long_side / width)))


def _axis_window(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(start in the resized image, length of the content, offset in the crop) for one axis, as
    the authors' random crop: a random window when the image is larger, a random placement when smaller."""
    if length > crop:
        return int(rng.integers(0, length - crop + 1)), crop, 0
    return 0, length, int(rng.integers(0, crop - length + 1))


def draw_view(width: int, height: int, resize_long: Sequence[int], crop: int, flip: bool,
              rng: np.random.Generator) -> ViewDraw:
    """Random long side in [min, max] (inclusive), random crop window, random flip (p = 0.5)."""
    target = int(rng.integers(int(resize_long[0]), int(resize_long[1]) + 1))
    new_w, new_h = resized_size(width, height, target)
    x0, cw, ox = _axis_window(new_w, crop, rng)
    y0, ch, oy = _axis_window(new_h, crop, rng)
    return ViewDraw(target, (new_w, new_h), (x0, y0), (cw, ch), (ox, oy), bool(flip and rng.random() < 0.5))


def jitter(img: Image.Image, strength: Sequence[float], rng: np.random.Generator) -> Image.Image:
    """torchvision ColorJitter semantics (factor ranges and random order) with our own rng."""
    b, c, s, h = (float(v) for v in strength)
    ops = []
    if b > 0:
        ops.append((TF.adjust_brightness, rng.uniform(max(0.0, 1 - b), 1 + b)))
    if c > 0:
        ops.append((TF.adjust_contrast, rng.uniform(max(0.0, 1 - c), 1 + c)))
    if s > 0:
        ops.append((TF.adjust_saturation, rng.uniform(max(0.0, 1 - s), 1 + s)))
    if h > 0:
        ops.append((rotate_hue, rng.uniform(-h, h)))
    for i in rng.permutation(len(ops)):
        fn, factor = ops[i]
        img = fn(img, float(factor))
    return img


def rotate_hue(img: Image.Image, factor: float) -> Image.Image:
    """Rotate colours about the grey axis by ``2 pi factor`` (one C pass; clamps to 0..255).
    Same direction and range as torchvision's hue factor (see the module docstring)."""
    theta = 2.0 * math.pi * float(factor)
    c, s = math.cos(theta), math.sin(theta)
    k, q = (1.0 - c) / 3.0, math.sqrt(1.0 / 3.0) * s
    return img.convert("RGB", (c + k, k - q, k + q, 0.0,
                               k + q, c + k, k - q, 0.0,
                               k - q, k + q, c + k, 0.0))


class TwoViewTransform:
    """Per-sample view-1 transform: PIL RGB image (+ grey saliency) -> padded uint8 crops.

    Returns ``{"img": uint8 (3, S, S), "valid": bool (1, S, S), "sal": uint8 (1, S, S)}`` (``sal``
    only with a saliency map); pixels outside ``valid`` are crop padding (0 everywhere).
    :func:`finish_batch` turns a batch of these into the normalised float tensors.
    ``resize_mode`` (``data.resize_mode``): ``whole`` as the authors, ``window`` faster (module docstring).
    """

    def __init__(self, resize_long=(448, 768), crop_size=448, flip=True, color_jitter=(0.3, 0.3, 0.3, 0.1),
                 resize_mode="whole"):
        if len(resize_long) != 2 or not 0 < resize_long[0] <= resize_long[1]:
            raise ConfigError(f"data.resize_long = {list(resize_long)}: expected [min, max] with 0 < min <= max")
        if crop_size <= 0:
            raise ConfigError(f"data.crop_size = {crop_size}: expected a positive size")
        if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
            raise ConfigError(f"data.color_jitter = {list(color_jitter)}: expected 4 values >= 0, hue <= 0.5")
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"data.resize_mode = {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        self.resize_long = tuple(int(v) for v in resize_long)
        self.crop = int(crop_size)
        self.flip = bool(flip)
        self.color_jitter = tuple(float(v) for v in color_jitter)
        self.resize_mode = resize_mode

    @classmethod
    def from_config(cls, cfg) -> "TwoViewTransform":
        return cls(cfg.resize_long, cfg.crop_size, cfg.flip, cfg.color_jitter, cfg.resize_mode)

    def draw(self, width: int, height: int, rng: np.random.Generator) -> ViewDraw:
        return draw_view(width, height, self.resize_long, self.crop, self.flip, rng)

    def __call__(self, image: Image.Image, rng: np.random.Generator, saliency: Optional[Image.Image] = None) -> dict:
        return self.apply(image, self.draw(image.width, image.height, rng), rng, saliency)

    def apply(self, image: Image.Image, draw: ViewDraw, rng: np.random.Generator,
              saliency: Optional[Image.Image] = None) -> dict:
        """View 1 of ``image`` for the given geometry; ``rng`` draws the colour jitter."""
        if self.resize_mode == "whole":   # the authors' order: resize all, flip, jitter all (contrast: its mean), crop
            img = self._crop(jitter(self._whole(image, draw), self.color_jitter, rng), draw)
        else:                              # resize the window only, flip, jitter the crop
            img = jitter(self._window(image, draw), self.color_jitter, rng)
        out = {"img": self._place(img, 3, draw), "valid": self._valid(draw)}
        if saliency is not None:
            # bicubic like an RGB image (the authors'): a grey map resized as 'L' equals each channel of that
            out["sal"] = self._place(self._geometry(saliency, draw), 1, draw)
        return out

    def _geometry(self, image: Image.Image, draw: ViewDraw) -> Image.Image:
        """Resize, flip and crop without jitter (the saliency map's path)."""
        return self._crop(self._whole(image, draw), draw) if self.resize_mode == "whole" else self._window(image, draw)

    @staticmethod
    def _whole(image: Image.Image, draw: ViewDraw) -> Image.Image:
        """The authors' order: the whole image resized (bicubic), then flipped."""
        img = image.resize(draw.resized, Image.BICUBIC)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if draw.flip else img

    @staticmethod
    def _window(image: Image.Image, draw: ViewDraw) -> Image.Image:
        """Only the crop window resized (its source box; the filter reads past it as a full resize
        would, but the resampling grid differs), then flipped."""
        img = image.resize(draw.size, Image.BICUBIC, box=draw.source_box(image.width, image.height))
        return img.transpose(Image.FLIP_LEFT_RIGHT) if draw.flip else img

    @staticmethod
    def _crop(resized: Image.Image, draw: ViewDraw) -> Image.Image:
        (x, y), (w, h) = draw.start, draw.size
        return resized.crop((x, y, x + w, y + h))

    def _place(self, content: Image.Image, channels: int, draw: ViewDraw) -> torch.Tensor:
        """``content`` into a zero (C, S, S) uint8 canvas at the draw's offset."""
        (w, h), (ox, oy) = draw.size, draw.offset
        out = torch.zeros(channels, self.crop, self.crop, dtype=torch.uint8)
        arr = torch.from_numpy(np.array(content, dtype=np.uint8).reshape(h, w, channels))  # PIL arrays are read-only
        out[:, oy:oy + h, ox:ox + w] = arr.permute(2, 0, 1)
        return out

    def _valid(self, draw: ViewDraw) -> torch.Tensor:
        (w, h), (ox, oy) = draw.size, draw.offset
        out = torch.zeros(1, self.crop, self.crop, dtype=torch.bool)
        out[:, oy:oy + h, ox:ox + w] = True
        return out


@functools.lru_cache(maxsize=8)
def _normalization_table(mean: tuple, std: tuple) -> np.ndarray:
    """float32 (3, 256): entry [c, v] = ``(v / 255 - mean[c]) / std[c]`` computed in float64, then cast.

    This is the authors' normalisation (HSC/PSA ``Normalize``: numpy float64 arithmetic on the uint8
    array, stored as float32); a uint8 channel has only 256 values, so looking them up gives their
    result bit for bit, faster than the float64 arithmetic."""
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"normalisation mean {list(mean)} / std {list(std)}: expected 3 values each")
    values = np.arange(256, dtype=np.float64)[None, :] / 255.0
    return ((values - np.asarray(mean, np.float64)[:, None]) / np.asarray(std, np.float64)[:, None]).astype(np.float32)


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The (3, 256) float32 lookup table of :func:`_normalization_table` (read-only, cached)."""
    table = _normalization_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    table.flags.writeable = False
    return table


def normalize(img_u8: torch.Tensor, valid: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ImageNet-normalised (the authors' float64 values, see
    :func:`normalization_table`), 0 where ``valid`` (N, 1, H, W) is False."""
    table = torch.from_numpy(normalization_table(mean, std).copy()).to(img_u8.device).flatten()
    channel_base = torch.arange(0, 3 * 256, 256, device=img_u8.device).view(1, 3, 1, 1)
    x = table[img_u8.long().add_(channel_base)]
    return x.mul_(valid)


def finish_batch(batch: dict, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The device-side end of the transform: ``img`` -> normalised float, ``sal`` -> float in [0, 1]."""
    batch["img"] = normalize(batch["img"], batch["valid"], mean, std)
    if "sal" in batch:
        batch["sal"] = batch["sal"].float().div_(255.0)
    return batch


def make_view2(img: torch.Tensor, size: int) -> torch.Tensor:
    """View 2 of a batch: view 1 bilinearly resized to ``size`` x ``size`` (align_corners=True)."""
    return F.interpolate(img, size=(int(size), int(size)), mode="bilinear", align_corners=True)


def denormalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised (N, 3, H, W) float -> uint8 RGB (N, 3, H, W) on the same device."""
    m = torch.as_tensor(mean, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * s + m).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
