"""DeepLab stage pieces that do not depend on the training engine: data, augmentation, inference.

Training pairs are (image, pseudo-label PNG) by id; images come from any `id -> uint8 HWC` reader
(VOC/SBD folders or shards), labels from a folder of palette/index PNGs (pseudo-labels or ground
truth for comparison). The reference recipe (HSC `segmentation/`, YudeWang's codebase): HSV jitter,
flip, random scale 0.5-1.5 (cv2 cubic image, nearest label), ImageNet normalisation, crop 448 padded
with image 0 / label 255 at a random offset; test: scales 0.5-1.75 with flip resized by cv2 cubic,
softmax of the mean logits, optional CRF on the de-normalised image. Our variants stay selectable
(deeplab.scale_interp, hsv_jitter, crop_placement, test_resize, test_fusion, crf_image).

cv2 (opencv-python-headless) is imported only where a cv2_* choice is made: its INTER_CUBIC
(A = -0.75, replicated border, its own rounded output size, fixed-point arithmetic on uint8) and
its uint8 HSV conversion are what the authors ran; no torch/PIL resize reproduces them.
"""
from __future__ import annotations

import math
import tarfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsc_fast.classes import IGNORE_INDEX
from hsc_fast.data.transforms import normalization_table
from hsc_fast.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(img_uint8_hwc: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) ImageNet-normalised, as the authors compute it.

    HSC's ``inference.py`` (and PSA's / SEAM's ``Normalize``) evaluate ``(x / 255 - mean) / std`` in
    numpy float64 and store float32; this returns exactly those values (a per-channel lookup of the
    256 possible results, :func:`hsc_fast.data.transforms.normalization_table`). Computing in
    float32 instead differs by one float32 step on some values, which flipped 2 of 682k seed
    pixels at near-ties on four VOC photos (issue 25)."""
    img = np.asarray(img_uint8_hwc)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"normalize_image: expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    table = normalization_table(mean, std)
    return torch.from_numpy(table[np.arange(3)[:, None, None], img.transpose(2, 0, 1)])


def cv2_module():
    """OpenCV, or a DataError saying which package provides it."""
    try:
        import cv2
    except ImportError as e:
        raise DataError("the authors' DeepLab recipe (deeplab.scale_interp / hsv_jitter / test_resize = cv2 "
                        "choices) needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def reference_normalize(img_uint8_hwc: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 HWC -> float32 HWC, (x / 255 - mean) / std per channel in float32 (the DeepLab code's order)."""
    x = img_uint8_hwc.astype(np.float32)
    out = np.empty_like(x)
    for c in range(3):
        out[..., c] = (x[..., c] / np.float32(255) - np.float32(mean[c])) / np.float32(std[c])
    return out


