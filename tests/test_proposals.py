"""WWbL's proposals: OpenCV's selective search (cv2.ximgproc), the grid boxes and the area filter."""
from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from wsolbench.maps.proposals import area_filter, clip_boxes, grid_boxes, selective_search, wwbl_proposals  # noqa: E402


def _scene(size=96):
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), (40, 160, 60), np.uint8)
    img[20:60, 30:80] = (220, 30, 30)  # a red block: x 30..79, y 20..59
    noise = rng.integers(0, 12, img.shape, dtype=np.uint8)
    return img + noise


def _normalised(img):
    """The official selective-search input: the image as g sees it, Normalize(0.5, 0.5), float32 H×W×3."""
    return ((img.astype(np.float32) / 255 - 0.5) / 0.5).astype(np.float32)


def test_opencv_contrib_is_installed():
    assert hasattr(cv2, "ximgproc"), "pip install opencv-contrib-python-headless (see setup.cfg)"


@pytest.mark.parametrize("mode", ["single", "fast"])
def test_selective_search_finds_the_object(mode):
    boxes = selective_search(_scene(), mode=mode)
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    assert len({tuple(b) for b in boxes.tolist()}) == len(boxes)  # no duplicates
    assert np.abs(boxes - np.array([30, 20, 80, 60])).max(axis=1).min() <= 2
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (np.diff(area) <= 0).all()  # by decreasing area


def test_selective_search_is_opencvs_and_deterministic():
    """OpenCV orders its regions by a std::rand draw; the set is OpenCV's, the order ours (stable)."""
    img = _normalised(_scene(64))
    a, b = selective_search(img), selective_search(img)
    assert np.array_equal(a, b)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(img)
    ss.switchToSelectiveSearchFast()
    rects = np.asarray(ss.process()).reshape(-1, 4)
    assert {tuple(r) for r in rects.tolist()} == {(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in a.tolist()}
    with pytest.raises(ValueError):
        selective_search(img, mode="bogus")


def test_grid_boxes_and_area_filter_follow_wwbl():
    g = grid_boxes(224, 224)
    # 1/2: 113-px tiles (2x2), 1/3: 75-px tiles (3x3), 1/4: 57-px tiles (4x4)
    assert len(g) == 4 + 9 + 16
    assert g[0].tolist() == [0, 0, 113, 113]
    kept = area_filter(g, 224, 224, 0.1)
    assert len(kept) == 4 + 9  # 57² = 3249 <= 0.1·224² = 5017.6: the quarter tiles are dropped
    clipped = clip_boxes(kept, 224, 224)
    assert clipped.max() <= 224


def test_wwbl_proposals_on_the_normalised_input():
    img = _normalised(_scene(96))
    p = wwbl_proposals(img, mode="single", max_proposals=10)
    assert p.shape == (10, 4) and p.dtype.kind == "i"
    assert p.min() >= 0 and p.max() <= 96
    full = wwbl_proposals(img, mode="fast")
    ss = area_filter(selective_search(img, "fast"), 96, 96, 0.1)
    assert len(full) == len(ss) + 4 + 9  # the kept selective-search boxes, then the 1/2 and 1/3 tiles
    area = (full[:, 2] - full[:, 0]) * (full[:, 3] - full[:, 1])
    assert (area > 0.1 * 96 * 96 - 2 * 96).all()  # clipped grid tiles lose at most a row and a column
    grid_only = wwbl_proposals(img, mode="none")
    assert len(grid_only) == 4 + 9
