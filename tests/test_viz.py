"""The notebook API (wsolbench.viz): overlay and curves return matplotlib figures; the cubehelix table of
metrics/grounding.py is matplotlib's own."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from wsolbench import viz


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def test_overlay_draws_the_map_boxes_and_gt_on_the_image():
    image = np.full((60, 80, 3), 128, np.uint8)
    m = np.zeros((15, 20))
    m[3:6, 12:16] = 1.0  # a hot spot top-right (map at a quarter of the image size)
    fig = viz.overlay(image, m, boxes=[[48, 12, 64, 24]], gt=np.array([[5, 30, 30, 55]]))
    assert isinstance(fig, Figure)
    px = _pixels(fig)
    red = (px[..., 0] > 200) & (px[..., 1] < 80) & (px[..., 2] < 80)
    green = (px[..., 1] > 200) & (px[..., 0] < 100) & (px[..., 2] < 100)
    h, w = px.shape[:2]
    ys, xs = np.nonzero(green)
    assert red.any() and green.any()
    assert xs.mean() < w / 2 and ys.mean() > h / 2  # the GT box is drawn bottom-left
    plain = _pixels(viz.overlay(image, np.zeros((15, 20))))
    assert (np.abs(px - plain).sum(axis=2) > 60).sum() > 100  # the map changes the picture


def test_overlay_takes_a_mask_and_rejects_a_bad_map():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    assert isinstance(viz.overlay(np.zeros((40, 40, 3)), np.random.rand(40, 40), gt=mask), Figure)
    with pytest.raises(ValueError, match="map must be 2-D"):
        viz.overlay(np.zeros((40, 40, 3)), np.zeros((2, 3, 4)))


def test_fit_map_min_max_and_resize():
    m = viz.fit_map(np.array([[1.0, 3.0], [np.nan, 2.0]]), (4, 4))
    assert m.shape == (4, 4) and m.min() >= 0 and m.max() == pytest.approx(1.0)
    assert not viz.fit_map(np.full((3, 3), 7.0), (3, 3)).any()  # a constant map draws as zeros


def test_curves_of_a_dataframe_and_of_a_run(tmp_path):
    df = pd.DataFrame({"δ=50": [10, 40, 20], "δ=70": [5, 10, 2]}, index=pd.Index([0.1, 0.2, 0.3], name="τ"))
    fig = viz.curves(df)
    assert [line.get_label() for line in fig.axes[0].lines] == ["δ=50", "δ=70"]
    run = tmp_path / "run"
    run.mkdir()
    tau = np.arange(0, 1, 0.25).tolist()
    (run / "curves.json").write_text(json.dumps({"default": {
        "v1": {"tau": tau, "iou50": [0, 50, 25, 0]},
        "miou": {"bg_threshold": tau, "miou": [10, 30, 20, 5]}}}))
    (run / "metrics.json").write_text(json.dumps({"method": "m", "dataset": "d", "results": {"default": {
        "v1_best_tau_iou50": 0.25, "best_bg_threshold": 0.25}}}))
    rec = {"image_id": "a", "label": 3, "variants": {"default": {"point_hit": True}}}
    (run / "per_image.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "image_id": "b", "variants": {
        "default": {"point_hit": False}}}) + "\n")
    fig = viz.curves(run)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["MaxBoxAcc (largest contour)", "mIoU vs background threshold", "pointing accuracy per class"]
    marker = fig.axes[0].lines[1]  # the chosen τ of δ=50
    assert list(marker.get_xdata()) == [0.25] and list(marker.get_ydata()) == [50]
    assert [p.get_height() for p in fig.axes[2].patches] == [50.0]
    with pytest.raises(KeyError, match="no variant 'cls'"):
        viz.curves(run, "cls")


def _cubehelix_by_formula(n: int = 256) -> np.ndarray:
    """Green's (2011) cubehelix with matplotlib's default parameters (gamma 1, start 0.5, rotations −1.5,
    hue 1), written out: the independent oracle for the table WWbL's box rule reads."""
    x = np.linspace(0, 1, n)
    amp = x * (1 - x) / 2
    phi = 2 * np.pi * (0.5 / 3 - 1.5 * x)
    rgb = [x + amp * (p0 * np.cos(phi) + p1 * np.sin(phi))
           for p0, p1 in ((-0.14861, 1.78277), (-0.29227, -0.90649), (1.97294, 0.0))]
    table = np.ones((n + 3, 4))
    table[:n, :3] = np.clip(np.stack(rgb, axis=1), 0, 1)
    table[n], table[n + 1], table[n + 2] = table[0], table[n - 1], (0, 0, 0, 0)  # under, over, bad (NaN)
    return table


def test_grounding_cubehelix_table_is_the_cubehelix_formula():
    """metrics/grounding.py takes WWbL's colormap from matplotlib; it equals the cubehelix definition bit for
    bit (the 256 colours plus under / over / bad), so the grounding boxes cannot move with it."""
    from wsolbench.metrics.grounding import cubehelix_lut

    np.testing.assert_array_equal(cubehelix_lut(), _cubehelix_by_formula())
