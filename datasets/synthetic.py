"""A synthetic world for testing every loader, metric and method end to end without downloads.

Part 1 — rendering (``render_scene``): procedurally drawn scenes of ``CLASS_NAMES`` shapes with a colour and
a texture each, of varied size and position, on a cluttered, textured background; several objects occlude
each other (and single objects are sometimes crossed by an occluding bar). Every ``SceneObject`` carries the
exact VISIBLE mask and its box. The classes differ by SHAPE; colour and texture are nuisances drawn from
the same palette that the background clutter uses, so a model has to find the object, not a colour.

Part 2 — writers (``make_synthetic``): the same scenes written in each real on-disk format (CUB original,
wsolevaluation CUB/ILSVRC/OpenImages metadata, VOC 2012, COCO 2014 instances JSON, Flickr30k Entities)
so that the real loaders read them. Deterministic by seed.

Box convention of ``SceneObject.box``: x0, y0, x1, y1 = the min/max column/row of the visible pixels
(inclusive pixel indices, 0-based), as float. Each writer maps it to its format's convention so that the
real loader gives back exactly this box (see ``make_synthetic``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("star", "heart", "ring", "cross", "triangle", "moon", "arrow", "hexagon",
                                "diamond", "drop")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "orange": (245, 135, 20),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
    "cyan": (40, 205, 215),
    "white": (245, 245, 245),
    "brown": (130, 80, 40),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

DEFAULT_SIZE = (128, 128)  # (W, H)

# How hard the world is. Tuned so that a small CNN trained for a minute on CPU learns the shapes (the
# tiny CAM must beat the centre prior), while position and colour stay uninformative on their own.
CLUTTER_ITEMS = (2, 6)          # background clutter items per image, inclusive range
CLUTTER_SIZE = (0.02, 0.06)     # clutter blob radius / bar length as a fraction of the short side
GRAIN = (3.0, 8.0)              # amplitude of the fine background grain (0..255 scale)
SINGLE_RADIUS = (0.14, 0.32)    # object radius / short side when a scene has one object
MULTI_RADIUS = (0.12, 0.24)     # ... when it has several


@dataclass
class SceneObject:
    """One drawn object: its class, look, and the exact VISIBLE pixels (mask) and their box."""

    class_index: int
    name: str
    color: str
    texture: str
    box: np.ndarray  # (4,) float32 x0, y0, x1, y1: min/max column/row of the visible pixels (inclusive)
    mask: np.ndarray  # bool H×W, visible pixels

    @property
    def phrase(self) -> str:
        """E.g. "a red striped star" ("a green heart" for plain texture; "an orange ..." before vowels)."""
        words = [self.color] + ([] if self.texture == "plain" else [self.texture]) + [self.name]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article] + words)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    image: np.ndarray  # H×W×3 uint8
    objects: list[SceneObject]
    caption: str  # mentions every object by its phrase
    seed: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(W, H)."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def foreground(self) -> np.ndarray:
        """Union of the visible object masks (bool H×W)."""
        fg = np.zeros(self.image.shape[:2], bool)
        for o in self.objects:
            fg |= o.mask
        return fg

    def label_map(self, ignore_border: int = 0) -> np.ndarray:
        """uint8 H×W: 0 background, class_index + 1 on each object's visible pixels; with ``ignore_border``
        > 0, a band of that many pixels around every object's visible outline is 255 (VOC style)."""
        lm = np.zeros(self.image.shape[:2], np.uint8)
        for o in self.objects:
            lm[o.mask] = o.class_index + 1
        if ignore_border > 0 and self.objects:
            lm[_outline_band(self.objects, ignore_border)] = 255
        return lm


# --------------------------------------------------------------------------------------------- shapes


def _circle(n: int = 40, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _star() -> np.ndarray:
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, 0.42)
    t = -np.pi / 2 + k * np.pi / 5
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _cross() -> np.ndarray:
    a = 0.33
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                     [-1, -a], [-a, -a]], float)


def _triangle() -> np.ndarray:
    t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    pts = np.stack([np.cos(t), np.sin(t)], 1)
    pts[:, 1] += 0.25
    return pts


def _arrow() -> np.ndarray:
    return np.array([[-1, -0.28], [0.15, -0.28], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.28],
                     [-1, 0.28]], float)


def _hexagon() -> np.ndarray:
    t = np.arange(6) * np.pi / 3
    return np.stack([np.cos(t), np.sin(t)], 1)


def _diamond() -> np.ndarray:
    return np.array([[0, -1], [0.58, 0], [0, 1], [-0.58, 0]], float)


def _drop() -> np.ndarray:
    c = _circle(36, 0.62, 0.0, 0.36)
    pts = np.concatenate([c, [[0.0, -1.0]]], 0).astype(np.float32)
    import cv2

    return cv2.convexHull(pts)[:, 0, :].astype(float)


_POLYGONS = {"star": _star, "heart": _heart, "cross": _cross, "triangle": _triangle, "arrow": _arrow,
             "hexagon": _hexagon, "diamond": _diamond, "drop": _drop}


@lru_cache(maxsize=None)
def _unit_polygon(name: str) -> np.ndarray:
    return _POLYGONS[name]()


