"""Region proposals for WWbL's open-world mode: selective search (written here), grid boxes, the area filter.

Selective search (Uijlings et al., IJCV 2013), following the OpenCV contrib implementation's "fast" mode
(``switchToSelectiveSearchFast``), which the WWbL code calls — opencv-python-headless has no ``ximgproc``:

- base segmentations: Felzenszwalb–Huttenlocher graph segmentation (``skimage.segmentation.felzenszwalb``,
  sigma 0.8, k in {150, 300, 450}) of the image in HSV and in Lab;
- for each segmentation, two hierarchical groupings: similarity = mean of (colour, fill, texture, size)
  and mean of (fill, texture, size); neighbours = 8-connected adjacency of the label image;
- colour: 25-bin histogram per channel, L1-normalised, histogram intersection; texture: 8 oriented
  Gaussian-derivative responses per channel, 10 bins each, L1-normalised, intersection; size:
  1 − (s_i + s_j)/|image|; fill: 1 − (|BB_ij| − s_i − s_j)/|image|; merged histograms are size-weighted;
- every region of every hierarchy (initial and merged) is a proposal; rank = U(0,1) · level (OpenCV's rule,
  with a seeded generator), sorted ascending, duplicates removed.

Boxes are ``x0, y0, x1, y1`` with x1 = x0 + width (exclusive end, like ``x + w`` of an OpenCV rect).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

COLOUR_BINS = 25
TEXTURE_BINS = 10
TEXTURE_ORIENTATIONS = 8


def _to_uint8_rgb(image) -> np.ndarray:
    """PIL / HWC numpy (uint8 or float in [0, 1]) → HWC uint8 RGB."""
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImportError:  # pragma: no cover - PIL is a dependency
        pass
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an RGB image H×W×3, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return arr


def _colour_spaces(rgb: np.ndarray, names: Iterable[str]) -> list[np.ndarray]:
    """The image in each colour space, every channel scaled to [0, 255] float."""
    from skimage import color

    rgb01 = rgb.astype(np.float64) / 255.0
    out = []
    for name in names:
        if name == "hsv":
            img = color.rgb2hsv(rgb01) * 255.0
        elif name == "lab":
            lab = color.rgb2lab(rgb01)
            img = np.stack([lab[..., 0] * 2.55, lab[..., 1] + 128.0, lab[..., 2] + 128.0], axis=-1)
        elif name == "rgb":
            img = rgb.astype(np.float64)
        else:
            raise ValueError(f"unknown colour space {name!r}; use hsv, lab or rgb")
        out.append(np.clip(img, 0.0, 255.0))
    return out


def _texture_maps(img: np.ndarray) -> np.ndarray:
    """H×W×(C·8) oriented Gaussian-derivative magnitudes (positive parts, 8 directions), each in [0, 255]."""
    from scipy import ndimage

    maps = []
    for c in range(img.shape[2]):
        ch = img[..., c]
        gx = ndimage.gaussian_filter(ch, sigma=1.0, order=(0, 1))
        gy = ndimage.gaussian_filter(ch, sigma=1.0, order=(1, 0))
        for k in range(TEXTURE_ORIENTATIONS):
            theta = k * 2.0 * np.pi / TEXTURE_ORIENTATIONS
            r = np.maximum(gx * np.cos(theta) + gy * np.sin(theta), 0.0)
            hi = r.max()
            maps.append(r * (255.0 / hi) if hi > 0 else r)
    return np.stack(maps, axis=-1)


def _region_histograms(labels: np.ndarray, values: np.ndarray, bins: int, n: int) -> np.ndarray:
    """(n, channels·bins) L1-normalised per-region histograms of ``values`` (H×W×channels in [0, 255])."""
    flat_labels = labels.reshape(-1)
    chans = values.reshape(-1, values.shape[-1])
    idx = np.minimum((chans * (bins / 256.0)).astype(np.int64), bins - 1)  # bin per pixel per channel
    hists = np.zeros((n, chans.shape[1] * bins), dtype=np.float64)
    for c in range(chans.shape[1]):
        h = np.bincount(flat_labels * bins + idx[:, c], minlength=n * bins).reshape(n, bins)
        hists[:, c * bins:(c + 1) * bins] = h
    sums = hists.sum(axis=1, keepdims=True)
    return hists / np.maximum(sums, 1e-12)


def _adjacent_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Unordered pairs of labels that touch (horizontal, vertical and both diagonal neighbours)."""
    pairs = []
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:, :], labels[:-1, :]),
                 (labels[1:, 1:], labels[:-1, :-1]), (labels[1:, :-1], labels[:-1, 1:])):
        m = a != b
        lo = np.minimum(a[m], b[m])
        hi = np.maximum(a[m], b[m])
        pairs.append(np.stack([lo, hi], axis=1))
    allp = np.unique(np.concatenate(pairs, axis=0), axis=0) if pairs else np.zeros((0, 2), int)
    return {(int(i), int(j)) for i, j in allp}


