"""MaxBoxAcc / MaxBoxAccV2 / Top-k Loc and the score-map preparation: oracles and an exact comparison
with a straightforward per-threshold cv2 loop (the wsolevaluation algorithm, written out below)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from wsolbench.metrics import (MaxBoxAcc, MetricInputError, PREPARATION, ThresholdPolicy, box_iou, max_box_acc,
                               prepare_map, resize_box, scale_boxes)
from wsolbench.metrics.boxes import image_best_iou


# ------------------------------------------------------------------ the straightforward reference loop
def reference_boxes(scoremap, thresholds, multi_contour):
    h, w = scoremap.shape
    img = (scoremap.astype(np.float64) * 255).astype(np.uint8)
    boxes, counts = [], []
    for tau in thresholds:
        _, binary = cv2.threshold(img, int(tau * np.max(img)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            boxes.append(np.zeros((1, 4), np.int64))
            counts.append(1)
            continue
        if not multi_contour:
            contours = [max(contours, key=cv2.contourArea)]
        bs = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            bs.append([x, y, min(x + bw, w - 1), min(y + bh, h - 1)])
        boxes.append(np.asarray(bs, np.int64))
        counts.append(len(bs))
    return boxes, counts


def reference_best_iou(scoremap, gt, thresholds, multi_contour):
    boxes, counts = reference_boxes(scoremap, thresholds, multi_contour)
    ious = box_iou(np.concatenate(boxes), gt).max(axis=1)
    out, i = [], 0
    for n in counts:
        out.append(max(ious[i:i + n]))
        i += n
    return np.asarray(out)


def reference_max_box_acc(maps, gts, interval, multi_contour, deltas=(30, 50, 70)):
    thr = np.arange(0, 1, interval)
    correct = {d: np.zeros(len(thr)) for d in deltas}
    for m, g in zip(maps, gts):
        best = reference_best_iou(m, np.asarray(g), thr, multi_contour)
        for d in deltas:
            correct[d][np.where(best >= d / 100)[0]] += 1
    return [float((correct[d] * 100. / len(maps)).max()) for d in deltas]


def _random_maps(rng, n, size=48):
    """Noise, binary noise, few-level plateaus and smooth blobs (bicubic upsampling of a tiny grid)."""
    maps = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            m = rng.random((size, size))
        elif kind == 1:
            m = (rng.random((size, size)) > 0.6) * 1.0
        elif kind == 2:
            m = np.round(rng.random((size, size)) * 3) / 3
        else:
            m = prepare_map(rng.random((int(rng.integers(3, 8)),) * 2), (size, size), dtype=np.float64)
        maps.append(m.astype(np.float32 if k % 2 else np.float64))
    return maps


def _random_boxes(rng, size, n_max=3):
    out = []
    for _ in range(int(rng.integers(1, n_max + 1))):
        x0, x1 = sorted(rng.integers(0, size, 2))
        y0, y1 = sorted(rng.integers(0, size, 2))
        out.append([x0, y0, x1, y1])
    return np.asarray(out, np.int64)


# ------------------------------------------------------------------ oracles from metrics.md
def test_iou_oracles():
    assert box_iou([[1, 2, 5, 6]], [[3, 1, 4, 5]])[0, 0] == pytest.approx(8 / 27, abs=0)
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 1.0
    # degenerate denominator → 0
    assert box_iou([[5, 5, 3, 3]], [[5, 5, 3, 3]])[0, 0] == 0.0


def test_box_rescaling_oracle():
    assert resize_box((1, 2, 4, 3), (10, 20), (35, 10)) == (3, 1, 14, 1)
    got = scale_boxes(np.array([[1, 2, 4, 3], [0, 0, 10, 20]]), (10, 20), (35, 10))
    assert got.tolist() == [[3, 1, 14, 1], [0, 0, 35, 10]]
    # multiply first, then divide (x·W'/W): 3·224/7 = 96 exactly; 49·224/350 = 31.36 → 31
    assert scale_boxes([[3, 49, 3, 49]], (7, 350), (224, 224)).tolist() == [[96, 31, 96, 31]]


def test_prepare_map():
    assert PREPARATION == "bicubic resize (cv2.INTER_CUBIC) + min-max; constant/NaN → 0"
    raw = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    out = prepare_map(raw, (224, 224))
    assert out.dtype == np.float32 and out.shape == (224, 224)
    assert out.min() == 0.0 and out.max() == 1.0
    ref = cv2.resize(raw.astype(np.float64), (224, 224), interpolation=cv2.INTER_CUBIC)
    ref -= ref.min()
    ref /= ref.max()
    assert np.array_equal(prepare_map(raw, (224, 224), dtype=np.float64), ref)
    # (W, H) order, constant and NaN maps, torch-like 1×H×W input
    assert prepare_map(raw, (30, 20)).shape == (20, 30)
    assert not prepare_map(np.full((5, 5), 3.0), (9, 9)).any()
    bad = raw.copy()
    bad[1, 1] = np.nan
    assert not prepare_map(bad, (9, 9)).any()
    assert prepare_map(raw[None], (9, 9)).shape == (9, 9)
    with pytest.raises(MetricInputError):
        prepare_map(np.zeros((2, 3, 4)), (9, 9))


# ------------------------------------------------------------------ hand-made maps with known answers
def _blob(h=64, w=64, box=(10, 20, 30, 40), value=1.0):
    m = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = box
    m[y0:y1 + 1, x0:x1 + 1] = value
    return m


def test_perfect_box():
    m = _blob()
    # contour of pixels x 10..30 → boundingRect x=10,w=21 → box [10, 20, 31, 41]
    res = max_box_acc([m], [np.array([[10, 20, 31, 41]])])
    assert res["maxboxacc"] == 100.0 and res["maxboxacc_v2"] == 100.0
    assert res["best_tau_iou50"] == 0.0
    assert res["threshold_policy"] == "oracle" and res["box_rule"] == "largest contour"


def test_zero_map_gives_zero_box():
    m = np.zeros((32, 32), np.float32)
    assert max_box_acc([m], [np.array([[0, 0, 0, 0]])])["maxboxacc"] == 100.0
    assert max_box_acc([m], [np.array([[0, 0, 1, 1]])])["maxboxacc"] == 0.0  # IoU 1/4


def test_largest_contour_vs_all_contours():
    m = np.zeros((64, 64), np.float32)
    m[5:35, 5:35] = 1.0   # big blob
    m[45:55, 45:55] = 1.0  # small blob
    gt_small = np.array([[45, 45, 55, 55]])
    assert max_box_acc([m], [gt_small])["maxboxacc"] == 0.0
    v2 = max_box_acc([m], [gt_small], multi_contour=True)
    assert v2["maxboxacc_iou70"] == 100.0 and v2["box_rule"] == "all contours"


def test_hole_contour_counts_in_all_contours():
    """RETR_TREE also returns the inner (hole) contour: its box can be the best match in V2."""
    m = np.zeros((64, 64), np.float32)
    m[4:60, 4:60] = 1.0
    m[20:40, 20:40] = 0.0  # a hole
    gt_hole = np.array([[19, 19, 41, 41]])
    assert max_box_acc([m], [gt_hole])["maxboxacc_iou50"] == 0.0
    assert max_box_acc([m], [gt_hole], multi_contour=True)["maxboxacc_iou70"] == 100.0
    thr = np.arange(0, 1, 0.01)
    for multi in (False, True):
        assert np.array_equal(image_best_iou(m, gt_hole, thr, multi),
                              reference_best_iou(m, gt_hole, thr, multi))


def test_ties_in_largest_contour_follow_opencv_order():
    """Equal-area contours: the first one in findContours order wins, as in max(contours, key=area)."""
    m = np.zeros((40, 40), np.float32)
    m[5:10, 5:10] = 1.0
    m[25:30, 25:30] = 1.0
    m[5:10, 25:30] = 1.0
    thr = np.arange(0, 1, 0.01)
    for gt in ([[5, 5, 10, 10]], [[25, 25, 30, 30]], [[25, 5, 30, 10]]):
        gt = np.array(gt)
        assert np.array_equal(image_best_iou(m, gt, thr, False), reference_best_iou(m, gt, thr, False))
    # a 1-pixel-wide diamond ring: its hole contour has exactly the outer contour's area
    m = np.zeros((12, 12), np.float32)
    for x, y in [(5, 1), (4, 2), (6, 2), (3, 3), (7, 3), (4, 4), (6, 4), (5, 5)]:
        m[y, x] = 1.0
    m[8:11, 8:11] = 1.0  # a 3×3 square: area 4, less than the ring's 8
    for gt in ([[3, 1, 8, 6]], [[8, 8, 11, 11]]):
        gt = np.array(gt)
        for multi in (False, True):
            assert np.array_equal(image_best_iou(m, gt, thr, multi), reference_best_iou(m, gt, thr, multi))
    # single-pixel (zero-area) contours everywhere
    m = np.zeros((20, 20), np.float32)
    m[::4, ::3] = 1.0
    gt = np.array([[6, 8, 7, 9]])
    assert np.array_equal(image_best_iou(m, gt, thr, False), reference_best_iou(m, gt, thr, False))


def test_strict_threshold_and_integer_rule():
    """binary = u > int(τ·max u): a pixel equal to the integer threshold is background."""
    m = np.zeros((16, 16), np.float64)
    m[2:6, 2:6] = 1.0
    m[8:14, 8:14] = 0.5  # u = 127; at τ=0.5, int(0.5·255)=127 → excluded
    thr = np.array([0.49, 0.5])
    gt = np.array([[2, 2, 6, 6]])
    best = image_best_iou(m, gt, thr, False)
    assert best[1] == 1.0 and best[0] < 1.0
    assert np.array_equal(best, reference_best_iou(m, gt, thr, False))


@pytest.mark.parametrize("multi_contour", [False, True])
@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_fast_path_equals_reference_loop(multi_contour, interval):
    rng = np.random.default_rng(7 + int(multi_contour) + int(interval * 1000))
    n, size = (8, 40) if interval >= 0.01 else (4, 24)  # the reference loop is slow at 0.001
    maps = _random_maps(rng, n, size)
    gts = [_random_boxes(rng, size) for _ in maps]
    thr = np.arange(0, 1, interval)
    for m, g in zip(maps, gts):
        ref = reference_best_iou(m, g, thr, multi_contour)
        assert np.array_equal(image_best_iou(m, g, thr, multi_contour), ref)
        pruned = image_best_iou(m, g, thr, multi_contour, deltas=(0.3, 0.5, 0.7))
        for d in (0.3, 0.5, 0.7):
            assert np.array_equal(pruned >= d, ref >= d)
    res = max_box_acc(maps, gts, cam_curve_interval=interval, multi_contour=multi_contour)
    expect = reference_max_box_acc(maps, gts, interval, multi_contour)
    assert [res["maxboxacc_iou30"], res["maxboxacc_iou50"], res["maxboxacc_iou70"]] == expect
    assert res["maxboxacc_v2"] == float(np.mean(expect))


def test_blobby_224_maps_equal_reference():
    rng = np.random.default_rng(3)
    maps, gts = [], []
    for _ in range(6):
        raw = rng.random((14, 14)) ** 3
        maps.append(prepare_map(raw, (224, 224)))
        gts.append(_random_boxes(rng, 224, 2))
    for multi in (False, True):
        res = max_box_acc(maps, gts, multi_contour=multi, workers=2)
        assert [res["maxboxacc_iou30"], res["maxboxacc_iou50"], res["maxboxacc_iou70"]] == \
            reference_max_box_acc(maps, gts, 0.01, multi)


# ------------------------------------------------------------------ Top-1 / Top-5, policies
def test_top1_top5_loc():
    m = _blob()
    gt = np.array([[10, 20, 31, 41]])
    res = max_box_acc([m, m, m], [gt, gt, gt], pred_top5=[[1, 2, 3, 4, 5], [9, 1, 2, 3, 4], [7, 8, 9, 10, 11]],
                      labels=[1, 1, 1])
    assert res["gt_known_loc"] == 100.0
    assert res["top1_loc"] == pytest.approx(100 / 3)
    assert res["top5_loc"] == pytest.approx(200 / 3)
    metric = MaxBoxAcc()
    metric.update([m], [gt], pred_top5=[[1]], labels=[1])
    with pytest.raises(MetricInputError):
        metric.update([m], [gt])  # predictions missing for this batch


def test_threshold_policies():
    m = np.zeros((64, 64), np.float32)
    m[10:40, 10:40] = 0.3
    m[20:30, 20:30] = 1.0
    gt = np.array([[20, 20, 31, 31]])  # matched only when the 0.3 plateau is cut away (τ ≥ 0.3)
    metric = MaxBoxAcc()
    metric.update([m], [gt])
    oracle = metric.compute()
    assert oracle["maxboxacc"] == 100.0 and oracle["best_tau_iou50"] == pytest.approx(0.3)
    low = metric.compute(ThresholdPolicy("fixed", 0.1))
    assert low["maxboxacc"] == 0.0 and low["threshold_policy"] == "fixed" and low["tau"] == 0.1
    val = ThresholdPolicy.from_val(metric)
    assert val.kind == "val" and val.tau_for("iou50") == pytest.approx(0.3)
    assert metric.compute(val)["maxboxacc"] == 100.0
    with pytest.raises(MetricInputError):
        metric.compute(ThresholdPolicy("fixed", 0.305))  # not on the 0.01 grid


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("maps, boxes, match", [
    ([np.zeros((8, 8, 3), np.float32)], [[[0, 0, 1, 1]]], "2-D"),
    ([np.full((8, 8), 1.5, np.float32)], [[[0, 0, 1, 1]]], r"\[0, 1\]"),
    ([np.full((8, 8), np.nan, np.float32)], [[[0, 0, 1, 1]]], "NaN"),
    ([np.zeros((8, 8), np.uint8)], [[[0, 0, 1, 1]]], "float"),
    ([np.zeros((8, 8), np.float32)], [np.zeros((0, 4))], "no GT boxes"),
    ([np.zeros((8, 8), np.float32)], [[[0, 0, 12, 3]]], "outside"),
    ([np.zeros((8, 8), np.float32)], [[[4, 0, 2, 3]]], "x1 ≥ x0"),
    ([np.zeros((8, 8), np.float32)], [[[-1, 0, 2, 3]]], "non-negative"),
    ([np.zeros((8, 8), np.float32)], [[[0.5, 0, 2, 3]]], "integers"),
])
def test_validation_names_the_image(maps, boxes, match):
    metric = MaxBoxAcc()
    good = np.zeros((8, 8), np.float32)
    metric.update([good], [[[0, 0, 1, 1]]])  # one image seen → the bad one is image 2 (item 1)
    with pytest.raises(MetricInputError, match=match) as err:
        metric.update([good] + maps, [[[0, 0, 1, 1]]] + boxes)
    assert "image 2 (item 1" in str(err.value)
    assert metric.count == 1  # a rejected batch leaves the state untouched


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_first_invalid_image_is_reported_whatever_the_workers(workers):
    # items 3 and 4 are both bad; the workers validate interleaved images, the error names item 3
    good, bad = np.zeros((8, 8), np.float32), np.full((8, 8), 2.0, np.float32)
    metric = MaxBoxAcc(workers=workers)
    with pytest.raises(MetricInputError, match=r"item 3 of this batch"):
        metric.update([good] * 3 + [bad, bad, good], [[[0, 0, 1, 1]]] * 6)
    assert metric.count == 0 and not metric.state_dict()["num_correct"].any()


def test_original_pixel_boxes_with_image_sizes():
    m = _blob(224, 224, (56, 56, 167, 167))
    # original 448×448 box [112, 112, 336, 336] → 224 scale [56, 56, 168, 168]
    res = max_box_acc([m], [np.array([[112.0, 112.0, 336.0, 336.0]])], image_sizes=[(448, 448)])
    assert res["maxboxacc"] == 100.0
