"""Turning raw localisation maps and annotations into what the metrics evaluate.

- ``prepare_map``: the WSOL protocol's score-map preparation (clovaai/wsolevaluation inference.py):
  bicubic resize (cv2.INTER_CUBIC) to the evaluation size, then min-max normalisation; a constant map or
  one holding NaN becomes all zeros. The harness records ``PREPARATION`` with every result.
- ``scale_boxes`` / ``resize_box``: original-pixel boxes → evaluation-resolution boxes with the
  protocol's rule (x·W'/W in float, then truncation with int()).
- ``normalize_per_class``: the dense-map preparation of MCTformer (upsample bilinearly to the original
  size, then per-class min-max with +1e-8).
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from .base import MetricInputError, to_numpy

PREPARATION = "bicubic resize (cv2.INTER_CUBIC) + min-max; constant/NaN → 0"
DENSE_PREPARATION = "bilinear upsample to the original size (align_corners=False), then per-class min-max (+1e-8)"


def _size_wh(size: Any, what: str = "size") -> tuple[int, int]:
    try:
        w, h = (int(s) for s in size)
    except Exception as exc:  # noqa: BLE001
        raise MetricInputError(f"{what} must be (W, H), got {size!r}") from exc
    if w <= 0 or h <= 0:
        raise MetricInputError(f"{what} must be positive (W, H), got {size!r}")
    return w, h


def normalize_scoremap(cam: np.ndarray) -> np.ndarray:
    """Min-max normalise in place (float64 as in the reference): subtract the min, divide by the (new)
    max. A map holding NaN (or ±inf) or a constant map becomes all zeros."""
    if not np.isfinite(cam).all():
        return np.zeros_like(cam)
    lo, hi = cam.min(), cam.max()
    if lo == hi:
        return np.zeros_like(cam)
    cam -= lo
    cam /= cam.max()
    return cam


def prepare_map(raw: Any, size: Sequence[int], *, dtype: Any = np.float32) -> np.ndarray:
    """Raw map (H'×W', or 1×H'×W'; numpy or torch) → ``dtype`` H×W score map in [0, 1].

    ``size`` is (W, H). Steps, as in wsolevaluation: the map is cast to float64, resized with
    ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` (a copy when the size already matches), then
    min-max normalised; NaN/±inf or constant maps give zeros. The result is cast to ``dtype`` at the
    end (float32 by default; pass ``dtype=np.float64`` to keep the reference pipeline's precision)."""
    arr = to_numpy(raw)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise MetricInputError(f"prepare_map: expected a 2-D map (H×W), got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise MetricInputError(f"prepare_map: expected a real-valued map, got dtype {arr.dtype}")
    w, h = _size_wh(size, "prepare_map size")
    cam = arr.astype(np.float64)
    if np.isfinite(cam).all():
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        cam = np.zeros((h, w), np.float64)
    if cam.ndim != 2:  # cv2 drops a trailing singleton axis only; keep the guard explicit
        cam = cam.reshape(h, w)
    return normalize_scoremap(cam).astype(dtype, copy=False)


def _check_boxes(boxes: Any, where: str) -> np.ndarray:
    b = to_numpy(boxes)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise MetricInputError(f"{where}: boxes must be an (N, 4) array of x0,y0,x1,y1, got shape {b.shape}")
    if b.dtype.kind not in "iuf":
        raise MetricInputError(f"{where}: boxes must be numeric, got dtype {b.dtype}")
    if b.shape[0] and not np.isfinite(b.astype(np.float64)).all():
        raise MetricInputError(f"{where}: boxes contain NaN/inf: {b.tolist()}")
    if (b < 0).any():
        raise MetricInputError(f"{where}: box coordinates must be non-negative, got {b.tolist()}")
    if ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
        raise MetricInputError(f"{where}: boxes must be x0,y0,x1,y1 with x1 ≥ x0 and y1 ≥ y0, "
                               f"got {b.tolist()}")
    return b


def scale_boxes(boxes: Any, image_size: Sequence[int], resize_size: Sequence[int] = (224, 224)) -> np.ndarray:
    """(N, 4) x0,y0,x1,y1 boxes in original pixels → int64 boxes at ``resize_size`` (W', H').

    Each coordinate is scaled in float64 as ``x * W' / W`` (that order of operations) and truncated
    with int(), exactly like wsolevaluation's ``resize_bbox``."""
    b = _check_boxes(boxes, "scale_boxes").astype(np.float64)
    w, h = (float(v) for v in _size_wh(image_size, "image_size"))
    nw, nh = (float(v) for v in _size_wh(resize_size, "resize_size"))
    out = np.empty_like(b)
    out[:, 0] = b[:, 0] * nw / w
    out[:, 1] = b[:, 1] * nh / h
    out[:, 2] = b[:, 2] * nw / w
    out[:, 3] = b[:, 3] * nh / h
    return out.astype(np.int64)  # truncation toward zero == int() for non-negative values


def resize_box(box: Sequence[float], image_size: Sequence[int],
               resize_size: Sequence[int] = (224, 224)) -> tuple[int, int, int, int]:
    """One box, as a tuple of ints (wsolevaluation ``resize_bbox``): resize_box((1, 2, 4, 3), (10, 20),
    (35, 10)) == (3, 1, 14, 1)."""
    x0, y0, x1, y1 = (int(v) for v in scale_boxes(np.asarray(box, np.float64)[None], image_size,
                                                    resize_size)[0])
    return x0, y0, x1, y1


def normalize_per_class(maps: Any, size: Sequence[int] | None = None) -> np.ndarray:
    """K×h×w raw per-class maps → float32 K×H×W maps for DenseMIoU (MCTformer's preparation).

    ``size`` is the original image (W, H); when it differs from (w, h) the maps are upsampled with
    bilinear interpolation (``torch.nn.functional.interpolate``, align_corners=False), then each
    class map is min-max normalised as ``(x − min) / (max − min + 1e-8)`` in float32."""
    arr = to_numpy(maps)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise MetricInputError(f"normalize_per_class: expected K×H×W maps, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if size is not None:
        w, h = _size_wh(size, "normalize_per_class size")
        if arr.shape[0] == 0:
            return np.zeros((0, h, w), np.float32)
        if (h, w) != arr.shape[1:]:
            import torch
            import torch.nn.functional as F

            t = torch.from_numpy(np.ascontiguousarray(arr))[None]
            arr = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    out = np.empty_like(arr)
    for k in range(arr.shape[0]):
        x = arr[k]
        if not np.isfinite(x).all():
            raise MetricInputError(f"normalize_per_class: class map {k} contains NaN/inf")
        lo = x.min()
        out[k] = (x - lo) / (x.max() - lo + np.float32(1e-8))
    return out
