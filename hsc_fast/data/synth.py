"""Synthetic PASCAL-VOC-like data in the real on-disk formats, for tests, demos and benchmarks.

``python -m hsc_fast.synth --out DIR --n-train N --n-val M --seed S [--size PX]`` writes::

    DIR/VOC2012/JPEGImages/*.jpg            VOC-mask train ids and val ids
    DIR/VOC2012/SegmentationClass/*.png     palette PNGs with a 255 band on object boundaries
    DIR/VOC2012/Annotations/*.xml           VOC XML (one <object> per visible instance)
    DIR/VOC2012/ImageSets/Segmentation/{train_aug,train,val}.txt
    DIR/SBD/{img/*.jpg, cls/*.mat}          SBD-only train ids (no VOC jpg/png/xml, like train_aug)
    DIR/SaliencyMaps/*.png                  uint8 noisy foreground probability (PFAN-like)
    DIR/cls_labels.npy                      IRN format: int key 2100000001 -> float32 (K,)
    DIR/VOC2012/classes.json                the class set when K != 20 (``generate(..., num_fg=K)``)
    DIR/synth_meta.json                     the generation arguments

The content is built so that weak supervision is non-trivial: each class has its own shape family,
colours and a class-specific texture on only a *part* of the object (an animal's head, a vehicle's
front, a monitor's screen) while the rest carries a texture shared by its group; backgrounds are
correlated with classes (boats on water, aeroplanes in the sky, cows on grass, ...), so plain CAMs
fire partly on context and only on the discriminative part.

Deterministic: each image comes from a numpy Generator seeded by (seed, image id), files carry no
timestamps, JPEG/PNG settings are fixed -> same arguments give byte-identical files (on one
platform; libm/SIMD differences across CPUs could change a rounding).
"""
from __future__ import annotations

import functools
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter

from hsc_fast.classes import CLASSES_FILE, VOC, ClassSet, synthetic
from hsc_fast.classes import save as save_classes
from hsc_fast.errors import ConfigError
from hsc_fast.data.voc import classes_in_mask, classes_to_multihot, encode_label_png, save_cls_labels_npy, write_sbd_mat

TRAIN_YEAR, VAL_YEAR = 2100, 2101  # ids look like VOC's: '2100_000001'
JPEG_QUALITY = 90


# ------------------------------------------------------------------------------------ class table

@dataclass(frozen=True)
class ClassSpec:
    shape: str                  # shape family (see _shape_mask)
    params: tuple               # family parameters, in object units (radius 1)
    part: str                   # discriminative part: 'head', 'front' (u > cut), 'inner', 'top' (v < cut)
    part_arg: tuple             # head: (hx, hy, hr); front/top: (cut,); inner: (scale,)
    group: str                  # 'animal' | 'vehicle' | 'indoor': decides the shared body texture
    body_rgb: tuple             # two colours the body texture mixes
    tex: str                    # class-specific texture on the part
    tex_freq: float             # periods per object radius
    tex_angle: float            # degrees
    part_rgb: tuple             # two colours of the part texture
    scene: str                  # typical background


def _c(*rgb):
    return tuple(float(x) for x in rgb)


