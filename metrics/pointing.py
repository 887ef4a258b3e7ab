"""Pointing games.

``PointingGame`` follows TorchRay (torchray/benchmark/pointing_game.py, Zhang et al. 2016): the point is
the first maximum (row-major) of the map at the original image resolution; it hits when some GT pixel
of the class lies strictly within ``tolerance`` pixels: (x−u)² + (y−v)² < tolerance². Accuracy = mean over
ALL ``num_classes`` classes of hits / max(hits + misses, 1), TorchRay's ``class_accuracies.mean()``.

``PhrasePointing`` follows the phrase-grounding rule (hassanhub/MultiGrounding ``isCorrectHit``, used by
WWbL): the argmax of the map (resized bilinearly to the original size when ``image_sizes`` is given) hits
when x0 ≤ x ≤ x1 and y0 ≤ y ≤ y1 for some GT box of the phrase; accuracy = hits / queries.
"""
from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np

from .base import Metric, MetricInputError, as_list, check_lengths, to_numpy
from .policy import ThresholdPolicy

NO_THRESHOLD = "none (threshold-free)"


def _check_map(m: Any, where: str) -> np.ndarray:
    arr = to_numpy(m)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise MetricInputError(f"{where}: map must be 2-D (H×W), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise MetricInputError(f"{where}: map must be real-valued, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise MetricInputError(f"{where}: map contains NaN")
    return arr


def argmax_point(m: np.ndarray) -> tuple[int, int]:
    """(x, y) of the first maximum in row-major order."""
    idx = int(np.argmax(m))
    y, x = divmod(idx, m.shape[1])
    return x, y


def union_box(boxes: Any) -> np.ndarray:
    """The (1, 4) box around all ``boxes`` (x0,y0,x1,y1): WWbL stores each entity's union box and scores
    pointing and box accuracy against it (a point between two boxes of one entity is a hit)."""
    b = to_numpy(boxes)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4 or len(b) == 0:
        raise MetricInputError(f"union_box: expected an (N ≥ 1, 4) array of boxes, got shape {b.shape}")
    return np.concatenate([b[:, :2].min(axis=0), b[:, 2:].max(axis=0)])[None]


def resize_bilinear(m: Any, size: tuple[int, int]) -> np.ndarray:
    """TorchRay's ``resize_saliency``: ``F.interpolate(mode="bilinear", align_corners=False)`` of one map to
    ``size`` = (W, H), in float32."""
    import torch
    import torch.nn.functional as F

    arr = np.ascontiguousarray(to_numpy(m), dtype=np.float32)
    w, h = int(size[0]), int(size[1])
    if arr.shape == (h, w):
        return arr
    return F.interpolate(torch.from_numpy(arr)[None, None], size=(h, w), mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def boxes_to_mask(boxes: Any, shape: tuple[int, int], where: str = "boxes") -> np.ndarray:
    """Union of boxes as a boolean H×W mask; boxes are x0,y0,x1,y1 0-based INCLUSIVE pixel coordinates
    (VOC XML 1-based coordinates minus 1), truncated with int() — TorchRay's ``voc_as_mask``."""
    b = to_numpy(boxes)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4 or b.dtype.kind not in "iuf":
        raise MetricInputError(f"{where}: GT boxes must be an (N, 4) numeric array, got shape {b.shape}")
    h, w = shape
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in b.tolist():
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h or x1 < x0 or y1 < y0:
            raise MetricInputError(f"{where}: GT box {[x0, y0, x1, y1]} outside the {w}×{h} image "
                                   f"(0-based inclusive coordinates) or not x0 ≤ x1, y0 ≤ y1")
        mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


def _gt_mask(gt: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    g = to_numpy(gt)
    if g.dtype == bool:
        if g.shape != shape:
            raise MetricInputError(f"{where}: GT mask has shape {g.shape}, the map has {shape}")
        return g
    return boxes_to_mask(g, shape, where)


def _hit(mask: np.ndarray, x: int, y: int, tolerance: int) -> bool:
    h, w = mask.shape
    r = tolerance
    ya, yb, xa, xb = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
    win = mask[ya:yb, xa:xb]
    if not win.any():
        return False
    yy, xx = np.nonzero(win)
    d2 = (yy + ya - y) ** 2 + (xx + xa - x) ** 2
    return bool((d2 < tolerance ** 2).any())


class PointingGame(Metric):
    """TorchRay pointing game.

    ``update(maps, gts, class_ids)``: one entry per evaluated (image, class) pair —
    ``maps[i]`` the H×W map at the original image resolution (any real values; the first argmax is the
    point), ``gts[i]`` either a boolean H×W mask of the class (COCO: union of its ``annToMask``) or an
    (N, 4) array of its boxes as 0-based inclusive pixel coordinates (VOC: XML value − 1), and
    ``class_ids[i]`` the class index in 0..num_classes−1. Pairs TorchRay skips (a VOC class whose boxes
    are all "difficult"; the easy pairs of the EBP "difficult" subset) are simply not passed. An empty GT
    (e.g. a COCO annotation whose mask has no pixel) is an error unless ``allow_empty_gt=True``: then it is a
    miss, as in TorchRay.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"pointing_acc": True, "pointing_acc_overall": True,
                                                   "pointing_acc_seen_classes": True}
    primary: ClassVar[str] = "pointing_acc"

    def __init__(self, num_classes: int, tolerance: int = 15, *, allow_empty_gt: bool = False) -> None:
        super().__init__()
        self.allow_empty_gt = bool(allow_empty_gt)
        if int(num_classes) < 1:
            raise MetricInputError(f"num_classes must be ≥ 1, got {num_classes}")
        if int(tolerance) != tolerance or tolerance < 0:
            raise MetricInputError(f"tolerance must be a non-negative integer (pixels), got {tolerance}")
        self.num_classes = int(num_classes)
        self.tolerance = int(tolerance)
        self._add_state("hits", np.zeros(self.num_classes, np.int64))
        self._add_state("misses", np.zeros(self.num_classes, np.int64))

    def options(self) -> dict[str, Any]:
        return {"metric": "PointingGame", "num_classes": self.num_classes, "tolerance": self.tolerance,
                "rule": "first argmax; hit if a GT pixel has (x−u)²+(y−v)² < tolerance²; mean over classes",
                "empty_gt": "miss" if self.allow_empty_gt else "error"}

    def update(self, maps: Any, gts: Any, class_ids: Any) -> None:
        maps_l = as_list(maps, "maps")
        gts_l = as_list(gts, "gts")
        cls_l = as_list(class_ids, "class_ids")
        check_lengths("PointingGame.update", maps=maps_l, gts=gts_l, class_ids=cls_l)
        results = []
        for i, (m, g, c) in enumerate(zip(maps_l, gts_l, cls_l)):
            where = self._where(i)
            m = _check_map(m, where)
            mask = _gt_mask(g, m.shape, where)
            if not mask.any() and not self.allow_empty_gt:
                raise MetricInputError(f"{where}: empty GT (no box / no mask pixel) for class {c}; "
                                       f"PointingGame(allow_empty_gt=True) counts it as a miss (TorchRay)")
            c = int(c)
            if not 0 <= c < self.num_classes:
                raise MetricInputError(f"{where}: class id {c} outside 0..{self.num_classes - 1}")
            x, y = argmax_point(m)
            results.append((c, _hit(mask, x, y, self.tolerance)))
        for c, hit in results:
            self._state["hits" if hit else "misses"][c] += 1
        self._state["count"] += len(results)

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        hits = self._state["hits"].astype(np.float64)
        total = hits + self._state["misses"]
        class_acc = hits / np.maximum(total, 1)
        seen = total > 0
        return {
            "metric": "PointingGame",
            "pointing_acc": float(class_acc.mean() * 100),
            "pointing_acc_overall": float(hits.sum() / total.sum() * 100),
            "pointing_acc_seen_classes": float(class_acc[seen].mean() * 100),
            "per_class_acc": [float(a) * 100 for a in class_acc],
            "classes_evaluated": int(seen.sum()),
            "hits": int(hits.sum()),
            "misses": int(self._state["misses"].sum()),
            "threshold_policy": NO_THRESHOLD,
            "tau": None,
            "count": self.count,
            "tolerance": self.tolerance,
        }


def pointing_game(maps: Any, gt: Any, *, tolerance: int = 15, per_class: bool = True,
                  class_ids: Any = None, num_classes: int | None = None) -> dict[str, Any]:
    """One-shot pointing game (see ``PointingGame``). ``per_class`` → the TorchRay mean over classes
    (``pointing_acc``); otherwise hits / all pairs. Without ``class_ids`` every pair is class 0."""
    maps_l = as_list(maps, "maps")
    ids = [0] * len(maps_l) if class_ids is None else [int(c) for c in as_list(class_ids, "class_ids")]
    n = num_classes if num_classes is not None else (max(ids) + 1 if ids else 1)
    metric = PointingGame(n, tolerance)
    metric.update(maps_l, gt, ids)
    out = metric.compute()
    out["pointing"] = out["pointing_acc"] if per_class else out["pointing_acc_overall"]
    return out


class PhrasePointing(Metric):
    """Phrase-grounding pointing accuracy (MultiGrounding ``isCorrectHit``).

    ``update(maps, gt_boxes, image_sizes=None)``: per query, the map, the phrase's GT boxes (N ≥ 1, 4)
    x0,y0,x1,y1 in original pixels, and optionally the original (W, H) to resize the map to with
    ``cv2.resize`` (bilinear, as the reference does); without it the map must already be at the
    original resolution. Queries the reference skips (no box, "notvisual", union box < 5% of the image)
    are not passed."""

    higher_is_better: ClassVar[dict[str, bool]] = {"pointing_acc": True}
    primary: ClassVar[str] = "pointing_acc"

    def __init__(self) -> None:
        super().__init__()
        self._add_state("hits", np.zeros((), np.int64))

    def options(self) -> dict[str, Any]:
        return {"metric": "PhrasePointing",
                "rule": "argmax (after bilinear resize to the original size) inside any GT box, inclusive"}

    def update(self, maps: Any, gt_boxes: Any, image_sizes: Any = None) -> None:
        maps_l = as_list(maps, "maps")
        boxes_l = as_list(gt_boxes, "gt_boxes")
        sizes_l = as_list(image_sizes, "image_sizes") if image_sizes is not None else None
        check_lengths("PhrasePointing.update", maps=maps_l, gt_boxes=boxes_l, image_sizes=sizes_l)
        hits = 0
        for i, (m, b) in enumerate(zip(maps_l, boxes_l)):
            where = self._where(i)
            m = _check_map(m, where)
            if sizes_l is not None:
                w, h = (int(s) for s in sizes_l[i])
                m = cv2.resize(m if m.dtype.kind == "f" else m.astype(np.float32), (w, h))
            h, w = m.shape
            bb = to_numpy(b)
            if bb.ndim == 1 and bb.size == 4:
                bb = bb[None]
            if bb.ndim != 2 or bb.shape[1] != 4 or bb.dtype.kind not in "iuf":
                raise MetricInputError(f"{where}: GT boxes must be an (N, 4) numeric array, got shape {bb.shape}")
            if len(bb) == 0:
                raise MetricInputError(f"{where}: the query has no GT box (empty GT)")
            if (bb[:, 2] < bb[:, 0]).any() or (bb[:, 3] < bb[:, 1]).any() or (bb < 0).any() \
                    or (bb[:, 0] > w).any() or (bb[:, 1] > h).any():
                raise MetricInputError(f"{where}: GT boxes {bb.tolist()} are not x0 ≤ x1, y0 ≤ y1 inside the "
                                       f"{w}×{h} image")
            x, y = argmax_point(m)
            hits += bool(((bb[:, 0] <= x) & (x <= bb[:, 2]) & (bb[:, 1] <= y) & (y <= bb[:, 3])).any())
        self._state["hits"] += hits
        self._state["count"] += len(maps_l)

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        return {"metric": "PhrasePointing",
                "pointing_acc": float(self._state["hits"]) / self.count * 100,
                "hits": int(self._state["hits"]), "threshold_policy": NO_THRESHOLD, "tau": None,
                "count": self.count}


def phrase_pointing(maps: Any, gt_boxes: Any, image_sizes: Any = None) -> dict[str, Any]:
    """One-shot phrase pointing accuracy (see ``PhrasePointing``)."""
    metric = PhrasePointing()
    metric.update(maps, gt_boxes, image_sizes)
    return metric.compute()
