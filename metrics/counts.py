"""Counters kept beside the localisation metrics, as metric states (integer sums: shards and processes merge
exactly): classification accuracy, map health and what a protocol skips, so nothing is skipped silently."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from .base import Metric


class Counts(Metric):
    """A metric whose state is a few integer counters, named by ``keys`` (``count`` is the base's)."""

    keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        for key in self.keys:
            self._add_state(key, np.zeros((), np.int64))

    def _add(self, key: str, n: int) -> None:
        self._state[key] = self._state[key] + int(n)


class ClassificationAccuracy(Counts):
    """Top-1/Top-5 classification accuracy from each image's top-5 predicted classes."""

    keys = ("top1", "top5")
    higher_is_better = {"top1_cls": True, "top5_cls": True}

    def update(self, top5: Sequence[Sequence[int]], labels: Sequence[int]) -> None:
        for pred, y in zip(top5, labels):
            self._add("top1", pred[0] == y)
            self._add("top5", y in pred[:5])
            self._add("count", 1)

    def compute(self, policy: Any = None) -> dict[str, float]:
        n = self.count
        if n == 0:
            return {}
        return {"top1_cls": 100.0 * int(self._state["top1"]) / n, "top5_cls": 100.0 * int(self._state["top5"]) / n}

    def options(self) -> dict[str, Any]:
        return {"top_k": [1, 5]}


class MapHealth(Counts):
    """Raw maps that were non-finite or constant (``prepare_map`` scores those as zeros): reported, never silent."""

    keys = ("nonfinite", "constant")

    def update(self, raw_maps: Sequence[np.ndarray]) -> None:
        for m in raw_maps:
            finite = bool(np.isfinite(m).all())
            self._add("nonfinite", not finite)
            self._add("constant", finite and float(m.max()) == float(m.min()))
            self._add("count", 1)

    def compute(self, policy: Any = None) -> dict[str, int]:
        return {"nonfinite_maps": int(self._state["nonfinite"]), "constant_maps": int(self._state["constant"])}

    def options(self) -> dict[str, Any]:
        return {"rule": "non-finite or constant raw maps are scored as all-zero maps (wsolevaluation) and counted"}


class EmptyForeground(Counts):
    """Images whose foreground mask is empty: scored as all-negative pixels (as wsolevaluation does) and counted."""

    keys = ("empty",)

    def update(self, masks: Sequence[np.ndarray]) -> None:
        self._add("empty", sum(not m.any() for m in masks))

    def compute(self, policy: Any = None) -> dict[str, int]:
        return {"empty_foreground_images": int(self._state["empty"])}

    def options(self) -> dict[str, Any]:
        return {"rule": "an image whose foreground mask is empty counts as all-negative pixels (reference)"}


class PointingSkips(Counts):
    """(image, class) pairs the TorchRay pointing game skips: all the class's boxes "difficult", or (difficult
    subset) an easy pair by the EBP flags."""

    keys = ("all_difficult", "easy")

    def update(self, all_difficult: int = 0, easy: int = 0) -> None:
        self._add("all_difficult", all_difficult)
        self._add("easy", easy)

    def compute(self, policy: Any = None) -> dict[str, int]:
        return {"pairs_skipped_all_difficult": int(self._state["all_difficult"]),
                "pairs_skipped_easy_in_difficult_subset": int(self._state["easy"])}

    def options(self) -> dict[str, Any]:
        return {"rule": "TorchRay: a class whose boxes are all difficult is skipped; the difficult subset keeps "
                        "the pairs the EBP flags mark (images absent from the flag file are kept)"}