# Class index c (1..20) -> spec; index 0 unused. Hand-made so the classes differ in shape, part
# texture (kind, frequency, angle) and colour, while groups share body textures.
CLASS_SPECS: tuple = (None,) + (
    ClassSpec("cross", (0.16, 0.95, 0.9), "front", (0.45,), "vehicle", (_c(200, 200, 210), _c(150, 155, 170)),
              "stripes", 5.0, 0.0, (_c(230, 40, 40), _c(250, 250, 250)), "sky"),            # 1 aeroplane
    ClassSpec("double_ring", (0.62, 0.5), "front", (0.35,), "vehicle", (_c(40, 40, 40), _c(90, 90, 100)),
              "dots", 7.0, 0.0, (_c(20, 120, 220), _c(240, 240, 60)), "road"),             # 2 bicycle
    ClassSpec("ellipse", (1.0, 0.55), "head", (0.95, -0.45, 0.33), "animal", (_c(140, 110, 70), _c(90, 70, 50)),
              "rings", 6.0, 0.0, (_c(250, 200, 0), _c(30, 30, 30)), "sky"),                 # 3 bird
    ClassSpec("crescent", (0.55, 0.95), "front", (0.3,), "vehicle", (_c(240, 240, 235), _c(170, 60, 40)),
              "checker", 3.0, 0.0, (_c(250, 120, 0), _c(20, 20, 80)), "water"),             # 4 boat
    ClassSpec("superellipse", (0.35, 1.0, 2.5), "top", (-0.45,), "indoor", (_c(40, 140, 60), _c(20, 90, 40)),
              "stripes", 9.0, 90.0, (_c(230, 230, 230), _c(200, 20, 20)), "indoor"),        # 5 bottle
    ClassSpec("superellipse", (1.0, 0.55, 6.0), "front", (0.4,), "vehicle", (_c(230, 190, 30), _c(200, 160, 20)),
              "checker", 6.0, 0.0, (_c(60, 160, 230), _c(20, 20, 20)), "road"),             # 6 bus
    ClassSpec("polygon", (6, 1.0, 0.6), "front", (0.3,), "vehicle", (_c(180, 30, 30), _c(120, 20, 20)),
              "waves", 4.0, 30.0, (_c(200, 230, 255), _c(40, 40, 60)), "road"),             # 7 car
    ClassSpec("ellipse", (0.85, 0.6), "head", (0.8, -0.55, 0.4), "animal", (_c(120, 120, 120), _c(200, 160, 110)),
              "stripes", 7.0, 45.0, (_c(240, 150, 40), _c(40, 30, 20)), "indoor"),          # 8 cat
    ClassSpec("L", (0.35,), "top", (-0.3,), "indoor", (_c(150, 100, 50), _c(110, 70, 30)),
              "dots", 5.0, 0.0, (_c(200, 40, 160), _c(250, 220, 240)), "indoor"),           # 9 chair
    ClassSpec("superellipse", (1.0, 0.6, 3.0), "head", (1.0, -0.35, 0.38), "animal",
              (_c(30, 30, 30), _c(240, 240, 240)),
              "checker", 4.0, 20.0, (_c(240, 170, 170), _c(60, 20, 20)), "grass"),          # 10 cow
    ClassSpec("T", (0.3,), "top", (-0.35,), "indoor", (_c(160, 110, 60), _c(120, 80, 40)),
              "rings", 3.0, 0.0, (_c(250, 250, 250), _c(60, 120, 200)), "indoor"),          # 11 diningtable
    ClassSpec("ellipse", (1.0, 0.5), "head", (0.95, -0.5, 0.37), "animal", (_c(170, 120, 60), _c(110, 70, 30)),
              "dots", 9.0, 0.0, (_c(30, 30, 30), _c(250, 250, 250)), "grass"),              # 12 dog
    ClassSpec("ellipse", (1.0, 0.45), "head", (1.05, -0.6, 0.3), "animal", (_c(110, 60, 30), _c(70, 40, 20)),
              "waves", 6.0, 70.0, (_c(250, 250, 250), _c(140, 80, 40)), "grass"),           # 13 horse
    ClassSpec("star", (8, 0.35), "front", (0.25,), "vehicle", (_c(30, 30, 40), _c(120, 120, 140)),
              "stripes", 3.0, 135.0, (_c(250, 60, 0), _c(250, 250, 0)), "road"),            # 14 motorbike
    ClassSpec("ellipse", (0.45, 1.0), "head", (0.0, -1.3, 0.38), "animal", (_c(40, 60, 140), _c(160, 40, 40)),
              "noise", 10.0, 0.0, (_c(230, 180, 150), _c(120, 80, 60)), "any"),             # 15 person
    ClassSpec("star", (7, 0.45), "top", (-0.25,), "indoor", (_c(140, 90, 50), _c(100, 60, 30)),
              "noise", 4.0, 0.0, (_c(30, 180, 40), _c(10, 80, 20)), "indoor"),              # 16 pottedplant
    ClassSpec("star", (14, 0.12), "head", (0.95, -0.3, 0.3), "animal", (_c(235, 235, 225), _c(200, 200, 190)),
              "rings", 10.0, 0.0, (_c(20, 20, 20), _c(90, 90, 90)), "grass"),               # 17 sheep
    ClassSpec("U", (0.3,), "front", (0.2,), "indoor", (_c(120, 40, 90), _c(90, 30, 60)),
              "checker", 8.0, 45.0, (_c(250, 200, 100), _c(120, 40, 90)), "indoor"),        # 18 sofa
    ClassSpec("superellipse", (1.0, 0.32, 5.0), "front", (0.5,), "vehicle", (_c(60, 60, 160), _c(40, 40, 110)),
              "stripes", 12.0, 90.0, (_c(250, 250, 250), _c(220, 30, 30)), "road"),         # 19 train
    ClassSpec("superellipse", (1.0, 0.75, 8.0), "inner", (0.78,), "indoor", (_c(20, 20, 20), _c(60, 60, 60)),
              "waves", 9.0, 0.0, (_c(40, 220, 250), _c(10, 40, 160)), "indoor"),            # 20 tvmonitor
)
SCENES = ("sky", "water", "grass", "road", "indoor", "clutter")
CONTEXT_PROB = 0.8     # probability that the main object's typical scene is used
TEXTURES = ("stripes", "checker", "dots", "rings", "waves", "noise")


