"""Localisation metrics that reproduce the reference implementations' numbers.

Each metric is a class with ``update(...)`` (per-image lists for one batch), ``compute(policy=None)``
(→ dict; None = the oracle threshold policy), ``reset()``, ``merge(other)``, ``sync()`` (sum over
torch.distributed processes), ``state_dict()`` / ``load_state_dict()``, ``options()`` (what to record
with results), ``count`` and ``higher_is_better``. States are integer sums, so metrics over disjoint
shards merge into exactly the metric over all images. Plain functions do one-shot evaluation.

- ``MaxBoxAcc`` / ``max_box_acc``: MaxBoxAcc (v1, largest contour), MaxBoxAccV2 (all contours, mean
  over δ ∈ {30, 50, 70}), GT-known / Top-1 / Top-5 Loc — clovaai/wsolevaluation.
- ``PxAP`` / ``pxap``: PxAP and pIoU — wsolevaluation MaskEvaluator, DA-WSOL.
- ``DenseMIoU`` / ``dense_miou``: mIoU of per-class maps with a background-threshold sweep — MCTformer.
- ``PointingGame`` / ``pointing_game``: TorchRay pointing game (15 px tolerance, mean over classes).
- ``PhrasePointing`` / ``phrase_pointing``: phrase-grounding pointing accuracy — MultiGrounding / WWbL.
- ``GroundingBoxAccuracy`` / ``grounding_box_accuracy``: WWbL box accuracy.
- ``FixedBoxAccuracy`` / ``contour_box``: one box per map at a fixed τ (GenPromp, WWbL CUB protocols).
- ``prepare_map`` (+ ``PREPARATION``), ``scale_boxes`` / ``resize_box``, ``normalize_per_class``.
- ``ClassificationAccuracy``, ``MapHealth``, ``EmptyForeground``, ``PointingSkips``: counters reported beside
  the metrics (``Counts``), so nothing is skipped silently.
- ``ThresholdPolicy``: oracle / fixed / val.
"""
from .base import Metric, MetricInputError
from .boxes import BOX_RULES, MaxBoxAcc, box_iou, max_box_acc
from .counts import ClassificationAccuracy, Counts, EmptyForeground, MapHealth, PointingSkips
from .dense import DenseMIoU, dense_miou
from .fixed_box import FixedBoxAccuracy, contour_box, prepare_map_linear, scale_boxes_clamped
from .grounding import GroundingBoxAccuracy, grounding_box_accuracy
from .masks import PxAP, pxap
from .pointing import (PhrasePointing, PointingGame, boxes_to_mask, phrase_pointing, pointing_game, resize_bilinear,
                       union_box)
from .policy import ThresholdPolicy
from .prepare import (DENSE_PREPARATION, PREPARATION, normalize_per_class, normalize_scoremap, prepare_map,
                      resize_box, scale_boxes)

__all__ = [
    "BOX_RULES", "ClassificationAccuracy", "Counts", "DENSE_PREPARATION", "DenseMIoU", "EmptyForeground", "FixedBoxAccuracy", "GroundingBoxAccuracy", "MapHealth", "MaxBoxAcc", "Metric",
    "MetricInputError", "PREPARATION", "PhrasePointing", "PointingGame", "PointingSkips", "PxAP", "ThresholdPolicy",
    "box_iou", "boxes_to_mask", "contour_box", "dense_miou", "grounding_box_accuracy", "max_box_acc",
    "normalize_per_class", "normalize_scoremap", "phrase_pointing", "pointing_game", "prepare_map",
    "prepare_map_linear", "pxap", "resize_bilinear", "resize_box", "scale_boxes", "scale_boxes_clamped", "union_box",
]