def denormalized_uint8(x_hwc: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """The authors' CRF image: (x * std + mean) * 255 in float32, cast to uint8 by truncation."""
    out = np.empty_like(x_hwc, dtype=np.float32)
    for c in range(3):
        out[..., c] = x_hwc[..., c] * np.float32(std[c]) + np.float32(mean[c])
    return (out * np.float32(255)).astype(np.uint8)


def crf_image(img_uint8_hwc: np.ndarray, how: str = "original", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """The image the test-time CRF sees (deeplab.crf_image): the photo, or the authors' round trip."""
    if how == "original":
        return img_uint8_hwc
    if how == "denormalized":
        return denormalized_uint8(reference_normalize(img_uint8_hwc, mean, std), mean, std)
    raise DataError(f"deeplab.crf_image: {how!r} is not one of original, denormalized")


def hsv_jitter(img_uint8_hwc: np.ndarray, shifts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Shift hue (mod 180), saturation and value (clipped) of cv2's uint8 HSV by integers drawn
    uniformly from [-r, r] each."""
    cv2 = cv2_module()
    hsv = cv2.cvtColor(np.ascontiguousarray(img_uint8_hwc), cv2.COLOR_RGB2HSV).astype(np.int32)
    dh, ds, dv = (int(rng.integers(-int(r), int(r) + 1)) for r in shifts)
    hsv[..., 0] = (hsv[..., 0] + dh) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + dv, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _random_placement(x: torch.Tensor, y: torch.Tensor, crop: int, rng: np.random.Generator):
    """The authors' crop: per axis, a window of a larger image, or the image at a random offset
    of a crop-sized canvas (image 0, label 255)."""
    out_x = x.new_zeros((x.shape[0], crop, crop))
    out_y = y.new_full((crop, crop), IGNORE_INDEX)
    src, dst = [], []
    for size in x.shape[1:]:
        space = size - crop
        offset = int(rng.integers(0, abs(space) + 1))
        n = min(size, crop)
        src.append(slice(offset, offset + n) if space > 0 else slice(0, n))
        dst.append(slice(0, n) if space > 0 else slice(offset, offset + n))
    out_x[:, dst[0], dst[1]] = x[:, src[0], src[1]]
    out_y[dst[0], dst[1]] = y[src[0], src[1]]
    return out_x, out_y


def _corner_crop(x: torch.Tensor, y: torch.Tensor, crop: int, rng: np.random.Generator):
    """Pad at the bottom/right (image 0, label 255), then a random window."""
    nh, nw = y.shape
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
    top = int(rng.integers(0, x.shape[1] - crop + 1))
    left = int(rng.integers(0, x.shape[2] - crop + 1))
    return x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]


def seg_augment(img: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, crop: int,
                scale_range: Sequence[float], flip: bool = True, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, hsv: Sequence[int] = (0, 0, 0), interp: str = "bilinear",
                placement: str = "corner") -> tuple[torch.Tensor, torch.Tensor]:
    """(HSV jitter,) random scale, flip, normalise, random crop with padding (image 0 after
    normalisation, label 255). interp "cv2_cubic": the authors' order and arithmetic -- flip, cv2
    cubic of the uint8 image and cv2 nearest of the label, float32 normalisation; "bilinear":
    normalise, torch bilinear / nearest, flip. placement: "random" (the authors') or "corner"."""
    if img.shape[:2] != label.shape:
        raise DataError(f"image {img.shape[:2]} and label {label.shape} sizes differ")
    if any(hsv):
        img = hsv_jitter(img, hsv, rng)
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    if interp == "cv2_cubic":
        x, y = _rescale_cv2(img, label, scale, flip and rng.random() < 0.5, mean, std)
    elif interp == "bilinear":
        x, y = _rescale_torch(img, label, scale, flip, rng, mean, std)
    else:
        raise DataError(f"deeplab.scale_interp: {interp!r} is not one of cv2_cubic, bilinear")
    return (_random_placement if placement == "random" else _corner_crop)(x, y, crop, rng)


def _rescale_cv2(img, label, scale: float, mirrored: bool, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    cv2 = cv2_module()
    if mirrored:
        img, label = img[:, ::-1], label[:, ::-1]
    img = cv2.resize(np.ascontiguousarray(img), None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    label = cv2.resize(np.ascontiguousarray(label, dtype=np.uint8), None, fx=scale, fy=scale,
                       interpolation=cv2.INTER_NEAREST)
    x = torch.from_numpy(reference_normalize(img, mean, std)).permute(2, 0, 1).contiguous()
    return x, torch.from_numpy(label.astype(np.int64))


def _rescale_torch(img, label, scale: float, flip: bool, rng, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    x = normalize_image(img, mean, std)
    y = torch.from_numpy(label.astype(np.int64))
    h, w = label.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    y = F.interpolate(y[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    if flip and rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x, y


class SegTrainSet(torch.utils.data.Dataset):
    """(image, label) pairs by id with the DeepLab augmentation; deterministic per (seed, index, epoch)."""

    def __init__(self, ids: Sequence[str], read_image: Callable[[str], np.ndarray], label_dir: str,
                 *, crop: int, scale_range: Sequence[float], flip: bool = True, seed: int = 0, classes=None,
                 hsv: Sequence[int] = (0, 0, 0), interp: str = "bilinear", placement: str = "corner"):
        from hsc_fast.classes import VOC
        from hsc_fast.data.voc import read_label_png, safe_join
        self.ids = list(ids)
        self.read_image = read_image
        self.label_dir = Path(label_dir)
        self.classes = classes or VOC  # label PNGs hold 0..K and 255
        self._read_label = read_label_png
        self._safe_join = safe_join
        self.crop, self.scale_range, self.flip, self.seed = crop, scale_range, flip, seed
        self.hsv, self.interp, self.placement = tuple(hsv), interp, placement
        self.epoch = 0

    def __len__(self):
        return len(self.ids)

    def label_path(self, key: str) -> Path:
        return Path(self._safe_join(self.label_dir, f"{key}.png"))

    def __getitem__(self, i):
        key = self.ids[i]
        path = self.label_path(key)
        if not path.is_file():
            raise DataError(f"no label PNG for id '{key}': expected {path}")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        x, y = seg_augment(self.read_image(key), self._read_label(path, self.classes), rng, crop=self.crop,
                           scale_range=self.scale_range, flip=self.flip, hsv=self.hsv, interp=self.interp,
                           placement=self.placement)
        return {"img": x, "label": y, "key": key}


@torch.no_grad()
def predict_probs(model: torch.nn.Module, img_uint8_hwc: np.ndarray, *, scales: Sequence[float],
                  flip: bool = True, device="cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  amp: Optional[bool] = None, fusion: str = "mean_probs", resize: str = "bilinear_ceil",
                  align_corners: bool = False) -> torch.Tensor:
    """Multi-scale (+flip) class probabilities (C,H,W) at the image size.

    resize: "cv2_cubic" (the authors: cv2 INTER_CUBIC of the float32 normalised image, size
    rounded by cv2) or "bilinear_ceil" (torch bilinear to ceil(size * s)). Each output is
    upsampled to the image (bilinear, `align_corners`), flipped back, and fused: "mean_logits"
    (the authors: softmax of the mean logits) or "mean_probs" (mean of the softmaxes).
    `amp` (default: on for CUDA) runs the network under bf16 autocast; resizing, softmax and the
    average stay fp32."""
    if fusion not in ("mean_logits", "mean_probs"):
        raise DataError(f"deeplab.test_fusion: {fusion!r} is not one of mean_logits, mean_probs")
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    h, w = img_uint8_hwc.shape[:2]
    total = None
    n = 0
    for xs in _scaled_inputs(img_uint8_hwc, scales, resize, mean, std):
        xs = xs.to(device)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch)
        logits = logits.float()
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align_corners)
        part = logits.sum(0) if fusion == "mean_logits" else logits.softmax(1).sum(0)
        total = part if total is None else total + part
        n += batch.shape[0]
    mean_part = total / n
    return (mean_part.softmax(0) if fusion == "mean_logits" else mean_part).cpu()


def _scaled_inputs(img_uint8_hwc: np.ndarray, scales: Sequence[float], resize: str, mean, std):
    """(1,3,h,w) normalised inputs, one per scale."""
    if resize == "cv2_cubic":
        cv2 = cv2_module()
        x = reference_normalize(img_uint8_hwc, mean, std)
        for s in scales:
            xs = cv2.resize(x, None, fx=float(s), fy=float(s), interpolation=cv2.INTER_CUBIC)
            yield torch.from_numpy(xs).permute(2, 0, 1)[None].contiguous()
    elif resize == "bilinear_ceil":
        x = normalize_image(img_uint8_hwc, mean, std)[None]
        h, w = x.shape[-2:]
        for s in scales:
            size = (max(1, math.ceil(h * s)), max(1, math.ceil(w * s)))
            yield F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        raise DataError(f"deeplab.test_resize: {resize!r} is not one of cv2_cubic, bilinear_ceil")


# ------------------------------------------------------------------------------ image readers
class FolderImageReader:
    """`id -> uint8 (H, W, 3)` from VOC JPEGImages, then SBD img (hsc_fast.data.FolderDataset's rule)."""

    def __init__(self, voc_root: str, sbd_root: str = ""):
        from hsc_fast.data import FolderDataset
        self._folders = FolderDataset(voc_root, [], sbd_root or None)

    def __call__(self, key: str) -> np.ndarray:
        from hsc_fast.data.samples import open_jpeg
        path = self._folders.paths(key).image  # DataError naming the id and the places looked
        return _writable_rgb(open_jpeg(path.read_bytes(), str(path)))

    def missing(self, ids: Sequence[str]) -> list[str]:
        """Ids without an image (cheap: file existence only)."""
        out = []
        for key in ids:
            try:
                self._folders.paths(key)
            except DataError:
                out.append(key)
        return out


class ShardImageReader:
    """`id -> uint8 (H, W, 3)` read on demand from WebDataset shards (hsc_fast.data.shard layout).

    The index (key -> tar file, data offset, size of its `.jpg` member) is built once by walking the
    tar headers with `tarfile` -- no member data is read -- then each image is one seek + read. The
    object holds paths and offsets only, so it pickles cheaply into loader workers.
    """

    def __init__(self, source: str):
        from hsc_fast.data import ShardSet
        from hsc_fast.data import samples as S
        self.source = str(source)
        self._where: dict[str, tuple[str, int, int]] = {}
        suffix = f".{S.IMAGE}"
        for url in ShardSet(source).urls:
            try:
                with tarfile.open(url, "r:") as tf:
                    for member in tf:
                        if member.isfile() and member.name.endswith(suffix):
                            key = member.name[:-len(suffix)]
                            self._where.setdefault(key, (url, member.offset_data, member.size))
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"shard {url}: cannot read its tar headers ({e})") from e

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [key for key in ids if key not in self._where]

    def __call__(self, key: str) -> np.ndarray:
        from hsc_fast.data.samples import open_jpeg
        if key not in self._where:
            raise DataError(f"id '{key}': no image in the shards of {self.source}")
        url, offset, size = self._where[key]
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"shard {url}: member {key}.jpg is truncated ({len(data)} of {size} bytes)")
        return _writable_rgb(open_jpeg(data, f"{url}: {key}"))


def _writable_rgb(pil_image) -> np.ndarray:
    return np.array(pil_image, dtype=np.uint8)  # a writable copy (torch.from_numpy, pydensecrf)


def open_image_reader(images: str, sbd_root: str = ""):
    """A shard source (index.json, a folder holding one, .tar URLs) or a VOC root (+ SBD root)."""
    from hsc_fast.data import is_shard_source
    if not images:
        raise DataError("images: empty; expected a VOC root folder or a shard index.json")
    if is_shard_source(images):
        return ShardImageReader(images)
    return FolderImageReader(images, sbd_root)


def missing_labels(label_dir: str, ids: Sequence[str]) -> list[str]:
    """Ids without `{label_dir}/{id}.png`."""
    from hsc_fast.data.voc import safe_join
    return [key for key in ids if not Path(safe_join(label_dir, f"{key}.png")).is_file()]


# ------------------------------------------------------------------------- distributed batches
def epoch_batches(n_items: int, batch_size: int, rank: int, world_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """This rank's batches (dataset indices) of one epoch.

    One permutation per (seed, epoch), shared by all ranks; rank r takes every world-th index from
    position r, cut to the same length on every rank, in full batches only -- so every rank runs
    the same number of steps and the whole epoch is a pure function of its arguments (exact resume).
    """
    per_rank = n_items // world_size
    n_batches = per_rank // batch_size
    if n_batches == 0:
        raise DataError(f"{n_items} training ids cannot fill one batch of {batch_size} on each of "
                        f"{world_size} rank(s)")
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    mine = order[rank::world_size][:n_batches * batch_size]
    return [mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)]