@functools.lru_cache(maxsize=None)
def class_spec(c: int) -> ClassSpec:
    """The spec of class ``c``: the hand-made table for 1..20; beyond it (K-class sets, e.g. 80
    like COCO) the shape, part and group of class ((c-1) mod 20) + 1 with colours, part texture
    and scene drawn from a generator seeded by c (fixed: class c looks the same in every set)."""
    if c < len(CLASS_SPECS):
        return CLASS_SPECS[c]
    base = CLASS_SPECS[(c - 1) % (len(CLASS_SPECS) - 1) + 1]
    rng = np.random.default_rng([2103, c])
    colour = lambda: _c(*rng.integers(10, 250, 3))  # noqa: E731
    return ClassSpec(base.shape, base.params, base.part, base.part_arg, base.group, (colour(), colour()),
                     TEXTURES[int(rng.integers(len(TEXTURES)))], float(rng.uniform(3.0, 10.0)),
                     float(rng.uniform(0.0, 180.0)), (colour(), colour()), SCENES[int(rng.integers(len(SCENES)))])


@functools.lru_cache(maxsize=None)
def class_weights(num_fg: int) -> np.ndarray:
    """Sampling weights of classes 1..K: person (15) three times as common, as in VOC."""
    w = np.array([3.0 if c == 15 else 1.0 for c in range(1, num_fg + 1)])
    return w / w.sum()


# ---------------------------------------------------------------------------------- small helpers

@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a (cells+1)^2 random grid upsampled bilinearly (PIL, in C)."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((shape[1], shape[0]), Image.BILINEAR))


