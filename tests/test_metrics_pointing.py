"""Pointing game (TorchRay), phrase pointing (MultiGrounding) and WWbL grounding box accuracy."""
from __future__ import annotations

import numpy as np
import pytest

from wsolbench.metrics import (GroundingBoxAccuracy, MetricInputError, PhrasePointing, PointingGame,
                               boxes_to_mask, grounding_box_accuracy, phrase_pointing, pointing_game)
from wsolbench.metrics.grounding import cubehelix_gray, cubehelix_lut, generate_box


def torchray_hit(mask, point, tolerance=15):
    """TorchRay PointingGame.evaluate, written out."""
    import torch

    v, u = torch.meshgrid(((torch.arange(mask.shape[0], dtype=torch.float32) - point[1]) ** 2,
                           (torch.arange(mask.shape[1], dtype=torch.float32) - point[0]) ** 2), indexing="ij")
    accept = (v + u) < tolerance ** 2
    return bool((torch.from_numpy(mask) & accept).view(-1).any())


def test_pointing_game_equals_torchray_rule():
    rng = np.random.default_rng(0)
    metric = PointingGame(num_classes=3)
    hits = np.zeros(3)
    totals = np.zeros(3)
    maps, masks, classes = [], [], []
    for k in range(40):
        m = rng.random((50, 60)).astype(np.float32)
        mask = np.zeros((50, 60), bool)
        x0, y0 = rng.integers(0, 55), rng.integers(0, 45)
        mask[y0:y0 + 5, x0:x0 + 5] = True
        c = k % 3
        idx = int(np.argmax(m))
        hit = torchray_hit(mask, (idx % 60, idx // 60))
        hits[c] += hit
        totals[c] += 1
        maps.append(m), masks.append(mask), classes.append(c)
    metric.update(maps, masks, classes)
    res = metric.compute()
    assert res["pointing_acc"] == pytest.approx(100 * np.mean(hits / np.maximum(totals, 1)))
    assert res["pointing_acc_overall"] == pytest.approx(100 * hits.sum() / totals.sum())
    assert res["hits"] == hits.sum() and res["count"] == 40


def test_pointing_tolerance_is_strict_and_ties_take_first_argmax():
    m = np.zeros((40, 40), np.float32)
    m[20, 5] = 1.0
    m[20, 35] = 1.0  # a tie: the first one in row-major order (x=5) is the point
    mask = np.zeros((40, 40), bool)
    mask[20, 20] = True  # exactly 15 px from x=5: not a hit (strict <)
    assert pointing_game([m], [mask])["pointing"] == 0.0
    mask[20, 19] = True  # 14 px: a hit
    assert pointing_game([m], [mask])["pointing"] == 100.0


def test_pointing_with_voc_boxes_and_mean_over_classes():
    # VOC XML (xmin=3, ymin=4, xmax=6, ymax=8) → 0-based inclusive [2, 3, 5, 7]
    mask = boxes_to_mask(np.array([[2, 3, 5, 7]]), (10, 10))
    assert mask.sum() == 4 * 5 and mask[3, 2] and mask[7, 5] and not mask[8, 5]
    m_hit = np.zeros((40, 40), np.float32)
    m_hit[5, 5] = 1
    far = np.zeros((40, 40), np.float32)
    far[39, 39] = 1
    box = np.array([[0, 0, 9, 9]])
    metric = PointingGame(num_classes=4, tolerance=15)
    metric.update([m_hit, far, m_hit], [box, box, box], [0, 0, 1])
    res = metric.compute()
    # class 0: 1/2, class 1: 1/1, classes 2, 3 never evaluated count as 0 (TorchRay's mean)
    assert res["pointing_acc"] == pytest.approx(100 * (0.5 + 1) / 4)
    assert res["pointing_acc_seen_classes"] == pytest.approx(75.0)
    assert res["classes_evaluated"] == 2


def test_pointing_validation():
    metric = PointingGame(num_classes=2)
    m = np.zeros((10, 10), np.float32)
    with pytest.raises(MetricInputError, match="image 0.*empty GT"):
        metric.update([m], [np.zeros((10, 10), bool)], [0])
    with pytest.raises(MetricInputError, match="outside"):
        metric.update([m], [np.array([[0, 0, 10, 3]])], [0])
    with pytest.raises(MetricInputError, match="class id"):
        metric.update([m], [np.array([[0, 0, 1, 1]])], [5])
    with pytest.raises(MetricInputError, match="NaN"):
        metric.update([np.full((10, 10), np.nan)], [np.array([[0, 0, 1, 1]])], [0])
    assert metric.count == 0


def test_phrase_pointing_inclusive_boxes_and_resize():
    m = np.zeros((20, 30), np.float32)
    m[10, 12] = 1.0
    assert phrase_pointing([m], [np.array([[12, 10, 12, 10]])])["pointing_acc"] == 100.0  # inclusive
    assert phrase_pointing([m], [np.array([[13, 10, 20, 15]])])["pointing_acc"] == 0.0
    assert phrase_pointing([m, m], [np.array([[0, 0, 1, 1], [5, 5, 15, 15]]), np.array([[0, 0, 1, 1]])])[
        "pointing_acc"] == 50.0
    # resized bilinearly to the original 60×40 first: the peak lands near (24.5, 20.5) → (24, 20) or (25, 21)
    res = PhrasePointing()
    res.update([m], [np.array([[23, 19, 26, 22]])], image_sizes=[(60, 40)])
    assert res.compute()["pointing_acc"] == 100.0
    with pytest.raises(MetricInputError, match="no GT box"):
        phrase_pointing([m], [np.zeros((0, 4))])


def test_cubehelix_matches_matplotlib_values():
    """Values of matplotlib 3.11's "cubehelix" colormap (checked against matplotlib itself)."""
    lut = cubehelix_lut()
    assert lut.shape == (259, 4)
    assert np.array_equal(lut[0, :3], [0.0, 0.0, 0.0]) and np.array_equal(lut[255, :3], [1.0, 1.0, 1.0])
    assert lut[128, :3].tolist() == [0.6328422475018423, 0.4747981096220677, 0.29070209208025455]
    gray = cubehelix_gray(np.linspace(0, 1, 11)[None])
    assert gray.tolist() == [[0, 25, 50, 76, 101, 128, 152, 179, 204, 230, 255]]
    assert not cubehelix_gray(np.full((3, 3), 0.5)).any()  # constant → NaN → "bad" colour (black)


def test_generate_box_hand_made():
    m = np.zeros((64, 64), np.float32)
    m[10:30, 20:50] = 1
    assert generate_box(m) == (20.0, 10.0, 50.0, 30.0)  # boundingRect x+w, y+h
    m = np.zeros((64, 64), np.float32)
    m[5:15, 5:15] = 1
    m[40:60, 40:60] = 0.9
    assert generate_box(m) == (5.0, 5.0, 60.0, 60.0)  # both kept, merged into their union
    m[40:60, 40:60] = 0.3  # below 0.5·max: dropped
    assert generate_box(m) == (5.0, 5.0, 15.0, 15.0)
    assert generate_box(np.full((16, 16), 0.5, np.float32)) == (0.0, 0.0, 1.0, 1.0)  # no contour
    yy, xx = np.mgrid[0:64, 0:64]
    assert generate_box(np.exp(-((xx - 20) ** 2 + (yy - 30) ** 2) / 200)) == (9.0, 19.0, 32.0, 42.0)


def test_grounding_box_accuracy():
    m = np.zeros((64, 64), np.float32)
    m[10:30, 20:50] = 1  # predicted box (20, 10, 50, 30)
    good = np.array([[20, 10, 40, 30], [30, 12, 50, 28]])  # union (20, 10, 50, 30): IoU 1
    bad = np.array([[0, 0, 20, 10]])
    res = grounding_box_accuracy([m, m], [good, bad])
    assert res["box_acc"] == 50.0 and res["count"] == 2
    # normalised coordinates: a map at 64×64 for a 128×128 image, GT in original pixels
    metric = GroundingBoxAccuracy()
    metric.update([m], [good * 2], image_sizes=[(128, 128)])
    assert metric.compute()["box_acc"] == 100.0
    with pytest.raises(MetricInputError, match=r"image 1 \(item 0"):
        metric.update([m], [np.array([[0, 0, 200, 10]])], image_sizes=[(128, 128)])
