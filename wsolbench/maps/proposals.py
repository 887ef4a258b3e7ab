"""Region proposals for WWbL's open-world mode: OpenCV's selective search, grid boxes, the area filter.

The official ``inference_wwbl`` runs ``cv2.ximgproc.segmentation`` selective search (fast mode) on g's
normalised 224×224 input, adds square grid tiles of 1/2, 1/3 and 1/4 of the side, keeps boxes with
area > 0.1·224² and crops the kept boxes from the image resized to 224×224. ``cv2.ximgproc`` comes with
the opencv-contrib-python-headless package (the same ``cv2`` plus the contrib modules).

Boxes are ``x0, y0, x1, y1`` with x1 = x0 + width (exclusive end, like ``x + w`` of an OpenCV rect).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SELECTIVE_SEARCH_MODES = {"fast": "switchToSelectiveSearchFast", "quality": "switchToSelectiveSearchQuality",
                          "single": "switchToSingleStrategy"}


def selective_search(image: np.ndarray, mode: str = "fast") -> np.ndarray:
    """OpenCV's selective-search boxes (N, 4) int ``x0, y0, x1, y1`` of an H×W×3 image, given as it is (the
    official code passes the normalised float32 image).

    OpenCV ranks its regions with ``std::rand`` (not seedable from Python), so the order of its output changes
    from call to call while the set does not; the boxes come back by decreasing area, then x0, y0, x1, y1.
    """
    import cv2

    if mode not in SELECTIVE_SEARCH_MODES:
        raise ValueError(f"unknown selective search mode {mode!r}; use one of {sorted(SELECTIVE_SEARCH_MODES)}")
    arr = np.ascontiguousarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"selective search needs an H×W×3 image, got shape {arr.shape}")
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(arr)
    getattr(ss, SELECTIVE_SEARCH_MODES[mode])()
    rects = np.asarray(ss.process(), dtype=np.int64).reshape(-1, 4)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    area = rects[:, 2] * rects[:, 3]
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -area))
    return boxes[order]


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


def wwbl_proposals(ss_input: np.ndarray, mode: str = "fast",
                   grid_fractions: Sequence[float] = (1 / 2, 1 / 3, 1 / 4), min_area_frac: float = 0.1,
                   max_proposals: int | None = None) -> np.ndarray:
    """WWbL's proposal set in the pixels of ``ss_input`` (the H×W×3 image selective search sees; official: g's
    normalised 224×224 input): selective-search boxes (``mode`` "none": none) then grid boxes, those with area
    <= ``min_area_frac`` of the image dropped, the rest clipped to it; ``max_proposals`` keeps the first N
    (None keeps all, as the official code). Returns (N, 4) int ``x0, y0, x1, y1``."""
    h, w = ss_input.shape[:2]
    ss = selective_search(ss_input, mode) if mode != "none" else np.zeros((0, 4), np.int64)
    boxes = np.concatenate([ss, grid_boxes(w, h, grid_fractions)], axis=0)
    boxes = clip_boxes(area_filter(boxes, w, h, min_area_frac), w, h)
    return boxes[: int(max_proposals)] if max_proposals is not None else boxes
