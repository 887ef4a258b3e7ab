"""The component-tree sweep behind MaxBoxAcc's fast path, level by level against OpenCV's contours."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from wsolbench.metrics import box_iou
from wsolbench.metrics.boxes import image_best_iou
from wsolbench.metrics.component_tree import UNDECIDED, level_best_iou, uint8_profile


def opencv_best_iou(u: np.ndarray, t: int, gt: np.ndarray, multi_contour: bool) -> float:
    """The reference rule at one integer threshold (findContours RETR_TREE on u > t)."""
    h, w = u.shape
    contours = cv2.findContours(((u > t) * 255).astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        boxes.append((x, y, min(x + bw, w - 1), min(y + bh, h - 1)))
    return float(box_iou(boxes, gt).max())


def has_hole(mask: np.ndarray) -> bool:
    return bool((ndimage.binary_fill_holes(mask) != mask).any())


def random_levels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Few-level maps: many components, rings, islands, equal areas and single pixels."""
    kind = rng.integers(3)
    if kind == 0:
        return rng.integers(0, 4, (h, w)).astype(np.uint8) * 60
    if kind == 1:
        small = rng.integers(0, 3, (max(1, h // 3), max(1, w // 3))).astype(np.uint8) * 100
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return (rng.random((h, w)) * 255).astype(np.uint8)


@pytest.mark.parametrize("multi_contour", [False, True])
def test_every_level_matches_opencv(multi_contour):
    rng = np.random.default_rng(11 + multi_contour)
    undecided = holed = 0
    for _ in range(150):
        h, w = rng.integers(2, 30, 2)
        u = random_levels(rng, int(h), int(w))
        ts = np.unique(u)[:-1].astype(np.int64)  # every level that leaves pixels above it
        if not len(ts):
            continue
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        gt = np.array([[x0, y0, rng.integers(x0, w), rng.integers(y0, h)]])
        got = level_best_iou(u, ts, gt, multi_contour)
        for t, value in zip(ts, got):
            holed += has_hole(u > t)
            if value == UNDECIDED:  # only v1, and only where a component has a hole
                assert not multi_contour and has_hole(u > t)
                undecided += 1
            else:
                assert value == opencv_best_iou(u, int(t), gt, multi_contour), (u, t)
    assert undecided < holed  # the area bounds still settle some levels with holes


def test_largest_area_is_the_outer_polygon_not_the_pixel_count():
    """An L of 5 pixels (polygon area 0) loses to a 2×2 square (4 pixels, area 1)."""
    u = np.zeros((8, 12), np.uint8)
    u[1:4, 1] = u[3, 1:4] = 200          # L: 5 pixels on two lines, polygon area 0
    u[5:7, 8:10] = 200                   # square: 4 pixels, area 1
    gt = np.array([[8, 5, 10, 7]])
    assert level_best_iou(u, np.array([0]), gt, False)[0] == 1.0
    assert opencv_best_iou(u, 0, gt, False) == 1.0


def test_equal_areas_go_to_the_component_found_last_in_raster_order():
    u = np.zeros((20, 20), np.uint8)
    u[2:5, 12:15] = u[10:13, 2:5] = u[10:13, 12:15] = 255  # three 3×3 squares: equal areas
    for gt in ([[12, 2, 15, 5]], [[2, 10, 5, 13]], [[12, 10, 15, 13]]):
        gt = np.array(gt)
        assert level_best_iou(u, np.array([0]), gt, False)[0] == opencv_best_iou(u, 0, gt, False)
    assert level_best_iou(u, np.array([0]), np.array([[12, 10, 15, 13]]), False)[0] == 1.0


def test_hole_boxes_and_the_frame():
    """V2 scores a hole's contour box (one pixel around the hole); background reaching the image edge
    is not a hole."""
    u = np.full((30, 30), 200, np.uint8)
    u[10:20, 10:20] = 0        # a hole
    u[0:5, 25:30] = 0          # a notch at the frame: not a hole
    ts = np.array([0, 100])
    gt_hole = np.array([[9, 9, 21, 21]])
    assert list(level_best_iou(u, ts, gt_hole, True)) == [1.0, 1.0]
    assert level_best_iou(u, ts, gt_hole, False)[0] == opencv_best_iou(u, 0, gt_hole, False) < 0.5
    gt_notch = np.array([[24, 0, 29, 6]])
    assert level_best_iou(u, ts, gt_notch, True)[0] == opencv_best_iou(u, 0, gt_notch, True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uint8_profile_is_the_reference_conversion(dtype):
    rng = np.random.default_rng(5)
    m = rng.random((31, 17)).astype(dtype)
    m.flat[rng.integers(0, m.size, 40)] = (rng.integers(0, 256, 40) / 255).astype(dtype)  # exact levels
    u, hist, rows, cols = uint8_profile(m)
    ref = (m.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(u, ref) and np.array_equal(hist, np.bincount(ref.ravel(), minlength=256))
    assert np.array_equal(rows, ref.max(axis=1)) and np.array_equal(cols, ref.max(axis=0))


def test_oversized_maps_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="prepare_map"):
        level_best_iou(np.zeros((2, 40000), np.uint8), np.array([0]), np.array([[0, 0, 1, 1]]), False)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_float_dtype_is_evaluated_as_its_float64_value(dtype):
    rng = np.random.default_rng(8)
    m = cv2.resize(rng.random((5, 5)), (40, 40), interpolation=cv2.INTER_CUBIC).clip(0, 1).astype(dtype)
    gt = np.array([[5, 5, 30, 30]])
    got = image_best_iou(m, gt, np.arange(0, 1, 0.01), False)
    assert np.array_equal(got, image_best_iou(m.astype(np.float64), gt, np.arange(0, 1, 0.01), False))