def _mix(t: np.ndarray, a, b) -> np.ndarray:
    """Per-pixel colour a*(1-t) + b*t -> (..., 3) float32."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return a + t[..., None] * (b - a)


@functools.lru_cache(maxsize=4)
def _noise_table(size: int) -> np.ndarray:
    """A fixed table of unit Gaussian noise, a little larger than the image (read-only)."""
    table = np.random.default_rng(20230817).standard_normal((size + 61, size + 61, 3), dtype=np.float32)
    table.flags.writeable = False
    return table


def _sensor_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-pixel Gaussian noise: a randomly offset, flipped window of the fixed table."""
    oy, ox = rng.integers(0, 62, 2)
    win = _noise_table(size)[oy:oy + size, ox:ox + size]
    return win[::-1] if rng.random() < 0.5 else win


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square (Chebyshev) dilation by r pixels, separable."""
    out = mask.copy()
    for s in range(1, r + 1):
        out[s:, :] |= mask[:-s, :]
        out[:-s, :] |= mask[s:, :]
    rows = out.copy()
    for s in range(1, r + 1):
        out[:, s:] |= rows[:, :-s]
        out[:, :-s] |= rows[:, s:]
    return out


# -------------------------------------------------------------------------------------- textures

def _texture(kind: str, u: np.ndarray, v: np.ndarray, whole: np.ndarray, freq: float, angle_deg: float,
             rng: np.random.Generator) -> np.ndarray:
    """Class texture in [0, 1] at the object's pixels: object coordinates u, v (radius 1, 1-D, the
    pixels where the window mask ``whole`` is set), so the texture scales with the object."""
    a = np.deg2rad(angle_deg)
    s = u * np.cos(a) + v * np.sin(a)
    t = -u * np.sin(a) + v * np.cos(a)
    if kind == "stripes":
        return (np.sin(2 * np.pi * freq * s) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(freq * s) + np.floor(freq * t)) % 2).astype(np.float32)
    if kind == "dots":
        fs, ft = freq * s % 1.0 - 0.5, freq * t % 1.0 - 0.5
        return (fs * fs + ft * ft < 0.09).astype(np.float32)
    if kind == "rings":
        return (np.sin(2 * np.pi * freq * np.sqrt(u * u + v * v)) > 0).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * s + 2.5 * np.sin(2 * np.pi * 1.5 * t))
    if kind == "noise":
        cells = max(2, int(freq * 2))
        return (_smooth_noise(rng, whole.shape, cells)[whole] > 0.5).astype(np.float32)
    raise ValueError(kind)


def _group_texture(group: str, u, v, whole, rng) -> np.ndarray:
    """Texture shared by all classes of a group (so it does not tell them apart); same arguments as _texture."""
    if group == "animal":   # fur: soft blotches
        return _smooth_noise(rng, whole.shape, 6)[whole]
    if group == "vehicle":  # metal: a smooth vertical gradient with a highlight
        return np.clip(0.5 + 0.5 * v + 0.4 * np.exp(-((v + 0.3) * 6) ** 2), 0, 1)
    return 0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * (u + 0.15 * np.sin(5 * v)))  # indoor: wood grain


# ----------------------------------------------------------------------------------------- shapes

def _shape_mask(shape: str, p: tuple, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape family in object coordinates (u, v), radius ~1."""
    if shape == "ellipse":
        return (u / p[0]) ** 2 + (v / p[1]) ** 2 <= 1.0
    if shape == "superellipse":
        return np.abs(u / p[0]) ** p[2] + np.abs(v / p[1]) ** p[2] <= 1.0
    if shape == "star":
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        return rho <= 1.0 - p[1] * (0.5 + 0.5 * np.cos(p[0] * theta))
    if shape == "polygon":
        k, ax, ay = p
        uu, vv = u / ax, v / ay
        rho, theta = np.hypot(uu, vv), np.arctan2(vv, uu)
        sector = 2 * np.pi / k
        return rho * np.cos(np.mod(theta, sector) - sector / 2) <= np.cos(np.pi / k)
    if shape == "double_ring":
        inner, sep = p
        r = 1.0 - sep
        d1 = np.hypot(u - sep, v)
        d2 = np.hypot(u + sep, v)
        ring = ((d1 <= r) & (d1 >= inner * r)) | ((d2 <= r) & (d2 >= inner * r))
        frame = (np.abs(v + 0.15) <= 0.07) & (np.abs(u) <= sep)  # the bar joining the wheels
        return ring | frame
    if shape == "cross":
        w, ax, ay = p
        fuselage = (np.abs(u) <= ax) & (np.abs(v) <= w)
        wings = (np.abs(u + 0.1) <= w * 1.3) & (np.abs(v) <= ay)
        tail = (np.abs(u + ax * 0.85) <= w) & (np.abs(v) <= ay * 0.35)
        return fuselage | wings | tail
    if shape == "crescent":
        off, r2 = p
        return (np.hypot(u, v) <= 1.0) & (np.hypot(u, v + off) > r2)
    if shape == "L":
        t = p[0]
        return (((u >= -0.7) & (u <= -0.7 + t) & (np.abs(v) <= 1.0))
                | ((v >= 0.0) & (v <= t) & (u >= -0.7) & (u <= 0.7))
                | ((u >= 0.7 - t / 2) & (u <= 0.7) & (v >= 0.0) & (v <= 1.0)))
    if shape == "T":
        t = p[0]
        top = (np.abs(u) <= 1.0) & (v >= -0.6) & (v <= -0.6 + t)
        legs = (np.abs(np.abs(u) - 0.75) <= t / 3) & (v >= -0.6) & (v <= 0.75)
        return top | legs
    if shape == "U":
        t = p[0]
        outer = (np.abs(u) <= 1.0) & (v >= -0.5) & (v <= 0.55)
        hollow = (np.abs(u) <= 1.0 - t) & (v < 0.55 - t)
        return outer & ~hollow
    raise ValueError(shape)


@dataclass
class _Object:
    cls: int
    cx: float
    cy: float
    radius: float
    angle: float
    flip: bool


