"""Dense mIoU: the MCTformer rule, written out as a reference, and hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest

from wsolbench.metrics import DenseMIoU, MetricInputError, ThresholdPolicy, dense_miou, normalize_per_class


def reference_miou(maps_list, classes_list, gts, num_cls, t):
    """MCTformer evaluation.py (npy input): float32 tensor, channel 0 = t, channel k+1 = class k."""
    TP, P, T = np.zeros(num_cls, np.int64), np.zeros(num_cls, np.int64), np.zeros(num_cls, np.int64)
    for maps, classes, gt in zip(maps_list, classes_list, gts):
        h, w = gt.shape
        tensor = np.zeros((num_cls, h, w), np.float32)
        for k, c in enumerate(classes):
            tensor[c + 1] = maps[k]
        tensor[0, :, :] = t
        predict = np.argmax(tensor, axis=0).astype(np.uint8)
        cal = gt < 255
        mask = (predict == gt) * cal
        for i in range(num_cls):
            P[i] += np.sum((predict == i) * cal)
            T[i] += np.sum((gt == i) * cal)
            TP[i] += np.sum((gt == i) * mask)
    iou = [TP[i] / (T[i] + P[i] - TP[i] + 1e-10) for i in range(num_cls)]
    return np.mean(np.array(iou)) * 100, iou


def _random_case(rng, n=5, num_cls=6, h=20, w=24):
    maps_l, cls_l, gts = [], [], []
    for _ in range(n):
        k = int(rng.integers(0, 4))
        classes = rng.choice(num_cls - 1, size=k, replace=False)
        raw = rng.random((k, 5, 6)).astype(np.float32)
        maps = normalize_per_class(raw, (w, h))
        maps = np.round(maps * 50) / 50  # many exact ties with t and between classes
        gt = rng.integers(0, num_cls, (h, w))
        gt[rng.random((h, w)) < 0.1] = 255
        maps_l.append(maps.astype(np.float32))
        cls_l.append(classes)
        gts.append(gt.astype(np.uint8))
    return maps_l, cls_l, gts


def test_equals_mctformer_sweep():
    rng = np.random.default_rng(0)
    num_cls = 6
    maps_l, cls_l, gts = _random_case(rng, num_cls=num_cls)
    metric = DenseMIoU(num_cls)
    metric.update(maps_l, cls_l, gts)
    curve = metric.curves()["miou"]
    for j in range(0, 100, 7):
        t = j / 100.0
        ref, ref_iou = reference_miou(maps_l, cls_l, gts, num_cls, t)
        assert curve[j] == ref
        fixed = metric.compute(ThresholdPolicy("fixed", t))
        assert fixed["miou"] == ref and fixed["per_class_iou"] == [x * 100 for x in ref_iou]
    res = metric.compute()
    assert res["miou"] == curve.max() and res["bg_threshold"] == float(np.argmax(curve)) / 100
    # MCTformer's early-stopping sweep
    best, bt = 0.0, 0.0
    for j in range(100):
        if curve[j] > best:
            best, bt = curve[j], j / 100.0
        else:
            break
    assert res["miou_first_peak"] == best and res["first_peak_bg_threshold"] == bt


def test_perfect_prediction_and_ignore_label():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 3  # class index 2
    gt[8:, 8:] = 255
    m = (gt == 3).astype(np.float32)[None]
    m[0, 9, 9] = 1.0  # inside the ignored region: must not count
    res = dense_miou([m], [gt], num_classes=4, present_classes=[[2]])
    # background and class 2 perfect; classes 0, 1 absent (IoU 0/1e-10 = 0)
    assert res["per_class_iou"][0] == pytest.approx(100) and res["per_class_iou"][3] == pytest.approx(100)
    assert res["miou"] == pytest.approx(50)


def test_ties_go_to_background_then_lower_class():
    gt = np.array([[0, 1, 2]], np.uint8)
    maps = np.array([[[0.5, 0.7, 0.7]], [[0.5, 0.7, 0.7]]], np.float32)  # classes 1 and 0 (unsorted)
    metric = DenseMIoU(3, bg_thresholds=[0.5])
    metric.update([maps], [[1, 0]], [gt])
    st = metric.state_dict()
    # pixel 0: tie with t=0.5 → background; pixels 1, 2: tie between classes → class 0 (label 1)
    assert st["pred"][0].tolist() == [1, 2, 0]
    assert st["tp"][0].tolist() == [1, 1, 0]


def test_float32_threshold_cast():
    """t is written into a float32 array: a float32 map value equal to float32(t) ties → background."""
    t = 0.1
    v = np.float32(t)  # 0.100000001490116 > 0.1 in float64
    gt = np.array([[1]], np.uint8)
    metric = DenseMIoU(2, bg_thresholds=[t])
    metric.update([np.array([[[v]]], np.float32)], [[0]], [gt])
    assert metric.state_dict()["pred"][0].tolist() == [1, 0]


def test_normalize_per_class():
    raw = np.random.default_rng(0).random((2, 4, 5)).astype(np.float32)
    out = normalize_per_class(raw, (10, 8))
    assert out.shape == (2, 8, 10) and out.dtype == np.float32
    import torch
    import torch.nn.functional as F

    up = F.interpolate(torch.from_numpy(raw)[None], size=(8, 10), mode="bilinear", align_corners=False)[0]
    ref = (up - up.amin(dim=(1, 2), keepdim=True)) / (up.amax(dim=(1, 2), keepdim=True)
                                                       - up.amin(dim=(1, 2), keepdim=True) + 1e-8)
    assert np.array_equal(out, ref.numpy())


def test_validation():
    metric = DenseMIoU(21)
    gt = np.zeros((4, 4), np.uint8)
    m = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(MetricInputError, match="image 0.*outside 0..20"):
        metric.update([m], [[0]], [np.full((4, 4), 30, np.uint8)])
    with pytest.raises(MetricInputError, match="K×H×W"):
        metric.update([m], [[0, 1]], [gt])
    with pytest.raises(MetricInputError, match="0..19"):
        metric.update([m], [[20]], [gt])
    with pytest.raises(MetricInputError, match="NaN"):
        metric.update([np.full((1, 4, 4), np.nan, np.float32)], [[0]], [gt])
    with pytest.raises(MetricInputError, match="empty GT"):
        metric.update([m], [[0]], [np.full((4, 4), 255, np.uint8)])
    assert metric.count == 0
