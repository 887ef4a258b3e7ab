"""MaxBoxAcc (v1), MaxBoxAccV2 and Top-1 / Top-5 / GT-known Loc (clovaai/wsolevaluation BoxEvaluator).

The rule, per image and per threshold τ in arange(0, 1, cam_curve_interval):

    u = uint8(map · 255)                      (truncation; the map is taken in float64)
    binary = u > int(τ · max(u))             (strictly greater)
    contours = cv2.findContours(binary, RETR_TREE, CHAIN_APPROX_SIMPLE)
    boxes = boundingRect of the largest contour by cv2.contourArea (v1, "largest contour"; the first
            one on ties) or of every contour (V2, "all contours"), as (x, y, min(x+w, W-1), min(y+h, H-1));
            no contour → [0, 0, 0, 0]
    correct at δ  ⇔  max IoU (+1 pixel convention) over (box, GT box) pairs ≥ δ/100

and the accuracy at δ is max over τ of 100·correct/count (oracle) or the value at a given τ.

The fast path gives the same numbers as that loop (the unit tests and bench/metrics_bench.py check it on
random and blob-like maps) while doing less work:

- many τ share one integer threshold int(τ·max u) (always with cam_curve_interval=0.001), and
  thresholds with no pixel value between them give the same binary mask: boxes are computed once per
  DISTINCT mask (identified by the number of pixels above the threshold, the masks being nested);
- a threshold is skipped when even the bounding box of ALL pixels above it overlaps every GT box too
  little for the smallest δ: every contour box lies inside it, so IoU ≤ |E ∩ G| / |G| < δ/100;
- the boxes of all remaining thresholds come from ONE component-tree sweep over the image (union-find,
  compiled with numba; ``component_tree``) instead of one contour tracing per threshold. Where it
  cannot settle v1's largest contour (components with holes of uncertain area), that threshold alone is
  traced with cv2.findContours as above (RETR_EXTERNAL on the crop to the pixels above the threshold:
  the largest contour is always an outer one, listed in the same order as at the top of RETR_TREE);
- V2 needs a hole's box only where it could lift the level's best IoU to the next δ (the holes lie
  inside their component's box, so IoU ≤ |C ∩ G| / |G| bounds them);
- ``workers`` > 1 spreads the images of a batch over threads (numba and OpenCV release the GIL).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Sequence

import cv2
import numpy as np

from . import component_tree
from .component_tree import UNDECIDED
from .base import (Metric, MetricInputError, as_list, check_lengths, check_score_map, curve_pick,
                   threshold_grid, to_numpy)
from .policy import ThresholdPolicy, resolve
from .prepare import PREPARATION, _check_boxes, scale_boxes

BOX_RULES = {False: "largest contour", True: "all contours"}
BINARISATION = "uint8(map·255) > int(τ·max)"
CONTOURS = "cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE); box = boundingRect clipped to W-1/H-1"
IOU_RULE = "+1 pixel convention"


# ------------------------------------------------------------------------------------------- IoU
def box_iou(boxes_a: Any, boxes_b: Any) -> np.ndarray:
    """IoU matrix (len(a), len(b)) with the +1 pixel convention of wsolevaluation: a box x0..x1 covers
    x1−x0+1 pixels; a pair whose denominator is ≤ 0 gets 0. ``box_iou([[1,2,5,6]], [[3,1,4,5]])`` is
    8/27; two all-zero boxes give 1.0."""
    a = np.asarray(boxes_a, dtype=np.int64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.int64).reshape(-1, 4)
    return _iou_plus1(a, b)


def _iou_plus1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.maximum(0, ix) * np.maximum(0, iy)
    area_a = ((a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1))[:, None]
    area_b = ((b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1))[None, :]
    den = area_a + area_b - inter
    bad = den <= 0
    iou = inter / np.where(bad, 1, den)
    iou[bad] = 0
    return iou


# ------------------------------------------------------------------------------------ the engine
def image_best_iou(scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray,
                   multi_contour: bool, deltas: Sequence[float] = ()) -> np.ndarray:
    """Per τ: the best IoU of the image's box(es) at τ against its GT boxes (float64, exactly the value
    the reference loop computes). Given the IoU thresholds ``deltas`` (fractions, e.g. 0.3, 0.5, 0.7)
    the result will be compared with, only those comparisons are kept exact: thresholds whose boxes
    provably all have IoU < min(deltas) get −1, and V2 skips holes that cannot reach the next δ."""
    gt = np.asarray(gt_boxes, np.int64).reshape(-1, 4)
    out, t_int, e_box, u = component_tree.image_best_iou(scoremap, gt, thresholds, multi_contour,
                                                         np.sort(np.asarray(deltas, np.float64)))
    open_ = np.flatnonzero(out == UNDECIDED)  # v1 levels a hole leaves open: trace them
    if len(open_):
        ts, first, inv = np.unique(t_int[open_], return_index=True, return_inverse=True)
        x0, y0, x1, y1 = e_box[open_[first]].T
        out[open_] = _largest_contour_best_iou(u, gt, ts, y0, y1, x0, x1)[inv.reshape(-1)]
    return out


def _largest_contour_best_iou(u: np.ndarray, gt: np.ndarray, ts: np.ndarray, y0: np.ndarray,
                              y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """v1 by tracing: per threshold, the IoU of the box of the first largest contour (cv2.contourArea,
    exact for integer points) of the crop [y0..y1, x0..x1] of ``u > t``. RETR_EXTERNAL: a hole or an
    island never has a larger area than the outer contour around it (equal area means the same polygon,
    hence the same box, listed after it), and the outer contours come in the same order as at the top
    level of RETR_TREE."""
    height, width = u.shape
    boxes = np.empty((len(ts), 4), np.int64)
    for k in range(len(ts)):
        a, b, c, d = int(y0[k]), int(y1[k]), int(x0[k]), int(x1[k])
        _, binary = cv2.threshold(u[a:b + 1, c:d + 1], int(ts[k]), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
        x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
        # box = (x, y, x + w, y + h) clipped to W−1 / H−1, as in the reference; the crop's offset added
        boxes[k] = (x + c, y + a, min(x + c + w, width - 1), min(y + a + h, height - 1))
    return _iou_plus1(boxes, gt).max(axis=1)


# ------------------------------------------------------------------------------------ the metric
def _dname(delta: float) -> str:
    return f"iou{int(delta)}" if float(delta).is_integer() else f"iou{delta:g}"


class MaxBoxAcc(Metric):
    """MaxBoxAcc (``multi_contour=False``: v1 rule, largest contour) / MaxBoxAccV2 (``multi_contour=True``:
    all contours), plus Top-1 / Top-5 Loc when predictions are given.

    ``update(maps, gt_boxes, pred_top5=None, labels=None, image_sizes=None)``, per image of the batch:

    - ``maps[i]``: H×W float score map in [0, 1] at the evaluation resolution (``prepare_map``);
    - ``gt_boxes[i]``: (N ≥ 1, 4) x0,y0,x1,y1 integer boxes at that resolution, or, with
      ``image_sizes[i]`` = original (W, H), boxes in original pixels that are rescaled with the
      protocol's int() rule (``scale_boxes``);
    - ``pred_top5[i]``: up to 5 predicted class indices in rank order; ``labels[i]``: the GT class.

    State: per (δ, τ) counts of correct images (and of correct-and-top-1/top-5-right images).
    ``workers`` threads evaluate the images of a batch (default: min(4, CPU count); 0 or 1 = serial);
    the numbers do not depend on it. ``prune=False`` disables the exact skipping of hopeless τ (and of
    V2 holes that cannot change a count).
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "maxboxacc": True, "maxboxacc_v2": True, "gt_known_loc": True, "top1_loc": True, "top5_loc": True,
        "maxboxacc_iou30": True, "maxboxacc_iou50": True, "maxboxacc_iou70": True,
    }

    def __init__(self, iou_thresholds: Sequence[float] = (30, 50, 70), cam_curve_interval: float = 0.01,
                 multi_contour: bool = False, *, workers: int | None = None, prune: bool = True) -> None:
        super().__init__()
        deltas = [float(d) for d in iou_thresholds]
        if not deltas or any(not (0 <= d <= 100) for d in deltas) or len(set(deltas)) != len(deltas):
            raise MetricInputError(f"iou_thresholds must be distinct values in [0, 100], got {iou_thresholds}")
        self.iou_thresholds = tuple(int(d) if d.is_integer() else d for d in deltas)
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = threshold_grid(self.cam_curve_interval)
        self.multi_contour = bool(multi_contour)
        self.workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
        self.prune = bool(prune)
        self._pool: ThreadPoolExecutor | None = None
        shape = (len(self.iou_thresholds), len(self.thresholds))
        self._add_state("num_correct", np.zeros(shape, np.int64))
        self._add_state("top1_correct", np.zeros(shape, np.int64))
        self._add_state("top5_correct", np.zeros(shape, np.int64))
        self._add_state("count_pred", np.zeros((), np.int64))
        self.higher_is_better = dict(type(self).higher_is_better)
        for d in self.iou_thresholds:
            self.higher_is_better[f"maxboxacc_{_dname(d)}"] = True

    @property
    def primary(self) -> str:  # type: ignore[override]
        return "maxboxacc_v2" if self.multi_contour else "maxboxacc"

    def options(self) -> dict[str, Any]:
        return {
            "metric": "MaxBoxAccV2" if self.multi_contour else "MaxBoxAcc",
            "iou_thresholds": list(self.iou_thresholds),
            "cam_curve_interval": self.cam_curve_interval,
            "multi_contour": self.multi_contour,
            "box_rule": BOX_RULES[self.multi_contour],
            "binarisation": BINARISATION,
            "contours": CONTOURS,
            "iou": IOU_RULE,
            "preparation": PREPARATION,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def __deepcopy__(self, memo: dict) -> "MaxBoxAcc":
        import copy as _copy

        new = type(self).__new__(type(self))
        for k, v in self.__dict__.items():
            setattr(new, k, None if k == "_pool" else _copy.deepcopy(v, memo))
        return new

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # ------------------------------------------------------------------ update
    def _validate(self, maps: Any, gt_boxes: Any, pred_top5: Any, labels: Any, image_sizes: Any):
        maps_l = as_list(maps, "maps")
        boxes_l = as_list(gt_boxes, "gt_boxes")
        if (pred_top5 is None) != (labels is None):
            raise MetricInputError("MaxBoxAcc.update: pass both pred_top5 and labels (Top-1/Top-5 Loc) or neither")
        preds_l = as_list(pred_top5, "pred_top5") if pred_top5 is not None else None
        labels_l = as_list(labels, "labels") if labels is not None else None
        sizes_l = as_list(image_sizes, "image_sizes") if image_sizes is not None else None
        check_lengths("MaxBoxAcc.update", maps=maps_l, gt_boxes=boxes_l, pred_top5=preds_l, labels=labels_l,
                      image_sizes=sizes_l)
        items = []
        for i, (m, b) in enumerate(zip(maps_l, boxes_l)):
            where = self._where(i)
            m = check_score_map(m, where)
            h, w = m.shape
            b = _check_boxes(b, where)
            if len(b) == 0:
                raise MetricInputError(f"{where}: no GT boxes (empty GT); every evaluated image needs ≥ 1 box")
            if sizes_l is not None:
                b = scale_boxes(b, sizes_l[i], (w, h))
            else:
                if b.dtype.kind == "f" and not np.array_equal(b, np.floor(b)):
                    raise MetricInputError(f"{where}: GT boxes at the evaluation resolution must be integers "
                                           f"(the protocol truncates with int()); got {b.tolist()}. Pass "
                                           f"image_sizes= to rescale original-pixel boxes")
                b = b.astype(np.int64)
            if (b[:, 2] > w).any() or (b[:, 3] > h).any():
                raise MetricInputError(f"{where}: GT box outside the {w}×{h} map: {b.tolist()} (x1 ≤ W and "
                                       f"y1 ≤ H required)")
            top1 = top5 = False
            if preds_l is not None:
                p = to_numpy(preds_l[i]).reshape(-1)
                if p.size == 0 or p.size > 5 or p.dtype.kind not in "iu":
                    raise MetricInputError(f"{where}: pred_top5 must hold 1 to 5 integer class indices in "
                                           f"rank order, got {p.tolist()}")
                lab = to_numpy(labels_l[i]).reshape(-1)  # type: ignore[index]
                if lab.size != 1 or lab.dtype.kind not in "iu":
                    raise MetricInputError(f"{where}: labels must hold one integer class per image, got "
                                           f"{lab.tolist()}")
                top1 = bool(p[0] == lab[0])
                top5 = bool((p[:5] == lab[0]).any())
            items.append((m, b, top1, top5))
        return items, preds_l is not None

    def _best_ious(self, items: list) -> list[np.ndarray]:
        deltas = [d / 100 for d in self.iou_thresholds] if self.prune else []

        def one(item):
            return image_best_iou(item[0], item[1], self.thresholds, self.multi_contour, deltas)

        if self.workers > 1 and len(items) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="maxboxacc")
            # one task per worker (every workers-th image), not per image: less pool traffic
            parts = list(self._pool.map(lambda k: [one(it) for it in items[k::self.workers]],
                                        range(self.workers)))
            return [parts[i % self.workers][i // self.workers] for i in range(len(items))]
        return [one(it) for it in items]

    def update(self, maps: Any, gt_boxes: Any, pred_top5: Any = None, labels: Any = None,
               image_sizes: Any = None) -> None:
        items, with_pred = self._validate(maps, gt_boxes, pred_top5, labels, image_sizes)
        if with_pred and self.count != int(self._state["count_pred"]):
            raise MetricInputError("MaxBoxAcc.update: predictions given now but not for earlier images; "
                                   "Top-1/Top-5 Loc need them for every image")
        if not with_pred and int(self._state["count_pred"]) > 0:
            raise MetricInputError("MaxBoxAcc.update: earlier batches had pred_top5/labels, this one has "
                                   "none; Top-1/Top-5 Loc need them for every image")
        correct = self._state["num_correct"]
        top1c, top5c = self._state["top1_correct"], self._state["top5_correct"]
        deltas = [d / 100 for d in self.iou_thresholds]
        for (m, b, top1, top5), best in zip(items, self._best_ious(items)):
            for j, d in enumerate(deltas):
                ok = best >= d
                correct[j] += ok
                if top1:
                    top1c[j] += ok
                if top5:
                    top5c[j] += ok
        self._state["count"] += len(items)
        if with_pred:
            self._state["count_pred"] += len(items)

    # ------------------------------------------------------------------ compute
    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        pol = resolve(policy)
        cnt = float(self.count)
        out: dict[str, Any] = {"metric": self.options()["metric"]}
        per_delta = []
        for j, d in enumerate(self.iou_thresholds):
            name = _dname(d)
            curve = self._state["num_correct"][j] * 100. / cnt
            value, tau = curve_pick(curve, self.thresholds, pol, name, "MaxBoxAcc")
            out[f"maxboxacc_{name}"] = value
            out[f"best_tau_{name}"] = tau
            per_delta.append(value)
        j50 = self.iou_thresholds.index(50) if 50 in self.iou_thresholds else None
        out["maxboxacc"] = per_delta[j50] if j50 is not None else None
        out["maxboxacc_v2"] = float(np.mean(per_delta))
        out["gt_known_loc"] = out["maxboxacc"]
        if int(self._state["count_pred"]) == self.count and j50 is not None:
            for key, state in (("top1_loc", "top1_correct"), ("top5_loc", "top5_correct")):
                curve = self._state[state][j50] * 100. / cnt
                value, tau = curve_pick(curve, self.thresholds, pol, key, "MaxBoxAcc")
                out[key] = value
                out[f"best_tau_{key}"] = tau
        out.update(pol.as_record())
        if pol.kind == "oracle":
            out["tau"] = None  # τ chosen per quantity: see best_tau_*
        out["count"] = self.count
        out["box_rule"] = BOX_RULES[self.multi_contour]
        out["cam_curve_interval"] = self.cam_curve_interval
        out["iou_thresholds"] = list(self.iou_thresholds)
        return out

    def curves(self) -> dict[str, np.ndarray]:
        """Accuracy (%) per τ for every δ (and Top-1/Top-5 at δ=50 when available), for plots."""
        self._require_data()
        cnt = float(self.count)
        out = {"tau": self.thresholds.copy()}
        for j, d in enumerate(self.iou_thresholds):
            out[_dname(d)] = self._state["num_correct"][j] * 100. / cnt
        return out


def max_box_acc(maps: Any, gt_boxes: Any, image_sizes: Any = None, *,
                iou_thresholds: Sequence[float] = (30, 50, 70), cam_curve_interval: float = 0.01,
                multi_contour: bool = False, pred_top5: Any = None, labels: Any = None,
                policy: ThresholdPolicy | None = None, workers: int | None = None) -> dict[str, Any]:
    """One-shot MaxBoxAcc / MaxBoxAccV2 (see ``MaxBoxAcc``). ``image_sizes`` (original W, H per image)
    means ``gt_boxes`` are in original pixels and get rescaled to the maps' resolution."""
    metric = MaxBoxAcc(iou_thresholds, cam_curve_interval, multi_contour, workers=workers)
    metric.update(maps, gt_boxes, pred_top5=pred_top5, labels=labels, image_sizes=image_sizes)
    return metric.compute(policy)