def _object_coords(obj: _Object, size: int):
    """Bounding window (y0, y1, x0, x1) and object coordinates (u, v) of the pixels in it."""
    ext = 1.75 * obj.radius  # heads and tails stick out of the unit disk
    y0, y1 = max(0, int(obj.cy - ext)), min(size, int(obj.cy + ext) + 1)
    x0, x1 = max(0, int(obj.cx - ext)), min(size, int(obj.cx + ext) + 1)
    yy, xx = _pixel_grid(size)
    dx = xx[y0:y1, x0:x1] - obj.cx
    dy = yy[y0:y1, x0:x1] - obj.cy
    ca, sa = np.cos(obj.angle), np.sin(obj.angle)
    u = (dx * ca + dy * sa) / obj.radius
    v = (-dx * sa + dy * ca) / obj.radius
    if obj.flip:
        u = -u
    return (y0, y1, x0, x1), u, v


def _object_regions(spec: ClassSpec, u, v) -> tuple[np.ndarray, np.ndarray]:
    """(whole object, discriminative part) masks in object coordinates."""
    body = _shape_mask(spec.shape, spec.params, u, v)
    if spec.part == "head":
        hx, hy, hr = spec.part_arg
        head = np.hypot(u - hx, v - hy) <= hr
        return body | head, head
    if spec.part == "front":
        return body, body & (u > spec.part_arg[0])
    if spec.part == "top":
        return body, body & (v < spec.part_arg[0])
    scale = spec.part_arg[0]  # inner: the same shape shrunk (a monitor's screen)
    return body, _shape_mask(spec.shape, spec.params, u / scale, v / scale)


# --------------------------------------------------------------------------------------- scenes