@dataclass
class _Region:
    size: float
    box: tuple[int, int, int, int]  # x0, y0, x1 (exclusive), y1 (exclusive)
    colour: np.ndarray
    texture: np.ndarray
    level: int


def _similarity(a: _Region, b: _Region, measures: Sequence[str], im_size: float) -> float:
    total = 0.0
    for m in measures:
        if m == "colour":
            total += float(np.minimum(a.colour, b.colour).sum())
        elif m == "texture":
            total += float(np.minimum(a.texture, b.texture).sum())
        elif m == "size":
            total += 1.0 - (a.size + b.size) / im_size
        elif m == "fill":
            x0, y0 = min(a.box[0], b.box[0]), min(a.box[1], b.box[1])
            x1, y1 = max(a.box[2], b.box[2]), max(a.box[3], b.box[3])
            total += 1.0 - ((x1 - x0) * (y1 - y0) - a.size - b.size) / im_size
        else:
            raise ValueError(f"unknown similarity {m!r}; use colour, texture, size, fill")
    return total / len(measures)


def hierarchical_grouping(labels: np.ndarray, colour_img: np.ndarray, texture_maps: np.ndarray,
                          measures: Sequence[str]) -> list[tuple[tuple[int, int, int, int], int]]:
    """Greedy merging of adjacent regions by decreasing similarity until one region is left.

    Returns every region ever formed as (box, level), the initial regions at level 1.
    """
    labels = np.asarray(labels)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(colour_img.shape[:2])
    n = int(labels.max()) + 1
    h, w = labels.shape
    im_size = float(h * w)
    sizes = np.bincount(labels.reshape(-1), minlength=n).astype(np.float64)
    ys, xs = np.indices((h, w))
    flat = labels.reshape(-1)
    x0 = np.full(n, w, np.int64)
    y0 = np.full(n, h, np.int64)
    x1 = np.zeros(n, np.int64)
    y1 = np.zeros(n, np.int64)
    np.minimum.at(x0, flat, xs.reshape(-1))
    np.minimum.at(y0, flat, ys.reshape(-1))
    np.maximum.at(x1, flat, xs.reshape(-1) + 1)
    np.maximum.at(y1, flat, ys.reshape(-1) + 1)
    colour = _region_histograms(labels, colour_img, COLOUR_BINS, n)
    texture = _region_histograms(labels, texture_maps, TEXTURE_BINS, n)

    regions: dict[int, _Region] = {
        i: _Region(sizes[i], (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])), colour[i], texture[i], 1)
        for i in range(n)
    }
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for i, j in _adjacent_pairs(labels):
        neighbours[i].add(j)
        neighbours[j].add(i)
    heap: list[tuple[float, int, int, int]] = []
    counter = 0
    for i in range(n):
        for j in neighbours[i]:
            if j > i:
                heapq.heappush(heap, (-_similarity(regions[i], regions[j], measures, im_size), counter, i, j))
                counter += 1
    out = [(r.box, r.level) for r in regions.values()]
    alive = set(regions)
    next_id = n
    while heap:
        _, _, i, j = heapq.heappop(heap)
        if i not in alive or j not in alive:
            continue  # a stale pair: one side was merged already
        a, b = regions[i], regions[j]
        s = a.size + b.size
        new = _Region(
            size=s,
            box=(min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3])),
            colour=(a.size * a.colour + b.size * b.colour) / s,
            texture=(a.size * a.texture + b.size * b.texture) / s,
            level=max(a.level, b.level) + 1,
        )
        k = next_id
        next_id += 1
        regions[k] = new
        alive.discard(i)
        alive.discard(j)
        nb = (neighbours.pop(i) | neighbours.pop(j)) - {i, j}
        neighbours[k] = nb
        for m in nb:
            neighbours[m].discard(i)
            neighbours[m].discard(j)
            neighbours[m].add(k)
            heapq.heappush(heap, (-_similarity(new, regions[m], measures, im_size), counter, m, k))
            counter += 1
        alive.add(k)
        out.append((new.box, new.level))
    return out


FAST_STRATEGIES = (("colour", "fill", "texture", "size"), ("fill", "texture", "size"))


