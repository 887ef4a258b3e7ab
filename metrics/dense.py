"""mIoU of dense per-class maps against semantic label maps (xulianuwa/MCTformer evaluation.py).

Per image the maps of the classes present in it (normalised with ``normalize_per_class``) compete with
a constant background score t: label = argmax over [t, map of class 0, map of class 1, …] in the maps'
dtype (MCTformer writes t into a float32 array), ties going to the lower channel, so background wins a
tie and among classes the lower class index wins. Pixels labelled 255 are ignored. Over the split, per
class c (0 = background): P (predicted), T (GT), TP (both); IoU = TP / (T + P − TP + 1e-10);
mIoU(t) = 100 · mean over ALL classes. The state keeps P and TP for every t of the sweep, so the whole
curve is available: oracle = max over the sweep; MCTformer's own rule (stop at the first t that does not
improve) is the ``early-stop`` policy, also always reported as ``miou_first_peak``; ``miou_sweep_best`` is
the best over the whole sweep whatever the policy.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from .base import Metric, MetricInputError, as_list, check_lengths, grid_index, to_numpy
from .policy import ThresholdPolicy, resolve
from .prepare import DENSE_PREPARATION, normalize_per_class  # noqa: F401  (re-exported helper)

IGNORE_LABEL = 255
DEFAULT_BG_THRESHOLDS = np.arange(100) / 100.0  # t = i/100.0 exactly as MCTformer's sweep


class DenseMIoU(Metric):
    """Dense-map mIoU with a background-threshold sweep.

    ``num_classes`` INCLUDES background (21 for VOC, 81 for COCO). ``update(maps_per_class,
    present_classes, gt_label_maps)``: per image, ``maps_per_class[i]`` is K_i×H×W (float, finite) for
    the K_i classes in ``present_classes[i]`` (0-based foreground indices: map of class k ↔ label k+1),
    at the resolution of ``gt_label_maps[i]`` (H×W ints, 0 = background, k+1 = class k, 255 = ignore).
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"miou": True, "miou_first_peak": True}
    primary: ClassVar[str] = "miou"

    def __init__(self, num_classes: int,
                 bg_thresholds: Sequence[float] | np.ndarray = DEFAULT_BG_THRESHOLDS) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise MetricInputError(f"num_classes counts background too and must be ≥ 2, got {num_classes}")
        self.num_classes = int(num_classes)
        ts = np.asarray(bg_thresholds, dtype=np.float64).reshape(-1)
        if ts.size == 0 or not np.isfinite(ts).all() or (np.diff(ts) <= 0).any():
            raise MetricInputError("bg_thresholds must be a non-empty, strictly increasing list of finite values")
        self.bg_thresholds = ts
        shape = (len(ts), self.num_classes)
        self._add_state("tp", np.zeros(shape, np.int64))
        self._add_state("pred", np.zeros(shape, np.int64))
        self._add_state("gt", np.zeros(self.num_classes, np.int64))

    def options(self) -> dict[str, Any]:
        ts = self.bg_thresholds
        return {
            "metric": "DenseMIoU",
            "num_classes": self.num_classes,
            "bg_thresholds": [float(ts[0]), float(ts[-1]), len(ts)],
            "rule": "argmax over [t, class maps], ties → lower index (background first); 255 ignored",
            "preparation": DENSE_PREPARATION,
        }

    def update(self, maps_per_class: Any, present_classes: Any, gt_label_maps: Any) -> None:
        maps_l = as_list(maps_per_class, "maps_per_class")
        cls_l = as_list(present_classes, "present_classes")
        gts_l = as_list(gt_label_maps, "gt_label_maps")
        check_lengths("DenseMIoU.update", maps_per_class=maps_l, present_classes=cls_l, gt_label_maps=gts_l)
        work = [self._check(i, m, c, g) for i, (m, c, g) in enumerate(zip(maps_l, cls_l, gts_l))]
        for maps, classes, gt in work:
            self._accumulate(maps, classes, gt)
        self._state["count"] += len(work)

    def _check(self, i: int, maps: Any, classes: Any, gt: Any):
        where = self._where(i)
        g = to_numpy(gt)
        if g.ndim != 2 or g.size == 0:
            raise MetricInputError(f"{where}: label map must be 2-D (H×W), got shape {g.shape}")
        if g.dtype.kind not in "iu":
            if g.dtype.kind == "f" and np.array_equal(g, np.floor(g)):
                g = g.astype(np.int64)
            else:
                raise MetricInputError(f"{where}: label map must hold integer class indices, got dtype {g.dtype}")
        g = g.astype(np.int64)
        bad = (g != IGNORE_LABEL) & ((g < 0) | (g >= self.num_classes))
        if bad.any():
            vals = np.unique(g[bad])[:10].tolist()
            raise MetricInputError(f"{where}: label map holds {vals}, outside 0..{self.num_classes - 1} and "
                                   f"not {IGNORE_LABEL} (ignore)")
        if not (g != IGNORE_LABEL).any():
            raise MetricInputError(f"{where}: the label map has no labelled pixel (all {IGNORE_LABEL}; empty GT)")
        c = to_numpy(classes).reshape(-1)
        if c.size and c.dtype.kind not in "iu":
            if c.dtype.kind == "f" and np.array_equal(c, np.floor(c)):
                c = c.astype(np.int64)
            else:
                raise MetricInputError(f"{where}: present_classes must be integer class indices, got {c.tolist()}")
        c = c.astype(np.int64)
        if len(np.unique(c)) != len(c):
            raise MetricInputError(f"{where}: present_classes repeats a class: {c.tolist()}")
        if ((c < 0) | (c >= self.num_classes - 1)).any():
            raise MetricInputError(f"{where}: present_classes must be 0-based foreground indices in "
                                   f"0..{self.num_classes - 2}, got {c.tolist()}")
        m = to_numpy(maps)
        if m.ndim == 2 and len(c) == 1:
            m = m[None]
        if m.ndim != 3 or m.shape[0] != len(c) or m.shape[1:] != g.shape:
            raise MetricInputError(f"{where}: maps_per_class must be K×H×W with K = {len(c)} present classes "
                                   f"and H×W = {g.shape}, got shape {m.shape}")
        if m.dtype.kind != "f":
            raise MetricInputError(f"{where}: class maps must be float, got dtype {m.dtype}")
        if not np.isfinite(m).all():
            raise MetricInputError(f"{where}: class maps contain NaN/inf")
        order = np.argsort(c, kind="stable")
        return m[order], c[order], g

    def _accumulate(self, maps: np.ndarray, classes: np.ndarray, gt: np.ndarray) -> None:
        n_t = len(self.bg_thresholds)
        valid = gt != IGNORE_LABEL
        g = gt[valid]
        self._state["gt"] += np.bincount(g, minlength=self.num_classes)
        if g.size == 0:
            return
        if len(classes) == 0:  # no class present: background everywhere, for every t
            self._state["pred"][:, 0] += g.size
            self._state["tp"][:, 0] += int((g == 0).sum())
            return
        flat = maps.reshape(len(classes), -1)[:, valid.reshape(-1)]
        k = np.argmax(flat, axis=0)  # first max → lower class index wins a tie
        v = flat[k, np.arange(flat.shape[1])]
        # t in the maps' dtype (MCTformer writes t into a float32 array); fg at t ⇔ v > t (tie → bg)
        ts = self.bg_thresholds.astype(flat.dtype)
        n_fg = np.searchsorted(ts, v, side="left")  # number of t with t < v
        label = classes[k] + 1
        n_c = len(classes)
        hist = np.bincount(k * (n_t + 1) + n_fg, minlength=n_c * (n_t + 1)).reshape(n_c, n_t + 1)
        hit = g == label
        hist_tp = np.bincount(k[hit] * (n_t + 1) + n_fg[hit], minlength=n_c * (n_t + 1)).reshape(n_c, n_t + 1)
        # pixels predicted as their class at threshold j: those with n_fg > j
        pred_fg = hist[:, ::-1].cumsum(axis=1)[:, ::-1][:, 1:]  # (n_c, n_t): Σ_{m > j}
        tp_fg = hist_tp[:, ::-1].cumsum(axis=1)[:, ::-1][:, 1:]
        self._state["pred"][:, classes + 1] += pred_fg.T
        self._state["tp"][:, classes + 1] += tp_fg.T
        self._state["pred"][:, 0] += g.size - pred_fg.sum(axis=0)
        bg = g == 0
        bg_hist = np.bincount(n_fg[bg], minlength=n_t + 1)
        self._state["tp"][:, 0] += bg_hist.cumsum()[:n_t]  # background at j ⇔ n_fg ≤ j

    def _miou_curve(self) -> tuple[np.ndarray, np.ndarray]:
        tp = self._state["tp"]
        p = self._state["pred"]
        t = self._state["gt"][None, :]
        iou = tp / (t + p - tp + 1e-10)
        miou = np.array([np.mean(row) * 100 for row in iou])
        return iou, miou

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:
        self._require_data()
        pol = resolve(policy)
        iou, miou = self._miou_curve()
        best, first = 0.0, 0
        for jj, value in enumerate(miou):  # MCTformer: stop at the first t that does not improve
            if value > best:
                best, first = float(value), jj
            else:
                break
        if pol.kind == "oracle":
            j = int(np.argmax(miou))
        elif pol.kind == "early-stop":
            j = first
        else:
            j = grid_index(self.bg_thresholds, pol.tau_for("miou"), "DenseMIoU (miou)")
        top = int(np.argmax(miou))
        out: dict[str, Any] = {
            "metric": "DenseMIoU",
            "miou": float(miou[j]),
            "best_tau_miou": float(self.bg_thresholds[j]),
            "bg_threshold": float(self.bg_thresholds[j]),
            "per_class_iou": [float(x) * 100 for x in iou[j]],
            "miou_first_peak": best,
            "first_peak_bg_threshold": float(self.bg_thresholds[first]),
            "miou_sweep_best": float(miou[top]),
            "sweep_best_bg_threshold": float(self.bg_thresholds[top]),
        }
        out.update(pol.as_record())
        if pol.kind in ("oracle", "early-stop"):
            out["tau"] = None
        out["count"] = self.count
        out["num_classes"] = self.num_classes
        return out

    def curves(self) -> dict[str, np.ndarray]:
        self._require_data()
        return {"bg_threshold": self.bg_thresholds.copy(), "miou": self._miou_curve()[1]}


def dense_miou(maps_per_class: Any, gt_label_maps: Any, num_classes: int, *, present_classes: Any = None,
               bg_thresholds: Sequence[float] | np.ndarray = DEFAULT_BG_THRESHOLDS,
               policy: ThresholdPolicy | None = None) -> dict[str, Any]:
    """One-shot dense mIoU (see ``DenseMIoU``). Without ``present_classes`` every ``maps_per_class[i]``
    holds all ``num_classes − 1`` foreground maps (absent classes as zero maps, like MCTformer's
    tensor)."""
    maps_l = as_list(maps_per_class, "maps_per_class")
    if present_classes is None:
        present_classes = [np.arange(num_classes - 1)] * len(maps_l)
    metric = DenseMIoU(num_classes, bg_thresholds)
    metric.update(maps_l, present_classes, gt_label_maps)
    return metric.compute(policy)
