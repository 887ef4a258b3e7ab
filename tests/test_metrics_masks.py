"""PxAP / pIoU: oracles and an exact comparison with the reference histogram computation."""
from __future__ import annotations

import numpy as np
import pytest

from wsolbench.metrics import MetricInputError, PxAP, ThresholdPolicy, pxap
from wsolbench.metrics.masks import histogram_bins


def reference_pxap(maps, fgs, ignores, interval):
    """wsolevaluation MaskEvaluator (+ DA-WSOL's pIoU), written out with np.histogram."""
    thr = list(np.arange(0, 1, interval))
    edges = np.append(thr, [1.0, 2.0, 3.0])
    fg_hist = np.zeros(len(thr) + 2)
    bg_hist = np.zeros(len(thr) + 2)
    for m, fg, ign in zip(maps, fgs, ignores):
        gt = fg.astype(np.uint8) + 255 * (ign & ~fg).astype(np.uint8)
        m = m.astype(np.float64)
        fg_hist += np.histogram(m[gt == 1], bins=edges)[0]
        bg_hist += np.histogram(m[gt == 0], bins=edges)[0]
    tp = fg_hist[::-1].cumsum()
    fn = fg_hist.sum() - tp
    fp = bg_hist[::-1].cumsum()
    nz = (tp + fp) != 0
    with np.errstate(invalid="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        iou = tp / (fp + fn + tp)
    iou *= 100
    auc = (precision[1:] * np.diff(recall))[nz[1:]].sum()
    auc *= 100
    return auc, np.max(iou[~np.isnan(iou)]), fg_hist, bg_hist


def test_perfect_and_constant_maps():
    fg = np.zeros((32, 32), bool)
    fg[8:20, 4:30] = True
    assert pxap([fg.astype(np.float32)], [fg])["pxap"] == 100.0
    p, n = fg.sum(), (~fg).sum()
    for value in (0.0, 0.37, 1.0):
        res = pxap([np.full((32, 32), value, np.float32)], [fg])
        assert res["pxap"] == pytest.approx(100 * p / (p + n), rel=1e-12)


def test_ignore_mask_excludes_pixels_but_never_foreground():
    fg = np.zeros((16, 16), bool)
    fg[4:8, 4:8] = True
    m = np.zeros((16, 16), np.float32)
    m[4:8, 4:8] = 0.9
    m[0, 0] = 1.0  # a background pixel scored above every foreground pixel
    ign = np.zeros((16, 16), bool)
    assert pxap([m], [fg], [ign])["pxap"] < 100
    ign[0, 0] = True
    ign[4, 4] = True  # ignore ∩ foreground is NOT ignored (ignore = ignore AND NOT fg)
    res = pxap([m], [fg], [ign])
    assert res["pxap"] == 100.0
    metric = PxAP()
    metric.update([m], [fg], [ign])
    assert metric.state_dict()["fg_hist"].sum() == fg.sum()
    assert metric.state_dict()["bg_hist"].sum() == (~fg).sum() - 1


def test_histogram_bins_equal_numpy_histogram_on_edges():
    for interval in (0.01, 0.001, 0.05):
        thr = np.arange(0, 1, interval)
        edges = np.append(thr, [1.0, 2.0, 3.0])
        rng = np.random.default_rng(0)
        v = np.concatenate([rng.random(5000), thr, np.nextafter(thr, -1)[1:], np.nextafter(thr, 2),
                            [0.0, 1.0, np.nextafter(1.0, 0)]])
        for dtype in (np.float64, np.float32):
            vv = v.astype(dtype)
            got = np.bincount(histogram_bins(vv, edges, interval), minlength=len(edges) - 1)
            assert np.array_equal(got, np.histogram(vv.astype(np.float64), bins=edges)[0])


@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_equals_reference_on_random_maps(interval):
    rng = np.random.default_rng(1)
    maps, fgs, igns = [], [], []
    for k in range(6):
        m = rng.random((40, 30))
        if k % 3 == 0:
            m = np.round(m * 20) / 20  # values exactly on bin edges
        maps.append(m.astype(np.float32 if k % 2 else np.float64))
        fg = rng.random((40, 30)) < 0.3
        fgs.append(fg)
        igns.append(rng.random((40, 30)) < 0.1)
    metric = PxAP(interval)
    metric.update(maps, fgs, igns)
    res = metric.compute()
    auc, piou, fg_hist, bg_hist = reference_pxap(maps, fgs, igns, interval)
    assert res["pxap"] == auc
    assert res["piou"] == piou
    assert np.array_equal(metric.state_dict()["fg_hist"], fg_hist)
    assert np.array_equal(metric.state_dict()["bg_hist"], bg_hist)


def test_image_histograms_are_what_update_adds_image_by_image():
    rng = np.random.default_rng(2)
    maps = [rng.random((24, 20)) for _ in range(4)]
    fgs = [rng.random((24, 20)) < 0.4 for _ in range(4)]
    igns = [rng.random((24, 20)) < 0.2, None, rng.random((24, 20)) < 0.2, None]
    summed, split = PxAP(0.01), PxAP(0.01)
    summed.update(maps, fgs, igns)
    hists = split.image_histograms(maps, fgs, igns)
    assert split.count == 0 and not split.state_dict()["fg_hist"].any()  # computing them adds nothing
    for m, fg, ign, h in zip(maps, fgs, igns, hists):
        one = PxAP(0.01)
        one.update([m], [fg], [ign])
        assert np.array_equal(h, np.stack([one.state_dict()["fg_hist"], one.state_dict()["bg_hist"]]))
    split.add_histograms(hists)
    assert split.count == 4
    for key in ("fg_hist", "bg_hist"):
        assert np.array_equal(split.state_dict()[key], summed.state_dict()[key])
    with pytest.raises(MetricInputError, match=r"hists\[0\] must be an integer array of shape \(2, 102\)"):
        split.add_histograms([np.zeros((2, 1002), np.int64)])  # binned at another interval
    assert split.count == 4


def test_piou_policies():
    fg = np.zeros((20, 20), bool)
    fg[5:15, 5:15] = True
    m = np.where(fg, 0.8, 0.2).astype(np.float32)
    metric = PxAP()
    metric.update([m], [fg])
    res = metric.compute()
    assert res["piou"] == 100.0 and 0.2 < res["best_tau_piou"] <= 0.8
    low = metric.compute(ThresholdPolicy("fixed", 0.1))
    assert low["piou"] == pytest.approx(100 * fg.sum() / fg.size)
    assert low["pxap"] == res["pxap"]  # PxAP is threshold-free
    assert metric.compute(ThresholdPolicy.from_val(metric))["piou"] == 100.0


def test_validation():
    metric = PxAP()
    m = np.zeros((8, 8), np.float32)
    with pytest.raises(MetricInputError, match="image 0.*shape"):
        metric.update([m], [np.zeros((8, 9), bool)])
    with pytest.raises(MetricInputError, match="0/1"):
        metric.update([m], [np.full((8, 8), 0.5)])
    with pytest.raises(MetricInputError, match="differ in length"):
        metric.update([m, m], [np.zeros((8, 8), bool)])
    with pytest.raises(MetricInputError, match="no images"):
        metric.compute()
    with pytest.raises(MetricInputError, match="image 0.*empty GT"):
        metric.update([m], [np.zeros((8, 8), bool)])
    lenient = PxAP(allow_empty_gt=True)
    lenient.update([m], [np.zeros((8, 8), bool)])
    with pytest.raises(MetricInputError, match="no foreground"):
        lenient.compute()
