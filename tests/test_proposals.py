"""Selective-search-style proposals, WWbL's grid boxes and area filter."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

from wsolbench.proposals import (area_filter, clip_boxes, grid_boxes, hierarchical_grouping,
                                 selective_search, wwbl_proposals)


def _scene(size=96):
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), (40, 160, 60), np.uint8)
    img[20:60, 30:80] = (220, 30, 30)  # a red block: x 30..79, y 20..59
    noise = rng.integers(0, 12, img.shape, dtype=np.uint8)
    return img + noise


def test_selective_search_finds_the_object():
    boxes = selective_search(_scene(), mode="single")
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    assert len({tuple(b) for b in boxes.tolist()}) == len(boxes)  # no duplicates
    target = np.array([30, 20, 80, 60])
    assert np.abs(boxes - target).max(axis=1).min() <= 2
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    # the whole image is always one of the (merged) regions
    assert any((b == [0, 0, 96, 96]).all() for b in boxes)


def test_selective_search_is_deterministic():
    a = selective_search(_scene(64), mode="fast", seed=3)
    b = selective_search(_scene(64), mode="fast", seed=3)
    assert np.array_equal(a, b)


def test_hierarchical_grouping_merges_to_one():
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    img = np.zeros((4, 4, 3), float)
    img[:, 2:] = 200
    regions = hierarchical_grouping(labels, img, np.zeros((4, 4, 24)), ("colour", "size", "fill"))
    assert len(regions) == 4 + 3  # n initial regions + n-1 merges
    assert regions[-1] == ((0, 0, 4, 4), 3)
    # same-colour quadrants merge first
    assert {regions[4][0], regions[5][0]} == {(0, 0, 2, 4), (2, 0, 4, 4)}


def test_grid_boxes_and_area_filter_follow_wwbl():
    g = grid_boxes(224, 224)
    # 1/2: 113-px tiles (2x2), 1/3: 75-px tiles (3x3), 1/4: 57-px tiles (4x4)
    assert len(g) == 4 + 9 + 16
    assert g[0].tolist() == [0, 0, 113, 113]
    kept = area_filter(g, 224, 224, 0.1)
    assert len(kept) == 4 + 9  # 57² = 3249 <= 0.1·224² = 5017.6: the quarter tiles are dropped
    clipped = clip_boxes(kept, 224, 224)
    assert clipped.max() <= 224


def test_wwbl_proposals_in_original_pixels():
    img = _scene(96)
    p = wwbl_proposals(img, size=64, mode="single", max_proposals=10)
    assert p.shape == (10, 4) and p.dtype == np.float32
    assert p.min() >= 0 and p[:, [0, 2]].max() <= 96 and p[:, [1, 3]].max() <= 96
    area = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    assert (area > 0.1 * 96 * 96 - 1e-3).all()
    grid_only = wwbl_proposals(img, size=64, mode="none")
    assert len(grid_only) == 4 + 9
