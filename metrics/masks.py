"""PxAP and pIoU (clovaai/wsolevaluation MaskEvaluator; pIoU as in DA-WSOL libs/evaluation.py).

Foreground and background pixel scores are histogrammed separately with right edges
``[τ_0, …, τ_{n-1}, 1, 2, 3]`` (τ = arange(0, 1, cam_curve_interval); bins [0, bw), …, [1−bw, 1), [1, 2),
[2, 3]) and summed over the split. Then, in the reference's order (index 0 = the highest bin):

    tp = cumsum(fg_hist[::-1]); fp = cumsum(bg_hist[::-1]); fn = P − tp
    precision = tp / (tp + fp); recall = tp / (tp + fn)
    PxAP = 100 · Σ_{k≥1, tp+fp≠0} precision[k] · (recall[k] − recall[k−1])
    pIoU = max_k 100 · tp / (fp + fn + tp)

Ignored pixels (ignore mask AND NOT foreground) count in neither histogram.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .base import (Metric, MetricInputError, as_list, check_lengths, check_score_map, grid_index,
                   threshold_grid, to_numpy)
from .policy import ThresholdPolicy, resolve
from .prepare import PREPARATION


def _binary_mask(m: Any, shape: tuple[int, ...], where: str, what: str) -> np.ndarray:
    arr = to_numpy(m)
    if arr.shape != shape:
        raise MetricInputError(f"{where}: {what} has shape {arr.shape}, the score map has {shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise MetricInputError(f"{where}: {what} must be boolean, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        raise MetricInputError(f"{where}: {what} must be boolean or 0/1; got values outside {{0, 1}} "
                               f"(threshold it first, e.g. mask > 0.5)")
    return arr.astype(bool)


def histogram_bins(values: np.ndarray, edges: np.ndarray, interval: float) -> np.ndarray:
    """Bin index of each value, identical to ``np.histogram(values, bins=edges)`` for values in
    [edges[0], 1]: x = value / interval is within ~1e-13 of the exact quotient and the edges are
    fl(i·interval), so floor(x) is the bin unless x lies within 1e-6 of an integer; only those few
    values are compared with the actual float64 edges on each side (a ±1 correction)."""
    v = values.reshape(-1)
    x = v * (1.0 / interval)
    k = x.astype(np.int32)
    frac = x - k
    near = np.flatnonzero((frac < 1e-6) | (frac > 1 - 1e-6))
    if near.size:
        kn, vn = k[near], v[near]
        kn -= vn < edges[kn]
        kn += vn >= edges[kn + 1]
        k[near] = kn
    return k


class PxAP(Metric):
    """Pixel average precision (PxAP) and the best pixel IoU (pIoU) over thresholds.

    ``update(maps, gt_masks, ignore_masks=None)``: per image an H×W float score map in [0, 1], a boolean
    foreground mask of the same shape and optionally a boolean ignore mask (pixels ignored unless
    foreground). An image without any foreground pixel is an error unless ``allow_empty_gt=True``
    (the reference would silently count its pixels as negatives only). State: two integer histograms."""

    higher_is_better: ClassVar[dict[str, bool]] = {"pxap": True, "piou": True}
    primary: ClassVar[str] = "pxap"

    def __init__(self, cam_curve_interval: float = 0.01, *, allow_empty_gt: bool = False) -> None:
        super().__init__()
        self.allow_empty_gt = bool(allow_empty_gt)
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = threshold_grid(self.cam_curve_interval)
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        n_bins = len(self.thresholds) + 2
        self._add_state("fg_hist", np.zeros(n_bins, np.int64))
        self._add_state("bg_hist", np.zeros(n_bins, np.int64))

    def options(self) -> dict[str, Any]:
        return {
            "metric": "PxAP",
            "cam_curve_interval": self.cam_curve_interval,
            "bins": "right edges = arange(0, 1, interval) + [1, 2, 3]",
            "ignore": "ignore mask AND NOT foreground excluded",
            "preparation": PREPARATION,
        }

    def update(self, maps: Any, gt_masks: Any, ignore_masks: Any = None) -> None:
        self.add_histograms(self.image_histograms(maps, gt_masks, ignore_masks))

    def image_histograms(self, maps: Any, gt_masks: Any, ignore_masks: Any = None) -> list[np.ndarray]:
        """Each image's own (2, bins) int64 counts, foreground then background, checked as ``update`` checks
        its input; the state is unchanged. ``update`` adds exactly these, so a caller that also keeps them per
        image (the harness's per-image records) bins each map once: ``add_histograms(image_histograms(...))``."""
        maps_l = as_list(maps, "maps")
        gts_l = as_list(gt_masks, "gt_masks")
        ign_l = as_list(ignore_masks, "ignore_masks") if ignore_masks is not None else None
        check_lengths("PxAP.image_histograms", maps=maps_l, gt_masks=gts_l, ignore_masks=ign_l)
        n_bins = len(self.edges) - 1
        batch = []
        for i, (m, g) in enumerate(zip(maps_l, gts_l)):
            where = self._where(i)
            m = check_score_map(m, where)
            fg = _binary_mask(g, m.shape, where, "gt mask")
            if not self.allow_empty_gt and not fg.any():
                raise MetricInputError(f"{where}: the GT mask has no foreground pixel (empty GT); pass "
                                       f"PxAP(allow_empty_gt=True) to count such images as negatives only")
            ign = None
            if ign_l is not None and ign_l[i] is not None:
                ign = _binary_mask(ign_l[i], m.shape, where, "ignore mask") & ~fg
            if ign is not None:
                keep = ~ign
                scores, labels = m[keep], fg[keep]
            else:
                scores, labels = m.reshape(-1), fg.reshape(-1)
            if labels.size == 0:
                raise MetricInputError(f"{where}: every pixel is ignored")
            batch.append((scores, labels))
        hists = []
        for scores, labels in batch:
            k = histogram_bins(scores, self.edges, self.cam_curve_interval)
            hists.append(np.bincount(k + n_bins * (~labels), minlength=2 * n_bins).reshape(2, n_bins))
        return hists

    def add_histograms(self, hists: Any) -> None:
        """Add images given as their ``image_histograms`` (one (2, bins) integer array each)."""
        hists_l = as_list(hists, "hists")
        shape = (2, len(self.edges) - 1)
        for i, h in enumerate(hists_l):
            h = np.asarray(h)
            if h.shape != shape or h.dtype.kind not in "iu":
                raise MetricInputError(f"PxAP.add_histograms: hists[{i}] must be an integer array of shape "
                                       f"{shape} (from image_histograms at this cam_curve_interval), got "
                                       f"{h.dtype} {h.shape}")
        for h in hists_l:
            self._state["fg_hist"] += h[0]
            self._state["bg_hist"] += h[1]
        self._state["count"] += len(hists_l)

    def _curves(self) -> dict[str, np.ndarray]:
        fg = self._state["fg_hist"].astype(np.float64)
        bg = self._state["bg_hist"].astype(np.float64)
        num_gt_true = fg.sum()
        tp = fg[::-1].cumsum()
        fn = num_gt_true - tp
        fp = bg[::-1].cumsum()
        if ((tp + fn) <= 0).all():
            raise MetricInputError("PxAP: no foreground (positive) pixel in the evaluated images")
        if ((tp + fp) <= 0).all():
            raise MetricInputError("PxAP: no pixel was evaluated")
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
            recall = tp / (tp + fn)
            iou = tp / (fp + fn + tp)
            iou *= 100
        # threshold of index k: scores ≥ left edge of bin (n_bins − 1 − k)
        taus = self.edges[:-1][::-1].copy()
        return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "iou": iou,
                "tau": taus}

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        pol = resolve(policy)
        c = self._curves()
        non_zero = (c["tp"] + c["fp"]) != 0
        auc = (c["precision"][1:] * np.diff(c["recall"]))[non_zero[1:]].sum()
        auc *= 100
        iou = c["iou"]
        if pol.kind == "oracle":
            valid = np.flatnonzero(~np.isnan(iou))
            k = int(valid[np.argmax(iou[valid])])
        else:
            k = grid_index(c["tau"], pol.tau_for("piou"), "PxAP (piou)")
        out: dict[str, Any] = {
            "metric": "PxAP",
            "pxap": float(auc),
            "piou": float(iou[k]),
            "best_tau_piou": float(c["tau"][k]),
            "precision_at_tau": float(c["precision"][k]),
            "recall_at_tau": float(c["recall"][k]),
        }
        out.update(pol.as_record())
        if pol.kind == "oracle":
            out["tau"] = None
        out["count"] = self.count
        out["cam_curve_interval"] = self.cam_curve_interval
        return out

    def curves(self) -> dict[str, np.ndarray]:
        """Precision, recall and IoU per threshold (index 0 = the highest threshold), for plots."""
        self._require_data()
        return self._curves()


def pxap(maps: Any, gt_masks: Any, ignore_masks: Any = None, *, cam_curve_interval: float = 0.01,
         policy: ThresholdPolicy | None = None, allow_empty_gt: bool = False) -> dict[str, Any]:
    """One-shot PxAP / pIoU (see ``PxAP``)."""
    metric = PxAP(cam_curve_interval, allow_empty_gt=allow_empty_gt)
    metric.update(maps, gt_masks, ignore_masks)
    return metric.compute(policy)