def _background(scene: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 background texture for a scene type."""
    if scene == "indoor":
        return _indoor(size, rng)
    if scene == "clutter":  # coloured blobs with no class meaning
        return _mix(_smooth_noise(rng, (size, size), 6), rng.uniform(0, 255, 3), rng.uniform(0, 255, 3))
    y = _pixel_grid(size)[0][:, :1] / size                      # (size, 1): row-only terms broadcast
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = _mix(y, (150, 190, 240), (60, 110, 200))      # sky gradient
    canvas += (60.0 * (_smooth_noise(rng, (size, size), 4) > 0.7))[..., None]  # clouds
    if scene == "sky":
        return canvas
    h0 = int(rng.uniform(0.3, 0.55) * size)                   # horizon row
    x = _pixel_grid(size)[1][h0:] / size
    yb = y[h0:]
    shape = (size - h0, size)
    if scene == "water":
        f = rng.uniform(25, 40)
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * f * yb + 3.0 * np.sin(2 * np.pi * 3 * x))
        canvas[h0:] = _mix(waves, (20, 70, 110), (60, 140, 170))
    elif scene == "grass":
        blades = _smooth_noise(rng, shape, 48) * 0.6 + 0.4 * (np.sin(2 * np.pi * 60 * x) > 0.6)
        canvas[h0:] = _mix(blades, (40, 110, 30), (110, 170, 60))
    else:  # road with a dashed centre line
        canvas[h0:] = _mix(_smooth_noise(rng, shape, 32), (90, 90, 95), (130, 130, 135))
        lane = (np.abs(x - 0.5) < 0.012) & (np.sin(2 * np.pi * 8 * yb) > 0)
        canvas[h0:][lane] = (240, 240, 240)
    return canvas


def _indoor(size: int, rng: np.random.Generator) -> np.ndarray:
    """A papered wall over a plank floor."""
    yy, xx = _pixel_grid(size)
    x = xx[:1] / size                                          # (1, size): the wallpaper depends on x only
    h0 = int(rng.uniform(0.45, 0.7) * size)
    wall_rgb = rng.uniform(150, 230, size=3)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:h0] = _mix(0.5 + 0.5 * np.sin(2 * np.pi * 14 * x), wall_rgb * 0.9, wall_rgb)
    xf, yf = xx[h0:] / size, yy[h0:] / size
    planks = 0.5 + 0.5 * np.sin(2 * np.pi * 10 * (xf + 0.05 * np.sin(2 * np.pi * 7 * yf)))
    canvas[h0:] = _mix(planks, (120, 80, 40), (170, 120, 70))
    return canvas


def _choose_scene(rng: np.random.Generator, main_cls: int) -> str:
    typical = class_spec(main_cls).scene
    if typical != "any" and rng.random() < CONTEXT_PROB:
        return typical
    return SCENES[rng.integers(len(SCENES))]


# -------------------------------------------------------------------------------------- layouts

def _sample_objects(rng: np.random.Generator, size: int, classes: Optional[Sequence[int]] = None,
                    num_fg: int = VOC.num_fg) -> list[_Object]:
    """Random objects (1-3 of classes 1..num_fg, VOC-like frequencies), or exactly `classes` when given."""
    if classes is None:
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        classes = list(rng.choice(np.arange(1, num_fg + 1), size=n, replace=False, p=class_weights(num_fg)))
        if n > 1 and rng.random() < 0.15:  # a second instance of the main class (two persons, ...)
            classes[-1] = classes[0]
    objs = []
    for i, c in enumerate(classes):
        # The main (first) object is large; the others vary in scale and may occlude it.
        scale = rng.uniform(0.22, 0.36) if i == 0 else rng.uniform(0.1, 0.28)
        objs.append(_Object(cls=int(c), cx=rng.uniform(0.2, 0.8) * size, cy=rng.uniform(0.25, 0.8) * size,
                            radius=scale * size, angle=np.deg2rad(rng.uniform(-25, 25)),
                            flip=bool(rng.random() < 0.5)))
    return objs


def _instance_map(objs: list[_Object], size: int) -> tuple[np.ndarray, list]:
    """Painter's order instance map (0 = none, k = objs[k-1]) and per-object (window, u, v, whole, part)."""
    inst = np.zeros((size, size), np.uint8)
    geo = []
    for k, obj in enumerate(objs, start=1):
        win, u, v = _object_coords(obj, size)
        whole, part = _object_regions(class_spec(obj.cls), u, v)
        y0, y1, x0, x1 = win
        inst[y0:y1, x0:x1][whole] = k
        geo.append((win, u, v, whole, part))
    return inst, geo


def _labels(objs: list[_Object], inst: np.ndarray) -> np.ndarray:
    lut = np.array([0] + [o.cls for o in objs], np.uint8)
    return lut[inst]


def _boundary_band(seg: np.ndarray, radius: int) -> np.ndarray:
    """VOC-style ignore band: pixels within `radius` of a label change (width 2*radius+1)."""
    edge = np.zeros(seg.shape, bool)
    edge[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    edge[1:, :] |= seg[1:, :] != seg[:-1, :]
    return _dilate(edge, radius)


def _visible_layout(rng, size, band_radius, classes=None, num_fg: int = VOC.num_fg):
    """Sample objects; drop the ones whose visible core (outside the band) is too small."""
    min_core = max(48, int(0.004 * size * size))
    for _ in range(20):
        objs = _sample_objects(rng, size, classes, num_fg)
        for _ in range(len(objs)):
            inst, geo = _instance_map(objs, size)
            band = _boundary_band(_labels(objs, inst), band_radius)
            cores = np.bincount(inst[~band].ravel(), minlength=len(objs) + 1)
            keep = [i for i in range(len(objs)) if cores[i + 1] >= min_core]
            if len(keep) == len(objs):
                return objs, inst, geo, band
            objs = [objs[i] for i in keep]
            if not objs:
                break
    raise RuntimeError("could not place a visible object")  # pragma: no cover - needs 20 failures


# ------------------------------------------------------------------------------------- rendering

def _paint_object(canvas: np.ndarray, obj: _Object, geo, rng) -> None:
    spec = class_spec(obj.cls)
    (y0, y1, x0, x1), u, v, whole, part = geo
    # Work on the object's pixels only (1-D), not on its whole window.
    uw, vw, partw = u[whole], v[whole], part[whole]
    body_t = _group_texture(spec.group, uw, vw, whole, rng)
    body = _mix(body_t, *spec.body_rgb) * rng.normal(1.0, 0.08, 3).astype(np.float32)  # instance tint
    tex = _texture(spec.tex, uw, vw, whole, spec.tex_freq, spec.tex_angle, rng)
    rgb = np.where(partw[:, None], _mix(tex, *spec.part_rgb), body)
    shade = 1.0 - 0.2 * np.minimum(uw * uw + vw * vw, 1.5)   # a little 3-D look
    canvas[y0:y1, x0:x1][whole] = rgb * shade[:, None]


def _saliency(rng: np.random.Generator, inst: np.ndarray, objs: list[_Object]) -> np.ndarray:
    """PFAN-like saliency: a blurred, noisy foreground probability with misses and false alarms."""
    size = inst.shape[0]
    fg = (inst > 0).astype(np.float32)
    if len(objs) > 1 and rng.random() < 0.3:  # a missed (non-salient) secondary object, partly
        k = int(rng.integers(2, len(objs) + 1))
        fg[(inst == k) & (_smooth_noise(rng, inst.shape, 3) > 0.4)] *= 0.2
    if rng.random() < 0.35:  # a salient background blob
        yy, xx = _pixel_grid(size)
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(0.05, 0.15) * size]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)
        fg[blob] = rng.uniform(0.4, 0.9)
    noise = _smooth_noise(rng, inst.shape, 8)
    prob = np.clip(fg * (0.75 + 0.25 * noise) + 0.12 * (noise - 0.5), 0.0, 1.0)
    img = Image.fromarray((prob * 255.0 + 0.5).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 3.5))))
    return np.asarray(img)


