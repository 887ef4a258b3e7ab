"""Grounding box accuracy (WWbL, talshaharabany/what-is-where-by-looking utils_grounding.py).

Per (image, entity): the map is min-max normalised and coloured with matplotlib's "cubehelix" colormap,
converted to gray (cv2 RGB2GRAY), zeroed at or below int(0.5 · max) (cv2 THRESH_TOZERO), and every contour
(RETR_TREE) gives a box with confidence = mean thresholded gray value in the box / 255. The boxes go
through torchvision NMS (IoU 0.05; the reference hands NMS the (x, y, w, h) rectangles as if they were
corners, which is reproduced), the survivors with confidence > 0.5 × the best are kept and merged into
their union box. GT = union of the entity's boxes. Both are normalised by their image size and the
entity is correct when IoU (no +1) ≥ 0.5. Accuracy = 100 · correct / entities.

The colormap is matplotlib's own "cubehelix" (256 entries), as in the reference.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import cv2
import numpy as np

from .base import Metric, MetricInputError, as_list, check_lengths, to_numpy
from .policy import ThresholdPolicy

NO_THRESHOLD = "none (threshold-free)"


@lru_cache(maxsize=1)
def cubehelix_lut(n: int = 256) -> np.ndarray:
    """matplotlib's "cubehelix" lookup table: (n + 3, 4) RGBA float64 rows; rows n, n + 1, n + 2 are the
    under, over and "bad" (NaN) colours."""
    from matplotlib import colormaps

    cmap = colormaps["cubehelix"].resampled(n)
    return np.vstack([cmap(np.linspace(0, 1, n)), cmap.get_under(), cmap.get_over(), cmap.get_bad()])


def cubehelix_gray(cam: np.ndarray) -> np.ndarray:
    """WWbL's ``intensity_to_rgb(cam, normalize=True)`` → uint8 → ``cv2.cvtColor(RGB2GRAY)``."""
    n = 256
    lut = cubehelix_lut(n)
    x = cam.astype(np.float64)  # copy
    with np.errstate(invalid="ignore", divide="ignore"):
        x -= x.min()
        x /= x.max()
    bad = np.isnan(x)
    x *= n
    x[x == n] = n - 1
    under, over = x < 0, x >= n
    with np.errstate(invalid="ignore"):
        idx = x.astype(int)
    idx[under] = n
    idx[over] = n + 1
    idx[bad] = n + 2
    rgb = lut.take(idx, axis=0, mode="clip")[..., :3]
    rgb8 = (rgb.astype(np.float32) * 255.0).astype(np.uint8)
    return cv2.cvtColor(rgb8, cv2.COLOR_RGB2GRAY)


