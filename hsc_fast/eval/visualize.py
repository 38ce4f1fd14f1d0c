"""Pictures for inspection: label colour overlays, CAM heat maps, the threshold-sweep curve.

PIL only (no plotting library): everything here is for a human to look at, nothing is read back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from hsc_fast.classes import IGNORE_INDEX, PALETTE
from hsc_fast.errors import DataError


def colorize_label(label: np.ndarray) -> np.ndarray:
    """uint8 (H, W) label indices -> uint8 (H, W, 3) colours of the VOC colour map, which is defined
    for all 256 indices (VOC's 0..20, COCO's 0..80, any synthetic set; 255 -> the boundary colour)."""
    label = np.asarray(label)
    if label.size and (label.min() < 0 or label.max() > 255):
        raise DataError(f"colorize_label: values [{label.min()}, {label.max()}] outside the uint8 label range")
    return PALETTE[label.astype(np.uint8, copy=False)]


def overlay_label(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the label colours over the image; background (0) and ignore (255) pixels stay the image."""
    colour = colorize_label(label).astype(np.float32)
    img = np.asarray(image, dtype=np.float32)
    blend = (1 - alpha) * img + alpha * colour
    keep = (label == 0) | (label == IGNORE_INDEX)
    return np.where(keep[..., None], img, blend).round().astype(np.uint8)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB with a jet-like ramp (blue, cyan, yellow, red)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def overlay_cam(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A CAM (H, W) in [0, 1] as a heat map blended over the image."""
    heat = heat_colormap(cam).astype(np.float32)
    return ((1 - alpha) * np.asarray(image, np.float32) + alpha * heat).round().astype(np.uint8)


def inspection_panel(image: np.ndarray, cams: Optional[np.ndarray], labels: Sequence[np.ndarray]) -> np.ndarray:
    """One row: the image, the max over its CAMs as a heat map (if given), then each label overlay."""
    tiles = [np.asarray(image, np.uint8)]
    if cams is not None and len(cams):
        tiles.append(overlay_cam(image, np.asarray(cams, np.float32).max(axis=0)))
    tiles += [overlay_label(image, lab) for lab in labels]
    return np.concatenate(tiles, axis=1)


def save_rgb(path, arr: np.ndarray, quality: int = 90) -> None:
    """Write an RGB array as JPEG or PNG (by suffix)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path, quality=quality)


def draw_threshold_curve(path, curve: Sequence[dict], best: Optional[dict] = None,
                         size: tuple[int, int] = (640, 400)) -> None:
    """mIoU against background threshold as a PNG (axes with ticks, the curve, the best point)."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    ts = np.array([c["threshold"] for c in curve], dtype=np.float64)
    ms = np.array([c["miou"] for c in curve], dtype=np.float64)
    t_lo, t_hi = float(ts.min()), float(ts.max()) if len(ts) > 1 else float(ts.min()) + 1.0
    finite = ms[np.isfinite(ms)]
    m_lo = np.floor((finite.min() if len(finite) else 0.0) / 5) * 5
    m_hi = np.ceil((finite.max() if len(finite) else 100.0) / 5) * 5
    m_hi = m_hi if m_hi > m_lo else m_lo + 5

    def xy(t, m):
        x = left + (t - t_lo) / (t_hi - t_lo) * (w - left - right)
        y = h - bottom - (m - m_lo) / (m_hi - m_lo) * (h - top - bottom)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for m in np.linspace(m_lo, m_hi, 6):
        _, y = xy(t_lo, m)
        d.line([left - 4, y, left, y], fill="black")
        d.text((5, y - 6), f"{m:.1f}", fill="black")
    step = 0.1 if t_hi - t_lo > 0.3 else 0.05
    for t in np.arange(np.ceil(t_lo / step - 1e-6) * step, t_hi + 1e-6, step):
        x, _ = xy(t, m_lo)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 12, h - bottom + 8), f"{t:.2f}", fill="black")
    d.text((w // 2 - 60, h - 16), "background threshold", fill="black")
    d.text((5, 8), "mIoU (%)", fill="black")
    points = [xy(t, m) for t, m in zip(ts, ms) if np.isfinite(m)]
    if len(points) > 1:
        d.line(points, fill=(31, 119, 180), width=2)
    if best is not None and np.isfinite(best["miou"]):
        x, y = xy(best["threshold"], best["miou"])
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
        d.text((min(x + 6, w - 150), max(y - 16, top + 2)),
               f"best {best['threshold']:.2f}: {best['miou']:.2f}", fill=(214, 39, 40))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
