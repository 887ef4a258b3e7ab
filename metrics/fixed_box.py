"""Box accuracy at ONE fixed threshold, as the GenPromp and WWbL papers scored their boxes.

Unlike MaxBoxAcc (a τ sweep, best τ taken), these protocols threshold every map once:

    g = uint8(map · 255)  (``gray="uint8"``, GenPromp get_bboxes)
        or WWbL's cubehelix gray (``gray="cubehelix"``, WWbL utils.generate_bbox)
    keep g where g > int(τ · max g)            (cv2.THRESH_TOZERO)
    box = boundingRect of the largest contour (cv2.findContours RETR_TREE, cv2.contourArea; first on ties)
          as (x, y, x + w, y + h), NOT clipped to the map; no contour → [0, 0, 1, 1]

then compare the box with every GT box by IoU with the +1 pixel convention and keep the best. GT-known
Loc counts IoU ≥ 0.5 (GenPromp) or > 0.5 (WWbL); Top-1 / Top-5 Loc count IoU > 0.5 AND the label among
the classifier's top-1 / top-5 (GenPromp ``cls_loc_err``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import cv2
import numpy as np

from .base import Metric, MetricInputError, as_list, check_lengths, to_numpy
from .boxes import box_iou
from .grounding import cubehelix_gray
from .policy import ThresholdPolicy
from .prepare import _check_boxes, _size_wh

GRAYS = ("uint8", "cubehelix")
COMPARISONS = (">=", ">")


def prepare_map_linear(raw: Any, size: Sequence[int]) -> np.ndarray:
    """GenPromp ``resize_cam``: float32 map resized with cv2.resize (bilinear) to ``size`` (W, H), then
    (x − min) / (max − min); a constant or non-finite map becomes zeros (the official code divides by 0)."""
    arr = to_numpy(raw)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise MetricInputError(f"prepare_map_linear: expected a 2-D map (H×W), got shape {arr.shape}")
    w, h = _size_wh(size, "prepare_map_linear size")
    cam = arr.astype(np.float32)
    if not np.isfinite(cam).all():
        return np.zeros((h, w), np.float32)
    cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w)
    lo, hi = cam.min(), cam.max()
    if lo == hi:
        return np.zeros((h, w), np.float32)
    return (cam - lo) / (hi - lo)


def scale_boxes_clamped(boxes: Any, image_size: Sequence[int], side: int) -> np.ndarray:
    """GenPromp's test pipeline: x0 = int(max(x0 / W · S, 0)), x1 = int(min(x1 / W · S, S − 1)) (divide
    first, then multiply; same for y), for GT boxes in original pixels and an S×S map."""
    b = _check_boxes(boxes, "scale_boxes_clamped").astype(np.float64)
    w, h = (float(v) for v in _size_wh(image_size, "image_size"))
    s = float(side)
    out = np.empty_like(b)
    out[:, 0] = np.maximum(b[:, 0] / w * s, 0)
    out[:, 1] = np.maximum(b[:, 1] / h * s, 0)
    out[:, 2] = np.minimum(b[:, 2] / w * s, s - 1)
    out[:, 3] = np.minimum(b[:, 3] / h * s, s - 1)
    return out.astype(np.int64)


def contour_box(scoremap: np.ndarray, tau: float, gray: str = "uint8") -> tuple[int, int, int, int]:
    """The box of the largest contour of ``scoremap`` (H×W in [0, 1]) above int(τ · max) of its gray image."""
    if gray == "uint8":
        g = (np.asarray(scoremap) * 255.).astype(np.uint8)
    elif gray == "cubehelix":
        g = cubehelix_gray(np.asarray(scoremap))
    else:
        raise MetricInputError(f"gray must be one of {GRAYS}, got {gray!r}")
    _, kept = cv2.threshold(g, int(tau * np.max(g)), 255, cv2.THRESH_TOZERO)
    contours = cv2.findContours(kept, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return 0, 0, 1, 1
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    return x, y, x + w, y + h


def _passes(iou: float, op: str) -> bool:
    return iou >= 0.5 if op == ">=" else iou > 0.5


class FixedBoxAccuracy(Metric):
    """GT-known / Top-1 / Top-5 Loc of one box per map at a fixed τ (see the module docstring).

    ``update(maps, gt_boxes, pred_top5=None, labels=None)``: per image an H×W map in [0, 1] and its GT
    boxes as integers at the map's resolution; optional top-5 predictions and the label for Top-1/5 Loc.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"gt_known_loc": True, "top1_loc": True, "top5_loc": True}
    primary: ClassVar[str] = "gt_known_loc"

    def __init__(self, tau: float, gray: str = "uint8", gt_known_op: str = ">=", loc_op: str = ">") -> None:
        super().__init__()
        if not 0 <= float(tau) <= 1:
            raise MetricInputError(f"tau must be in [0, 1], got {tau}")
        if gray not in GRAYS or gt_known_op not in COMPARISONS or loc_op not in COMPARISONS:
            raise MetricInputError(f"gray must be one of {GRAYS}, comparisons one of {COMPARISONS}")
        self.tau, self.gray, self.gt_known_op, self.loc_op = float(tau), gray, gt_known_op, loc_op
        for key in ("gt_known", "top1", "top5", "count_pred"):
            self._add_state(key, np.zeros((), np.int64))

    def options(self) -> dict[str, Any]:
        return {"metric": "FixedBoxAccuracy", "tau": self.tau, "gray": self.gray,
                "gt_known": f"IoU {self.gt_known_op} 0.5", "top_k_loc": f"IoU {self.loc_op} 0.5 and label in top-k",
                "box_rule": "largest contour, box not clipped, no contour -> [0,0,1,1]", "iou": "+1 pixel convention"}

    def update(self, maps: Any, gt_boxes: Any, pred_top5: Any = None, labels: Any = None) -> None:
        maps_l, boxes_l = as_list(maps, "maps"), as_list(gt_boxes, "gt_boxes")
        if (pred_top5 is None) != (labels is None):
            raise MetricInputError("FixedBoxAccuracy.update: pass both pred_top5 and labels or neither")
        preds = as_list(pred_top5, "pred_top5") if pred_top5 is not None else None
        labs = as_list(labels, "labels") if labels is not None else None
        check_lengths("FixedBoxAccuracy.update", maps=maps_l, gt_boxes=boxes_l, pred_top5=preds, labels=labs)
        if self.count and (preds is not None) != (int(self._state["count_pred"]) == self.count):
            raise MetricInputError("FixedBoxAccuracy.update: give predictions for every batch or for none")
        counts = dict.fromkeys(("gt_known", "top1", "top5"), 0)
        for i, (m, b) in enumerate(zip(maps_l, boxes_l)):
            where = self._where(i)
            m = to_numpy(m)
            if m.ndim != 2 or m.dtype.kind != "f" or not np.isfinite(m).all():
                raise MetricInputError(f"{where}: score map must be a finite 2-D float map, got {m.shape} {m.dtype}")
            gt = _check_boxes(b, where).astype(np.int64)
            if len(gt) == 0:
                raise MetricInputError(f"{where}: no GT boxes (empty GT); every evaluated image needs ≥ 1 box")
            iou = float(box_iou([contour_box(m, self.tau, self.gray)], gt).max())
            counts["gt_known"] += _passes(iou, self.gt_known_op)
            if preds is not None:
                p = [int(c) for c in to_numpy(preds[i]).reshape(-1)[:5]]
                label = int(to_numpy(labs[i]).reshape(-1)[0])  # type: ignore[index]
                hit = _passes(iou, self.loc_op)
                counts["top1"] += hit and p[:1] == [label]
                counts["top5"] += hit and label in p
        for key, n in counts.items():
            self._state[key] += int(n)
        self._state["count"] += len(maps_l)
        if preds is not None:
            self._state["count_pred"] += len(maps_l)

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        n = float(self.count)
        out: dict[str, Any] = {"metric": "FixedBoxAccuracy",
                               "gt_known_loc": float(self._state["gt_known"]) * 100 / n}
        if int(self._state["count_pred"]) == self.count:
            out["top1_loc"] = float(self._state["top1"]) * 100 / n
            out["top5_loc"] = float(self._state["top5"]) * 100 / n
        out.update({"threshold_policy": "fixed", "tau": self.tau, "count": self.count})
        return out