@dataclass
class Scene:
    rgb: np.ndarray         # uint8 (H, W, 3)
    mask: np.ndarray        # uint8 (H, W), VOC style: 255 band on boundaries
    seg: np.ndarray         # uint8 (H, W), SBD style: no band
    saliency: np.ndarray    # uint8 (H, W)
    scene: str
    instances: list         # [(class, (xmin, ymin, xmax, ymax) 0-based inclusive, truncated)]


def render_scene(rng: np.random.Generator, size: int = 256, classes: Optional[Sequence[int]] = None,
                 num_fg: int = VOC.num_fg) -> Scene:
    """One synthetic image with its masks, saliency map and instance boxes; objects of classes
    1..num_fg, or `classes` fixes them (e.g. one object of a chosen class for hsc_fast.engine.pretrain)."""
    band_radius = int(rng.integers(1, 3))  # 3 or 5 px wide, like VOC's ~5 px band
    objs, inst, geo, band = _visible_layout(rng, size, band_radius, classes, num_fg)
    scene = _choose_scene(rng, objs[0].cls)
    canvas = _background(scene, size, rng)
    canvas *= rng.normal(1.0, 0.06, 3).astype(np.float32)  # global colour cast
    for obj, g in zip(objs, geo):
        _paint_object(canvas, obj, g, rng)
    canvas += _sensor_noise(rng, size) * np.float32(rng.uniform(3, 9))
    rgb = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    seg = _labels(objs, inst)
    mask = seg.copy()
    mask[band] = 255
    instances = []
    for k, obj in enumerate(objs, start=1):
        ys, xs = np.nonzero(inst == k)
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        truncated = box[0] == 0 or box[1] == 0 or box[2] == size - 1 or box[3] == size - 1
        instances.append((obj.cls, box, truncated))
    return Scene(rgb=rgb, mask=mask, seg=seg, saliency=_saliency(rng, inst, objs), scene=scene,
                 instances=instances)


def make_image(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb uint8 (H,W,3), VOC mask uint8 (H,W) with 0..20/255, saliency uint8 (H,W)) for tests."""
    s = render_scene(rng, size)
    return s.rgb, s.mask, s.saliency


# --------------------------------------------------------------------------------------- writing

def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The Generator of one image: depends only on the seed and the id (not on split or order)."""
    year, number = image_id.split("_")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(year), int(number)]))


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)
    return buf.getvalue()


def _encode_grey_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # level 6 is 3x slower for ~20% less
    return buf.getvalue()