def selective_search(image, mode: str = "fast", base_k: int = 150, inc_k: int = 150, sigma: float = 0.8,
                     min_size: int = 100, seed: int = 0) -> np.ndarray:
    """Selective-search boxes (N, 4) int ``x0, y0, x1, y1`` for one RGB image, best-ranked first.

    ``mode``: "fast" (HSV + Lab, k = base_k, base_k+inc_k, base_k+2·inc_k, two strategies — OpenCV's
    ``switchToSelectiveSearchFast``) or "single" (HSV, k = base_k, the colour+fill+texture+size strategy —
    OpenCV's ``switchToSingleStrategy``).
    """
    from skimage.segmentation import felzenszwalb

    rgb = _to_uint8_rgb(image)
    if mode == "fast":
        spaces, ks, strategies = ("hsv", "lab"), (base_k, base_k + inc_k, base_k + 2 * inc_k), FAST_STRATEGIES
    elif mode == "single":
        spaces, ks, strategies = ("hsv",), (base_k,), FAST_STRATEGIES[:1]
    else:
        raise ValueError(f"unknown selective search mode {mode!r}; use 'fast' or 'single'")
    rng = np.random.default_rng(seed)
    ranked: list[tuple[float, tuple[int, int, int, int]]] = []
    for img in _colour_spaces(rgb, spaces):
        tex = _texture_maps(img)
        for k in ks:
            labels = felzenszwalb(img / 255.0, scale=float(k), sigma=sigma, min_size=min_size, channel_axis=-1)
            for measures in strategies:
                for box, level in hierarchical_grouping(labels, img, tex, measures):
                    ranked.append((float(rng.random()) * level, box))
    ranked.sort(key=lambda t: t[0])
    seen: set[tuple[int, int, int, int]] = set()
    boxes = []
    for _, box in ranked:
        if box not in seen:
            seen.add(box)
            boxes.append(box)
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def grid_boxes(width: int, height: int, fractions: Sequence[float] = (1 / 2, 1 / 3, 1 / 4)) -> np.ndarray:
    """Square-ish tiles: for each fraction f a tile of int(side·f)+1 pixels per axis, laid from the top-left
    corner with that step (the WWbL rule). Tiles are NOT clipped here (so the area filter sees the tile size);
    use ``clip_boxes`` afterwards. Returns (N, 4) int ``x0, y0, x1, y1``."""
    boxes = []
    for f in fractions:
        bw, bh = int(width * f) + 1, int(height * f) + 1
        for x in range(0, width, bw):
            for y in range(0, height, bh):
                boxes.append((x, y, x + bw, y + bh))
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def area_filter(boxes: np.ndarray, width: int, height: int, min_area_frac: float = 0.1) -> np.ndarray:
    """Keep boxes whose area (x1−x0)·(y1−y0) is STRICTLY greater than ``min_area_frac`` of the image."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[area > min_area_frac * width * height]


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.asarray(boxes).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    return boxes


def wwbl_proposals(image, size: int | None = 224, mode: str = "fast",
                   grid_fractions: Sequence[float] = (1 / 2, 1 / 3, 1 / 4), min_area_frac: float = 0.1,
                   max_proposals: int | None = None, seed: int = 0, **ss_kwargs) -> np.ndarray:
    """WWbL's proposal set for one image, in ORIGINAL image pixels (float ``x0, y0, x1, y1``).

    The image is resized to ``size``×``size`` (the WWbL code works at 224; None = keep the size), selective
    search boxes then grid boxes are collected, boxes with area <= ``min_area_frac`` of the (resized) image
    are dropped, the rest clipped to the image; ``max_proposals`` keeps the first N (selective-search rank
    order, then grid) — None keeps all, as the official code does.
    """
    rgb = _to_uint8_rgb(image)
    h0, w0 = rgb.shape[:2]
    if size is not None and (h0, w0) != (size, size):
        from PIL import Image

        work = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    else:
        work = rgb
    h, w = work.shape[:2]
    ss = selective_search(work, mode=mode, seed=seed, **ss_kwargs) if mode != "none" else np.zeros((0, 4), int)
    boxes = np.concatenate([ss, grid_boxes(w, h, grid_fractions)], axis=0)
    boxes = clip_boxes(area_filter(boxes, w, h, min_area_frac), w, h)
    if max_proposals is not None:
        boxes = boxes[: int(max_proposals)]
    scale = np.array([w0 / w, h0 / h, w0 / w, h0 / h], dtype=np.float64)
    return (boxes.astype(np.float64) * scale).astype(np.float32)