def generate_box(cam: np.ndarray, threshold: float = 0.5, nms_threshold: float = 0.05,
                 max_drop_th: float = 0.5) -> tuple[float, float, float, float]:
    """The predicted box (x0, y0, x1, y1) in map pixels: the union of WWbL's kept proposals."""
    import torch
    import torchvision

    gray = cubehelix_gray(cam)
    thr_val = threshold * np.max(gray)
    _, thr_gray = cv2.threshold(gray, int(thr_val), 255, cv2.THRESH_TOZERO)
    contours = cv2.findContours(thr_gray, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        boxes = [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    else:
        proposals = [cv2.boundingRect(c) for c in contours]
        conf = [thr_gray[y:y + h, x:x + w].mean() / 255 for (x, y, w, h) in proposals]
        keep = torchvision.ops.nms(torch.tensor(proposals).float(), torch.tensor(conf).float(), nms_threshold)
        est = torch.cat((torch.tensor(proposals).float()[keep], torch.tensor(conf)[keep].unsqueeze(dim=1)),
                        dim=1).tolist()
        best = np.max(conf)
        boxes = [(x, y, x + w, y + h, c) for (x, y, w, h, c) in est if c > max_drop_th * best]
    arr = np.array(boxes)[:, :4]
    mins, maxes = np.min(arr, axis=0), np.max(arr, axis=0)
    return float(mins[0]), float(mins[1]), float(maxes[2]), float(maxes[3])


def _iou_no_plus1(a: tuple, b: tuple) -> float:
    xa, ya = max(a[0], b[0]), max(a[1], b[1])
    xb, yb = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, xb - xa) * max(0, yb - ya)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    den = float(area_a + area_b - inter)
    return inter / den if den != 0 else 0.0


class GroundingBoxAccuracy(Metric):
    """WWbL grounding box accuracy.

    ``update(maps, gt_boxes, image_sizes=None)``: per (image, entity), the map (any resolution; the
    contract feeds the original resolution), the entity's GT boxes (N ≥ 1, 4) x0,y0,x1,y1 in original
    pixels, and the original (W, H) (default: the map's own size). The predicted box is normalised by
    the map's width and height (WWbL divides both axes by the side of its square map), the GT boxes by
    the image's."""

    higher_is_better: ClassVar[dict[str, bool]] = {"box_acc": True}
    primary: ClassVar[str] = "box_acc"

    def __init__(self) -> None:
        super().__init__()
        self._add_state("correct", np.zeros((), np.int64))

    def options(self) -> dict[str, Any]:
        return {"metric": "GroundingBoxAccuracy",
                "rule": "cubehelix gray > int(0.5·max), contour boxes, NMS 0.05, keep conf > 0.5·best, "
                        "union box; IoU (no +1) ≥ 0.5 vs union GT box"}

    def update(self, maps: Any, gt_boxes: Any, image_sizes: Any = None) -> None:
        maps_l = as_list(maps, "maps")
        boxes_l = as_list(gt_boxes, "gt_boxes")
        sizes_l = as_list(image_sizes, "image_sizes") if image_sizes is not None else None
        check_lengths("GroundingBoxAccuracy.update", maps=maps_l, gt_boxes=boxes_l, image_sizes=sizes_l)
        correct = 0
        for i, (m, b) in enumerate(zip(maps_l, boxes_l)):
            where = self._where(i)
            cam = to_numpy(m)
            if cam.ndim != 2 or cam.size == 0 or cam.dtype.kind not in "fiu":
                raise MetricInputError(f"{where}: map must be a 2-D real array, got shape {cam.shape} "
                                       f"dtype {cam.dtype}")
            if cam.dtype.kind == "f" and not np.isfinite(cam).all():
                raise MetricInputError(f"{where}: map contains NaN/inf")
            mh, mw = cam.shape
            iw, ih = (float(s) for s in sizes_l[i]) if sizes_l is not None else (float(mw), float(mh))
            bb = to_numpy(b).astype(np.float64)
            if bb.ndim == 1 and bb.size == 4:
                bb = bb[None]
            if bb.ndim != 2 or bb.shape[1] != 4 or len(bb) == 0:
                raise MetricInputError(f"{where}: GT boxes must be an (N ≥ 1, 4) array, got shape {bb.shape}")
            if (bb < 0).any() or (bb[:, 2] < bb[:, 0]).any() or (bb[:, 3] < bb[:, 1]).any() \
                    or (bb[:, 2] > iw).any() or (bb[:, 3] > ih).any():
                raise MetricInputError(f"{where}: GT boxes {bb.tolist()} are not x0 ≤ x1, y0 ≤ y1 inside the "
                                       f"{iw:g}×{ih:g} image")
            norm = bb.copy()
            norm[:, 0] = bb[:, 0] / iw
            norm[:, 1] = bb[:, 1] / ih
            norm[:, 2] = bb[:, 2] / iw
            norm[:, 3] = bb[:, 3] / ih
            mins, maxes = np.min(norm, axis=0), np.max(norm, axis=0)
            gt = (mins[0], mins[1], maxes[2], maxes[3])
            px0, py0, px1, py1 = generate_box(cam)
            pred = (px0 / mw, py0 / mh, px1 / mw, py1 / mh)
            correct += _iou_no_plus1(pred, gt) >= 0.5
        self._state["correct"] += int(correct)
        self._state["count"] += len(maps_l)

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        return {"metric": "GroundingBoxAccuracy",
                "box_acc": float(self._state["correct"]) * 100 / self.count,
                "correct": int(self._state["correct"]), "threshold_policy": NO_THRESHOLD, "tau": None,
                "count": self.count}


def grounding_box_accuracy(maps: Any, gt_boxes: Any, image_sizes: Any = None) -> dict[str, Any]:
    """One-shot WWbL grounding box accuracy (see ``GroundingBoxAccuracy``)."""
    metric = GroundingBoxAccuracy()
    metric.update(maps, gt_boxes, image_sizes)
    return metric.compute()