def voc_xml(image_id: str, scene: Scene, classes: ClassSet = VOC) -> bytes:
    """VOC annotation XML for the visible instances (1-based inclusive pixel boxes, like VOC)."""
    h, w = scene.mask.shape
    objects = "".join(
        f"\t<object>\n\t\t<name>{classes.names[c - 1]}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>{int(trunc)}</truncated>\n\t\t<difficult>0</difficult>\n"
        f"\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n"
        f"\t\t\t<xmax>{x1 + 1}</xmax>\n\t\t\t<ymax>{y1 + 1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for c, (x0, y0, x1, y1), trunc in scene.instances)
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>hsc-fast synthetic</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>1</segmented>\n{objects}</annotation>\n").encode()


def split_ids(n_train: int, n_val: int, seed: int, sbd_fraction: float) -> tuple[list, list, list]:
    """(train_aug ids, the SBD-only subset of them, val ids)."""
    train = [f"{TRAIN_YEAR}_{i:06d}" for i in range(1, n_train + 1)]
    val = [f"{VAL_YEAR}_{i:06d}" for i in range(1, n_val + 1)]
    n_sbd = min(int(round(n_train * sbd_fraction)), n_train - 1)  # keep >= 1 VOC-mask train id
    pick = np.random.default_rng(np.random.SeedSequence([int(seed), 0])).permutation(n_train)[:n_sbd]
    sbd = sorted(train[i] for i in pick)
    return train, sbd, val


def _check_args(n_train, n_val, size, sbd_fraction):
    if not 1 <= n_train <= 999_999:
        raise ConfigError(f"n_train={n_train}: expected 1..999999")
    if not 0 <= n_val <= 999_999:
        raise ConfigError(f"n_val={n_val}: expected 0..999999")
    if not 64 <= size <= 4096:
        raise ConfigError(f"size={size}: expected 64..4096 pixels")
    if not 0.0 <= sbd_fraction < 1.0:
        raise ConfigError(f"sbd_fraction={sbd_fraction}: expected 0 <= fraction < 1")


def generate(out, n_train: int, n_val: int, seed: int, size: int = 256, sbd_fraction: float = 0.3,
             num_fg: int = VOC.num_fg) -> dict:
    """Write the synthetic dataset under ``out`` (see the module docstring); returns a summary dict.
    ``num_fg``: K classes (20: VOC's names and files byte-identical to before; else 'synth01'.. and
    ``VOC2012/classes.json`` beside the VOC-layout tree, which the readers then use)."""
    _check_args(n_train, n_val, size, sbd_fraction)
    classes = synthetic(num_fg)
    out = Path(out)
    voc_root, sbd_root = out / "VOC2012", out / "SBD"
    dirs = [voc_root / "JPEGImages", voc_root / "SegmentationClass", voc_root / "Annotations",
            voc_root / "ImageSets" / "Segmentation", sbd_root / "img", sbd_root / "cls", out / "SaliencyMaps"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    train, sbd, val = split_ids(n_train, n_val, seed, sbd_fraction)
    sbd_set = set(sbd)
    labels: dict[str, np.ndarray] = {}
    class_counts = np.zeros(classes.num_classes, np.int64)
    scene_counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for image_id in train + val:
        scene = render_scene(image_rng(seed, image_id), size, num_fg=num_fg)
        jpg = _encode_jpeg(scene.rgb)
        if image_id in sbd_set:
            (sbd_root / "img" / f"{image_id}.jpg").write_bytes(jpg)
            write_sbd_mat(sbd_root / "cls" / f"{image_id}.mat", scene.seg, classes)
        else:
            (voc_root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg)
            (voc_root / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_label_png(scene.mask, classes))
            (voc_root / "Annotations" / f"{image_id}.xml").write_bytes(voc_xml(image_id, scene, classes))
        (out / "SaliencyMaps" / f"{image_id}.png").write_bytes(_encode_grey_png(scene.saliency))
        present = classes_in_mask(scene.mask, classes)
        labels[image_id] = classes_to_multihot(present, classes)
        class_counts[present] += 1
        scene_counts[scene.scene] = scene_counts.get(scene.scene, 0) + 1
    seconds = time.perf_counter() - t0
    lists = voc_root / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train if i not in sbd_set))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    save_cls_labels_npy(out / "cls_labels.npy", labels, classes)
    if classes is not VOC:
        save_classes(voc_root / CLASSES_FILE, classes)
    meta = {"generator": "hsc_fast.data.synth", "seed": seed, "size": size, "n_train": n_train, "n_val": n_val,
            "n_sbd": len(sbd), "sbd_fraction": sbd_fraction, "jpeg_quality": JPEG_QUALITY}
    if classes is not VOC:  # the 20-class meta stays as it was
        meta["num_fg"] = num_fg
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    n = len(train) + len(val)
    return {"images": n, "train_aug": len(train), "train_voc": len(train) - len(sbd), "sbd": len(sbd),
            "val": len(val), "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
            "class_counts": {classes.names[c - 1]: int(class_counts[c]) for c in range(1, classes.num_fg + 1)},
            "scene_counts": dict(sorted(scene_counts.items()))}