def _shape_mask(name: str, h: int, w: int, cx: float, cy: float, r: float, rot: float, aspect: float,
                flip: bool) -> np.ndarray:
    """Full (unoccluded) mask of a shape of radius ``r`` px centred at (cx, cy)."""
    import cv2

    canvas = np.zeros((h, w), np.uint8)
    c, s = math.cos(rot), math.sin(rot)

    def place(pts: np.ndarray) -> np.ndarray:
        p = pts.copy()
        if flip:
            p[:, 0] = -p[:, 0]
        p[:, 0] *= aspect
        p[:, 1] /= aspect
        x = p[:, 0] * c - p[:, 1] * s
        y = p[:, 0] * s + p[:, 1] * c
        return np.round(np.stack([cx + r * x, cy + r * y], 1) * 16).astype(np.int32)  # 4 fractional bits

    if name == "ring":
        cv2.fillPoly(canvas, [place(_circle(48))], 1, lineType=cv2.LINE_8, shift=4)
        cv2.fillPoly(canvas, [place(_circle(40, 0.55))], 0, lineType=cv2.LINE_8, shift=4)
    elif name == "moon":
        cv2.fillPoly(canvas, [place(_circle(48))], 1, lineType=cv2.LINE_8, shift=4)
        cv2.fillPoly(canvas, [place(_circle(48, 0.85, 0.48, -0.22))], 0, lineType=cv2.LINE_8, shift=4)
    else:
        cv2.fillPoly(canvas, [place(_unit_polygon(name))], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


# ------------------------------------------------------------------------------------------- textures


@lru_cache(maxsize=64)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable coordinates: xx (1×W) and yy (H×1), float32."""
    return np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]


def _pattern(texture: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray | None:
    """Boolean H×W second-tone pattern for a texture (None = plain)."""
    if texture == "plain":
        return None
    xx, yy = _grid(h, w)
    period = float(rng.uniform(4.0, 7.0))
    if texture == "striped":
        a = float(rng.uniform(0, np.pi))
        u = xx * math.cos(a) + yy * math.sin(a) + float(rng.uniform(0, period))
        return (u % period) < period / 2
    if texture == "dotted":
        ox, oy = rng.uniform(0, period, 2)
        dx = (xx + ox) % period - period / 2
        dy = (yy + oy) % period - period / 2
        return dx * dx + dy * dy < (period * 0.3) ** 2
    if texture == "checkered":
        ox, oy = rng.uniform(0, period, 2)
        return ((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2) == 1
    raise ValueError(f"unknown texture {texture!r}; choose one of {TEXTURES}")


def _second_tone(rgb: np.ndarray) -> np.ndarray:
    """A contrasting tone of the same hue: darker for light colours, lighter for dark ones."""
    if rgb.mean() > 150:
        return rgb * 0.45
    return rgb + (255 - rgb) * 0.55


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Cluttered, textured float32 H×W×3 background in 0..255."""
    import cv2

    c0 = rng.uniform(40, 215, 3).astype(np.float32)
    c1 = rng.uniform(40, 215, 3).astype(np.float32)
    g = rng.random((int(rng.integers(3, 6)), int(rng.integers(3, 6)))).astype(np.float32)
    t = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    # fine grain texture (low amplitude stripes or noise) over the whole image
    xx, yy = _grid(h, w)
    if rng.random() < 0.5:
        a = float(rng.uniform(0, np.pi))
        per = float(rng.uniform(3, 9))
        img += (np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * np.pi / per)) * rng.uniform(*GRAIN))[..., None]
    else:
        small = rng.standard_normal((h // 2 + 1, w // 2 + 1), dtype=np.float32)
        img += cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)[..., None] * float(rng.uniform(*GRAIN))
    # clutter: thin lines, small blobs and boxes in palette colours (so colour alone does not find objects)
    n_clutter = int(rng.integers(CLUTTER_ITEMS[0], CLUTTER_ITEMS[1] + 1))
    scale = min(h, w)
    palette = np.array(list(COLOR_RGB.values()), np.float32)
    for _ in range(n_clutter):
        col = palette[int(rng.integers(len(palette)))] if rng.random() < 0.6 else rng.uniform(0, 255, 3)
        col = tuple(float(v) for v in col)
        kind = rng.random()
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if kind < 0.45:
            x2, y2 = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.line(img, (x, y), (x2, y2), col, int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
        elif kind < 0.75:
            ax = (max(1, int(rng.uniform(*CLUTTER_SIZE) * scale)), max(1, int(rng.uniform(*CLUTTER_SIZE) * scale)))
            cv2.ellipse(img, (x, y), ax, float(rng.uniform(0, 180)), 0, 360, col, -1, lineType=cv2.LINE_AA)
        else:
            s = max(2, int(rng.uniform(CLUTTER_SIZE[0] * 1.5, CLUTTER_SIZE[1] * 1.5) * scale))
            cv2.rectangle(img, (x, y), (x + s, y + max(1, s // 3)), col, -1)
    return img


# ------------------------------------------------------------------------------------------- scenes


def _outline_band(objects: Sequence[SceneObject], width: int) -> np.ndarray:
    """Pixels within ``width`` px outside or inside any object's visible outline (used as ignore region)."""
    import cv2

    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    band = np.zeros(objects[0].mask.shape, bool)
    for o in objects:
        m = o.mask.astype(np.uint8)
        band |= (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, k) > 0)
    return band


def _box_of(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float32)


def make_caption(objects: Sequence[SceneObject], template: int = 0) -> str:
    """A sentence naming every object by its phrase (``template`` picks one of a few wordings)."""
    phrases = [o.phrase for o in objects]
    if not phrases:
        return "an empty cluttered background"
    joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    forms = ("{} on a cluttered background", "a picture of {}", "there is {} in this image",
             "{} among some clutter", "a photo showing {}")
    return forms[template % len(forms)].format(joined)


def render_scene(seed: int, *, size: tuple[int, int] = DEFAULT_SIZE, n_objects: int | tuple[int, int] = 1,
                 classes: Sequence[int] | None = None, same_class: bool = False) -> Scene:
    """Draw one scene, deterministically from ``seed``.

    size: (W, H). n_objects: a count or an inclusive (min, max) range. classes: the class index of each
    object when its length equals the number of objects, otherwise the pool object classes are drawn from
    (default: all of ``CLASS_NAMES``). same_class: all objects share one class (multi-instance WSOL images).
    Later objects occlude earlier ones; each earlier object keeps at least half of its pixels visible.
    A single object is crossed by an occluding bar in about a quarter of the scenes.
    """
    import cv2

    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED]))
    w, h = int(size[0]), int(size[1])
    if w < 16 or h < 16:
        raise ValueError(f"size {size} too small; use at least 16×16")
    if isinstance(n_objects, (tuple, list)):
        lo, hi = int(n_objects[0]), int(n_objects[1])
        n = int(rng.integers(lo, hi + 1))
    else:
        n = int(n_objects)
    if n < 0:
        raise ValueError(f"n_objects must be >= 0, got {n_objects}")
    pool = list(range(len(CLASS_NAMES))) if classes is None else [int(c) for c in classes]
    if any(not 0 <= c < len(CLASS_NAMES) for c in pool):
        raise ValueError(f"class indices must be in 0..{len(CLASS_NAMES) - 1}, got {list(pool)}")
    if classes is not None and len(pool) == n:
        cls_list = pool
    elif not pool:
        raise ValueError("classes is empty")
    elif same_class:
        cls_list = [pool[int(rng.integers(len(pool)))]] * n
    else:
        replace = n > len(pool)
        cls_list = [pool[i] for i in rng.choice(len(pool), size=n, replace=replace)]

    img = _background(h, w, rng)
    scale = min(w, h)
    rmin, rmax = SINGLE_RADIUS if n <= 1 else MULTI_RADIUS
    full_masks: list[np.ndarray] = []
    looks: list[tuple[int, str, str]] = []
    for ci in cls_list:
        name = CLASS_NAMES[ci]
        color = COLORS[int(rng.integers(len(COLORS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        placed = None
        for attempt in range(30):
            r = float(rng.uniform(rmin, rmax)) * scale * (0.97 ** attempt)
            cx = float(rng.uniform(r, w - r))
            cy = float(rng.uniform(r, h - r))
            rot = float(rng.uniform(-0.4, 0.4))
            aspect = float(rng.uniform(0.88, 1.14))
            m = _shape_mask(name, h, w, cx, cy, r, rot, aspect, bool(rng.random() < 0.5))
            area = int(m.sum())
            if area < 12:
                continue
            ok = True  # earlier objects keep at least half of their pixels visible
            vis_after = _visible(full_masks + [m])
            for k, prev in enumerate(full_masks):
                if vis_after[k].sum() < max(12, 0.5 * prev.sum()):
                    ok = False
                    break
            if ok:
                placed = m
                break
        if placed is None:
            continue  # no room: fewer objects (still deterministic)
        full_masks.append(placed)
        looks.append((ci, color, texture))

    # paint objects back to front
    for m, (ci, color, texture) in zip(full_masks, looks):
        rgb = np.array(COLOR_RGB[color], np.float32)
        pat = _pattern(texture, h, w, rng)
        shade = rng.uniform(0.85, 1.1)
        if pat is None:
            img[m] = np.clip(rgb * shade, 0, 255)
        else:
            img[m & ~pat] = np.clip(rgb * shade, 0, 255)
            img[m & pat] = np.clip(_second_tone(rgb) * shade, 0, 255)

    visible = _visible(full_masks)
    # a single object is sometimes crossed by an occluding bar painted in a background-like colour
    if len(full_masks) == 1 and rng.random() < 0.25:
        m = full_masks[0]
        box = _box_of(m)
        bar = np.zeros((h, w), np.uint8)
        x = float(rng.uniform(box[0], box[2]))
        thick = max(2, int(0.06 * scale))
        dx = float(rng.uniform(-0.3, 0.3)) * h
        cv2.line(bar, (int(x - dx), -5), (int(x + dx), h + 5), 1, thick)
        barm = bar.astype(bool)
        if (m & ~barm).sum() >= 0.6 * m.sum():
            col = rng.uniform(40, 215, 3).astype(np.float32)
            img[barm] = col
            visible = [m & ~barm]

    img += rng.standard_normal(img.shape, dtype=np.float32) * 4.0
    image = np.clip(img, 0, 255).astype(np.uint8)
    objects = [SceneObject(ci, CLASS_NAMES[ci], color, texture, _box_of(vm), vm)
               for vm, (ci, color, texture) in zip(visible, looks)]
    caption = make_caption(objects, int(rng.integers(5)))
    return Scene(image=image, objects=objects, caption=caption, seed=int(seed))


def _visible(full_masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are painted over earlier ones."""
    out = []
    cover = None
    for m in reversed(full_masks):
        out.append(m.copy() if cover is None else (m & ~cover))
        cover = m.copy() if cover is None else (cover | m)
    return out[::-1]


# =================================================================================================
# Part 2: writing the synthetic world in each real on-disk format
# =================================================================================================

SYNTH_VERSION = 3
FORMATS: tuple[str, ...] = ("cub", "wsol", "ilsvrc", "openimages", "voc", "coco", "flickr30k")
MANIFEST = "SYNTHETIC.json"
SIZE_RANGE = (112, 176)  # image W and H are drawn from this range (inclusive), per image

# Default split sizes (small enough for CPU). For "voc", "aug" are the extra SBD-like images that
# train_aug adds to train (train_aug = train + aug), and "test" is a held-out labelled split (the real VOC 2012
# test set has no public labels; the synthetic one does, so a method trained on train can be scored apart).
DEFAULT_COUNTS: dict[str, dict[str, int]] = {
    "cub": {"train": 1000, "val": 60, "test": 200},  # enough training images for a tiny CNN to learn shapes
    "wsol": {"train": 200, "val": 60, "test": 100},
    "ilsvrc": {"train": 200, "val": 50, "test": 100},
    "openimages": {"train": 200, "val": 50, "test": 100},
    "voc": {"train": 600, "val": 50, "aug": 50, "test": 100},
    "coco": {"train": 150, "val": 60},
    "flickr30k": {"train": 100, "val": 20, "test": 60},
}
# Synonyms (ILSVRC-style synset mapping) — the first is the class name.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "star": ("star", "five-pointed star"), "heart": ("heart", "love heart"), "ring": ("ring", "annulus", "donut"),
    "cross": ("cross", "plus sign"), "triangle": ("triangle", "trigon"), "moon": ("moon", "crescent"),
    "arrow": ("arrow", "pointer"), "hexagon": ("hexagon",), "diamond": ("diamond", "rhombus", "lozenge"),
    "drop": ("drop", "teardrop", "droplet"),
}
COCO_CATEGORY_IDS = (1, 2, 3, 5, 7, 8, 10, 13, 14, 15)  # non-contiguous on purpose (sorted-id mapping)
MULTI_INSTANCE_RATE = {"wsol": 0.25, "ilsvrc": 0.25, "openimages": 0.3}


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def synset_of(k: int) -> str:
    return f"n{90000000 + k:08d}"


def openimages_mid(k: int) -> str:
    return f"0syn{k}"


def cub_class_dir(k: int) -> str:
    return f"{k + 1:03d}.{CLASS_NAMES[k]}"


@dataclass
class PlannedImage:
    """One synthetic image as a writer puts it on disk and a loader should give it back."""

    fmt: str
    split: str
    index: int
    image_id: str  # Sample.image_id the real loader reports
    rel_path: str  # image path relative to the format's image root
    scene: Scene
    label: int | None = None  # single-label formats
    extra: dict = field(default_factory=dict)


def _split_code(split: str) -> int:
    import zlib

    return zlib.crc32(split.encode())


def image_seed(seed: int, fmt: str, split: str, index: int) -> int:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _split_code(fmt), _split_code(split), int(index)])
    return int(ss.generate_state(1)[0])


def _counts_for(fmt: str, n: int | None, counts: dict[str, int] | None) -> dict[str, int]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown synthetic format {fmt!r}; choose one of {', '.join(FORMATS)}")
    base = DEFAULT_COUNTS[fmt]
    if counts is not None:
        unknown = set(counts) - set(base)
        if unknown:
            raise ValueError(f"{fmt}: unknown split(s) {sorted(unknown)}; splits are {list(base)}")
        return {k: int(counts.get(k, 0)) for k in base}
    if n is None:
        return dict(base)
    n = int(n)
    if n < len(base):
        raise ValueError(f"{fmt}: n={n} is too small; need at least one image per split ({len(base)})")
    total = sum(base.values())
    out = {k: max(1, int(n * v / total)) for k, v in base.items()}
    largest = max(base, key=base.get)
    out[largest] += n - sum(out.values())
    return out


def plan_image(fmt: str, seed: int, split: str, index: int, size_range: tuple[int, int] = SIZE_RANGE) -> PlannedImage:
    """Deterministically decide (and render) image ``index`` of ``split`` for format ``fmt``."""
    s = image_seed(seed, fmt, split, index)
    rng = np.random.default_rng(s)
    w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    k_all = len(CLASS_NAMES)
    if fmt in ("cub", "wsol", "ilsvrc", "openimages"):
        label = index % k_all
        n_obj = 1
        if fmt in MULTI_INSTANCE_RATE and rng.random() < MULTI_INSTANCE_RATE[fmt]:
            n_obj = 2
        scene = render_scene(s, size=(w, h), n_objects=n_obj, classes=[label] * n_obj)
        if len(scene.objects) == 0:  # cannot happen for 1 object; defensive
            raise RuntimeError(f"synthetic {fmt}/{split}/{index}: no object placed")
        name = CLASS_NAMES[label]
        extra: dict = {}
        if fmt in ("cub", "wsol"):
            cdir = cub_class_dir(label)
            fname = (f"{s % 90000 + 10000}{index:03d}.jpg" if split == "val"  # CUBV2-like Flickr ids
                     else f"{name.capitalize()}_{index:04d}_{s % 97}.jpg")
            rel = f"{cdir}/{fname}"
            return PlannedImage(fmt, split, index, rel, rel, scene, label, extra)
        if fmt == "ilsvrc":
            wnid = synset_of(label)
            if split == "train":
                rel = f"train/{wnid}/{wnid}_{index}.JPEG"
            elif split == "val":
                rel = f"val2/{label}/{index}.jpeg"
            else:
                rel = f"val/ILSVRC2012_val_{index + 1:08d}.JPEG"
            return PlannedImage(fmt, split, index, rel, rel, scene, label, extra)
        # openimages
        mid = openimages_mid(label)
        stem = f"{s:016x}"[-16:]
        rel = f"{split}/{mid}/{stem}.jpg"
        if split != "train":
            extra["masks"] = [f"{split}/{mid}/{stem}_m{mid}_{(s >> (8 * j)) & 0xFFFFFFFF:08x}.png"
                              for j in range(len(scene.objects))]
            extra["ignore_path"] = f"{split}/{mid}/{stem}_ignore.png"
            ignore = _outline_band(scene.objects, 1)
            if rng.random() < 0.3:  # an extra ignored background region
                x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
                ignore[y0:y0 + int(rng.integers(6, h // 3)), x0:x0 + int(rng.integers(6, w // 3))] = True
            extra["ignore"] = ignore
        return PlannedImage(fmt, split, index, rel, rel, scene, label, extra)
    # multi-object formats: 1-4 objects, and in about a third of the images two of the same class
    n_obj = int(rng.integers(1, 5))
    cls = [int(c) for c in rng.choice(k_all, size=n_obj, replace=False)]
    if n_obj >= 2 and rng.random() < 0.35:
        cls[-1] = cls[0]
    scene = render_scene(s, size=(w, h), n_objects=n_obj, classes=cls)
    if fmt == "voc":
        year = {"train": 2008, "val": 2009, "aug": 2011, "test": 2010}[split]
        image_id = f"{year}_{index:06d}"
        difficult = [o.area < 0.012 * w * h for o in scene.objects]
        return PlannedImage(fmt, split, index, image_id, f"JPEGImages/{image_id}.jpg", scene, None,
                            {"difficult": difficult})
    if fmt == "coco":
        coco_id = 1000 + (index * 7919) % 100003 + (200000 if split == "val" else 0)
        fname = f"COCO_{split}2014_{coco_id:012d}.jpg"
        crowd = len(scene.objects) - 1 if (len(scene.objects) >= 2 and rng.random() < 0.15) else None
        return PlannedImage(fmt, split, index, fname[:-4], f"{split}2014/{fname}", scene, None,
                            {"coco_id": coco_id, "crowd": crowd})
    if fmt == "flickr30k":
        gi = index + {"train": 0, "val": 100000, "test": 200000}[split]
        image_id = str(10**9 + (gi * 7919) % 10**6)
        return PlannedImage(fmt, split, index, image_id, f"flickr30k_images/{image_id}.jpg", scene, None,
                            _flickr_plan(scene, rng))
    raise ValueError(f"unknown synthetic format {fmt!r}")


def _flickr_plan(scene: Scene, rng: np.random.Generator) -> dict:
    """Chains and 5 marked-up sentences for a multi-object scene."""
    objs = scene.objects
    n = len(objs)
    chains: dict[str, list[int]] = {str(11 + j): [j] for j in range(n)}  # chain → object indices
    obj_chain = [str(11 + j) for j in range(n)]
    by_class: dict[int, list[int]] = {}
    for j, o in enumerate(objs):
        by_class.setdefault(o.class_index, []).append(j)
    groups = []
    for ci, members in sorted(by_class.items()):
        if len(members) >= 2:
            g = str(21 + len(groups))
            chains[g] = list(members)
            groups.append((g, ci, members))
    scene_chain = "31"
    nobox_chain = "41" if rng.random() < 0.4 else None

    def ph(chain: str, text: str, types: tuple[str, ...] = ("other",)) -> list:
        return [("phrase", chain, types, text)]

    def obj(j: int) -> list:
        return ph(obj_chain[j], objs[j].phrase)

    def words(t: str) -> list:
        return [("word", t)]

    sents: list[list] = []
    if n == 0:
        sents = [ph(scene_chain, "a cluttered background", ("scene",)) + words(".")] * 5
    else:
        s0 = []
        for j in range(n):
            if j:
                s0 += words("," if j < n - 1 else "and")
            s0 += obj(j)
        s0 += words("on") + ph(scene_chain, "a cluttered background", ("scene",)) + words(".")
        sents.append(s0)
        k = int(rng.integers(n))
        sents.append(ph("0", "someone", ("notvisual",)) + words("drew") + obj(k) + words("."))
        if groups:
            g, ci, members = groups[0]
            others = [j for j in range(n) if j not in members]
            s2 = ph(g, f"two {plural(CLASS_NAMES[ci])}")
            s2 += (words("next to") + obj(others[0])) if others else words("side by side")
            sents.append(s2 + words("."))
        else:
            l = int(rng.integers(n))
            sents.append(words("there is") + obj(k) + (words("near") + obj(l) if l != k else []) + words("."))
        if nobox_chain is not None:
            sents.append(obj(k) + words("hides") + ph(nobox_chain, "a hidden shape") + words("."))
        else:
            sents.append(obj(k) + words("lies on") + ph(scene_chain, "the textured background", ("scene", "other"))
                         + words("."))
        sents.append(words("a picture of") + obj(int(rng.integers(n))) + words("."))
    return {"chains": chains, "obj_chain": obj_chain, "groups": [g for g, _, _ in groups],
            "scene_chain": scene_chain, "nobox_chain": nobox_chain, "sentences": sents}


def flickr_sentence_text(parts: list) -> tuple[str, list[tuple[str, str, tuple[str, ...], int]]]:
    """(marked-up line, [(phrase text as written, chain, types, first word index)]) for one planned sentence;
    the first word of the sentence is capitalised, as in Flickr30k."""
    tokens: list[str] = []
    phrases = []
    n_words = 0
    for i, part in enumerate(parts):
        if part[0] == "word":
            ws = part[1].split()
            if i == 0:
                ws[0] = ws[0][:1].upper() + ws[0][1:]
            tokens += ws
            n_words += len(ws)
        else:
            _, chain, types, text = part
            ws = text.split()
            if i == 0:
                ws[0] = ws[0][:1].upper() + ws[0][1:]
            tokens.append(f"[/EN#{chain}/{'/'.join(types)} " + " ".join(ws) + "]")
            phrases.append((" ".join(ws), chain, tuple(types), n_words))
            n_words += len(ws)
    return " ".join(tokens), phrases


def iter_plan(fmt: str, seed: int, counts: dict[str, int], size_range=SIZE_RANGE):
    for split, n in counts.items():
        for i in range(n):
            yield plan_image(fmt, seed, split, i, size_range)


def read_manifest(root: str | Path) -> dict:
    import json
    from pathlib import Path

    from .base import DatasetError

    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path} missing: not a synthetic dataset root (make one with `wsolbench "
                           f"make-synthetic`)") from exc


def load_plan(root: str | Path) -> dict[str, dict[str, PlannedImage]]:
    """Re-create what the generator drew for the dataset at ``root``: split → image_id → PlannedImage."""
    m = read_manifest(root)
    out: dict[str, dict[str, PlannedImage]] = {}
    for p in iter_plan(m["format"], m["seed"], m["split_counts"], tuple(m["size_range"])):
        out.setdefault(p.split, {})[p.image_id] = p
    return out


# ------------------------------------------------------------------------------------------- writers


def _save_jpeg(path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=92)


def _save_png(path, arr: np.ndarray, mode: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "1":
        Image.fromarray(arr.astype(bool)).save(path)
    elif mode == "L":
        Image.fromarray(arr.astype(np.uint8)).save(path)
    elif mode == "P":
        from .voc import voc_palette

        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, np.uint8).tobytes())
        im.putpalette(voc_palette())
        im.save(path)
    else:
        raise ValueError(mode)


def _box_ints(o: SceneObject) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in o.box)  # type: ignore[return-value]


def _write_wsol_boxes(out, fmt: str, plans: list[PlannedImage], counts: dict[str, int]) -> dict:
    from . import wsol_metadata as wm

    meta_name = "ILSVRC" if fmt == "ilsvrc" else "CUB"
    image_root = out / "images" if fmt == "cub" else out
    box_counts = {}
    for split in counts:
        rows = []
        for p in (q for q in plans if q.split == split):
            _save_jpeg(image_root / p.rel_path, p.scene.image)
            boxes = [_box_ints(o) for o in p.scene.objects]
            if fmt == "ilsvrc" and split == "train":
                boxes = []  # like the real ILSVRC train metadata: labels only
            rows.append({"id": p.image_id, "label": p.label, "size": p.scene.size, "boxes": boxes})
        write_sizes = not (fmt == "ilsvrc" and split == "train")
        wm.write_split(out / "metadata" / meta_name / split, rows, "boxes", write_sizes=write_sizes)
        box_counts[split] = sum(len(r["boxes"]) for r in rows)
    if fmt == "ilsvrc":
        box_counts.pop("train", None)
    return {"box_counts": box_counts}


def _write_cub_original(out, plans: list[PlannedImage]) -> None:
    """images.txt & co. over train+test (val = the CUBV2 analogue, only in the wsolevaluation metadata),
    and the segmentations release for those images."""
    orig = sorted((p for p in plans if p.split in ("train", "test")), key=lambda p: (p.label, p.image_id))
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for cid, p in enumerate(orig, 1):
        o = p.scene.objects[0]
        x0, y0, x1, y1 = _box_ints(o)
        lines["images.txt"].append(f"{cid} {p.image_id}")
        lines["image_class_labels.txt"].append(f"{cid} {p.label + 1}")
        lines["train_test_split.txt"].append(f"{cid} {1 if p.split == 'train' else 0}")
        lines["bounding_boxes.txt"].append(f"{cid} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}")
        _save_png(out / "segmentations" / p.image_id.replace(".jpg", ".png"), o.mask.astype(np.uint8) * 255, "L")
    for name, ls in lines.items():
        (out / name).write_text("\n".join(ls) + "\n", encoding="utf-8")  # the release has trailing newlines
    (out / "classes.txt").write_text("\n".join(f"{k + 1} {cub_class_dir(k)}" for k in range(len(CLASS_NAMES)))
                                     + "\n", encoding="utf-8")


def _write_ilsvrc_extras(out, plans: list[PlannedImage]) -> None:
    # synset mapping, written in reverse order on purpose (class index = SORTED synset order)
    lines = [f"{synset_of(k)} {', '.join(SYNONYMS[CLASS_NAMES[k]])}" for k in reversed(range(len(CLASS_NAMES)))]
    (out / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    xml_dir = out / "Annotations" / "CLS-LOC" / "val"
    xml_dir.mkdir(parents=True, exist_ok=True)
    for p in plans:
        if p.split != "test":
            continue
        stem = p.rel_path.split("/")[-1].rsplit(".", 1)[0]
        w, h = p.scene.size
        objs = "".join(
            f"<object><name>{synset_of(p.label)}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
            f"<ymax>{b[3]}</ymax></bndbox></object>" for b in (_box_ints(o) for o in p.scene.objects))
        (xml_dir / f"{stem}.xml").write_text(
            f"<annotation><folder>val</folder><filename>{stem}</filename><source><database>ILSVRC_2012"
            f"</database></source><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objs}</annotation>\n", encoding="utf-8")


def _write_openimages(out, plans: list[PlannedImage], counts: dict[str, int]) -> dict:
    from . import wsol_metadata as wm

    mask_counts = {}
    for split in counts:
        rows = []
        for p in (q for q in plans if q.split == split):
            _save_jpeg(out / p.rel_path, p.scene.image)
            row = {"id": p.image_id, "label": p.label, "size": p.scene.size}
            if split != "train":
                for o, m in zip(p.scene.objects, p.extra["masks"]):
                    _save_png(out / m, o.mask, "1")
                _save_png(out / p.extra["ignore_path"], p.extra["ignore"].astype(np.uint8) * 255, "L")
                row.update(masks=p.extra["masks"], ignore=p.extra["ignore_path"])
            rows.append(row)
        wm.write_split(out / "metadata" / "OpenImages" / split, rows, "masks", write_sizes=False)
        if split != "train":
            mask_counts[split] = sum(len(r["masks"]) for r in rows)
    (out / "class-descriptions-boxable.csv").write_text(
        "".join(f"/m/{openimages_mid(k)},{n}\n" for k, n in enumerate(CLASS_NAMES)), encoding="utf-8")
    return {"mask_counts": mask_counts}


VOC_IGNORE_BORDER = 1


def _voc_xml(p: PlannedImage) -> str:
    w, h = p.scene.size
    objs = []
    for o, diff in zip(p.scene.objects, p.extra["difficult"]):
        x0, y0, x1, y1 = _box_ints(o)
        objs.append(f"\t<object>\n\t\t<name>{o.name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0"
                    f"</truncated>\n\t\t<difficult>{int(diff)}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}"
                    f"</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n\t\t\t<xmax>{x1 + 1}</xmax>\n\t\t\t<ymax>{y1 + 1}"
                    f"</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return (f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{p.image_id}.jpg</filename>\n\t<size>\n"
            f"\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>1</segmented>\n{''.join(objs)}</annotation>\n")


def _write_voc(out, plans: list[PlannedImage], counts: dict[str, int]) -> dict:
    r = out / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets/Segmentation"):
        (r / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    ids: dict[str, list[str]] = {s: [] for s in counts}
    for p in plans:
        _save_jpeg(r / p.rel_path, p.scene.image)
        lm = p.scene.label_map(ignore_border=VOC_IGNORE_BORDER)
        if p.split in ("train", "val", "test"):
            _save_png(r / "SegmentationClass" / f"{p.image_id}.png", lm, "P")
        _save_png(r / "SegmentationClassAug" / f"{p.image_id}.png", lm, "L")
        (r / "Annotations" / f"{p.image_id}.xml").write_text(_voc_xml(p), encoding="utf-8")
        vec = np.zeros(len(CLASS_NAMES), np.float32)
        for o in p.scene.objects:
            vec[o.class_index] = 1.0
        labels[p.image_id] = vec
        ids[p.split].append(p.image_id)
    train_aug = ids["train"] + ids["aug"]
    seg = r / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_text("\n".join(ids["train"]) + "\n", encoding="utf-8")
    (seg / "val.txt").write_text("\n".join(ids["val"]) + "\n", encoding="utf-8")
    (seg / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n", encoding="utf-8")
    if ids.get("test"):
        (seg / "test.txt").write_text("\n".join(ids["test"]) + "\n", encoding="utf-8")
    (r / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
    v12 = out / "voc12"  # the MCTformer/IRN style list folder with the pickled image labels
    v12.mkdir(parents=True, exist_ok=True)
    np.save(v12 / "cls_labels.npy", labels, allow_pickle=True)
    (v12 / "train_id.txt").write_text("\n".join(ids["train"]) + "\n", encoding="utf-8")
    (v12 / "val_id.txt").write_text("\n".join(ids["val"]), encoding="utf-8")  # no trailing newline, like the real
    (v12 / "train_aug_id.txt").write_text("\n".join(train_aug) + "\n", encoding="utf-8")
    counts_out = {"train": len(ids["train"]), "val": len(ids["val"]),
                  "trainval": len(ids["train"]) + len(ids["val"]), "train_aug": len(train_aug)}
    if "test" in ids:
        counts_out["test"] = len(ids["test"])
    return {"counts": counts_out}


def coco_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """Pixel-edge polygons whose pycocotools rasterisation is exactly ``mask``; None when the mask has holes
    (COCO polygons cannot express them) or the rasterisation would differ (then use RLE)."""
    import cv2
    from pycocotools import mask as mask_utils

    h, w = mask.shape
    up = cv2.resize(mask.astype(np.uint8), (w * 2, h * 2), interpolation=cv2.INTER_NEAREST)
    contours, hier = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hier is None or (hier[0][:, 3] >= 0).any():
        return None
    polys = [((c[:, 0, :].astype(np.float64) + 0.5) / 2.0).round(2).flatten().tolist() for c in contours]
    polys = [p for p in polys if len(p) >= 6]
    if not polys:
        return None
    dec = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    return polys if np.array_equal(dec, mask) else None


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths starting with zeros), as used by crowd annotations."""
    flat = np.asfortranarray(mask.astype(np.uint8)).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def rle_compressed(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_coco(out, plans: list[PlannedImage], counts: dict[str, int]) -> dict:
    import json

    rng = np.random.default_rng(len(plans))
    cats = [{"id": COCO_CATEGORY_IDS[k], "name": n, "supercategory": "shape"} for k, n in enumerate(CLASS_NAMES)]
    cats = [cats[i] for i in rng.permutation(len(cats))]  # listed unsorted on purpose
    n_poly = n_rle = 0
    for split in counts:
        images, anns = [], []
        sp = [p for p in plans if p.split == split]
        for p in sp:
            _save_jpeg(out / p.rel_path, p.scene.image)
            w, h = p.scene.size
            images.append({"id": p.extra["coco_id"], "file_name": p.rel_path.split("/")[-1], "width": w,
                           "height": h})
            for j, o in enumerate(p.scene.objects):
                x0, y0, x1, y1 = _box_ints(o)
                crowd = p.extra["crowd"] == j
                if crowd:
                    seg = rle_uncompressed(o.mask)
                else:
                    seg = coco_polygons(o.mask)
                    if seg is None:
                        seg = rle_compressed(o.mask)
                        n_rle += 1
                    else:
                        n_poly += 1
                anns.append({"id": len(anns) + 1 + (10**6 if split == "val" else 0), "image_id": p.extra["coco_id"],
                             "category_id": COCO_CATEGORY_IDS[o.class_index], "segmentation": seg,
                             "area": float(o.area), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(crowd)})
        images = [images[i] for i in rng.permutation(len(images))]  # the loader sorts by id
        doc = {"info": {"description": "wsolbench synthetic COCO-format data"}, "licenses": [], "images": images,
               "annotations": anns, "categories": cats}
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(doc), encoding="utf-8")
    return {"segmentations": {"polygon": n_poly, "rle": n_rle}}


def _flickr_xml(p: PlannedImage) -> str:
    w, h = p.scene.size
    ex = p.extra
    objs = []
    for j, o in enumerate(p.scene.objects):
        names = [ex["obj_chain"][j]] + [g for g in ex["groups"] if j in ex["chains"][g]]
        x0, y0, x1, y1 = _box_ints(o)
        objs.append("<object>" + "".join(f"<name>{n}</name>" for n in names) +
                    f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax><ymax>{y1 + 1}"
                    f"</ymax></bndbox><truncated>0</truncated><occluded>0</occluded><difficult>0</difficult>"
                    f"</object>")
    objs.append(f"<object><name>{ex['scene_chain']}</name><nobndbox>0</nobndbox><scene>1</scene></object>")
    if ex["nobox_chain"] is not None:
        objs.append(f"<object><name>{ex['nobox_chain']}</name><nobndbox>1</nobndbox><scene>0</scene></object>")
    return (f"<annotation>\n<filename>{p.image_id}.jpg</filename>\n<size>\n<width>{w}</width>\n<height>{h}</height>\n"
            f"<depth>3</depth>\n</size>\n" + "\n".join(objs) + "\n</annotation>\n")


def _write_flickr(out, plans: list[PlannedImage], counts: dict[str, int]) -> dict:
    for sub in ("Sentences", "Annotations", "flickr30k_images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split in counts:
        ids = []
        for p in (q for q in plans if q.split == split):
            _save_jpeg(out / p.rel_path, p.scene.image)
            lines = [flickr_sentence_text(s)[0] for s in p.extra["sentences"]]
            (out / "Sentences" / f"{p.image_id}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            (out / "Annotations" / f"{p.image_id}.xml").write_text(_flickr_xml(p), encoding="utf-8")
            ids.append(p.image_id)
        (out / f"{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return {}


def make_synthetic(fmt: str, out: str | Path, n: int | None = None, seed: int = 0, *,
                   counts: dict[str, int] | None = None, overwrite: bool = False,
                   size_range: tuple[int, int] = SIZE_RANGE) -> "Path":
    """Generate the synthetic world in format ``fmt`` under ``out`` and return ``out``.

    fmt: cub (original CUB release + segmentations + wsolevaluation metadata incl. a CUBV2-like val),
    wsol (wsolevaluation CUB layout, a quarter of the images with two instances → several boxes),
    ilsvrc (wsolevaluation ILSVRC layout + val XMLs + synset mapping with synonyms), openimages (instance +
    ignore masks), voc (VOCdevkit/VOC2012 + voc12/cls_labels.npy), coco (instances JSON, polygons/RLE/crowd),
    flickr30k (Sentences/Annotations/splits). n: total images, split like DEFAULT_COUNTS[fmt] (default: those
    counts); counts: explicit per-split sizes. Deterministic by seed. Written to a temporary folder beside
    ``out`` and renamed into place, so ``out`` is never half-written. An existing non-empty ``out`` is an
    error unless ``overwrite``.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from .base import DatasetError

    split_counts = _counts_for(fmt, n, counts)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"make-synthetic: {out} exists and is not empty; choose another --out or overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        plans = list(iter_plan(fmt, seed, split_counts, size_range))
        info: dict = {}
        if fmt in ("cub", "wsol", "ilsvrc"):
            info.update(_write_wsol_boxes(tmp, fmt, plans, split_counts))
            if fmt == "cub":
                _write_cub_original(tmp, plans)
            if fmt == "ilsvrc":
                _write_ilsvrc_extras(tmp, plans)
        elif fmt == "openimages":
            info.update(_write_openimages(tmp, plans, split_counts))
        elif fmt == "voc":
            info.update(_write_voc(tmp, plans, split_counts))
        elif fmt == "coco":
            info.update(_write_coco(tmp, plans, split_counts))
        elif fmt == "flickr30k":
            info.update(_write_flickr(tmp, plans, split_counts))
        manifest = {"format": fmt, "seed": int(seed), "version": SYNTH_VERSION, "split_counts": split_counts,
                    "counts": info.pop("counts", split_counts), "size_range": list(size_range),
                    "class_names": list(CLASS_NAMES), "n_images": len(plans), **info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            if overwrite and any(out.iterdir()):
                shutil.rmtree(out)
            else:
                out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_synthetic(fmt: str, seed: int = 0) -> "Path":
    """``cache_dir()/synthetic/<fmt>`` with the default-size dataset, generated on first use (atomically;
    a concurrent generator's result is kept) and regenerated when its manifest is stale."""
    import json
    import shutil
    from pathlib import Path

    from wsolbench.paths import cache_dir

    target = cache_dir() / "synthetic" / fmt
    want = {"format": fmt, "seed": seed, "version": SYNTH_VERSION, "split_counts": _counts_for(fmt, None, None)}

    def fresh() -> bool:
        try:
            m = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return False
        return all(m.get(k) == v for k, v in want.items())

    if fresh():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{fmt}.build-{__import__('os').getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    make_synthetic(fmt, staging, seed=seed)
    if fresh():  # someone else finished first
        shutil.rmtree(staging, ignore_errors=True)
        return target
    if target.exists():
        stale = target.parent / f".{fmt}.stale-{__import__('os').getpid()}"
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not fresh():
            raise
    return Path(target)
