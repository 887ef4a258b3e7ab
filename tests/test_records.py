"""Per-image records (wsolbench.records): fields, agreement with the metric states, resume, stored maps."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from wsolbench import records
from wsolbench.harness import RunSpec, run
from wsolbench.metrics import PxAP, ThresholdPolicy, box_iou
from wsolbench.metrics.boxes import image_best_iou
from wsolbench.metrics.base import threshold_grid


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A 20-image `random` run on synthetic-cub (boxes + masks), batches of 8 (the last one partial)."""
    tmp = tmp_path_factory.mktemp("records")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("WSOLBENCH_DATA", "data"), ("WSOLBENCH_CACHE", "cache"), ("WSOLBENCH_WEIGHTS", "w"),
                         ("WSOLBENCH_CONFIG", "config.yaml")):
            mp.setenv(var, str(tmp / sub))
        spec = RunSpec(method="random", dataset="synthetic-cub", profile="tiny", limit=20, out=tmp / "runs",
                       progress=False, overrides=("harness.batch_size=8",))
        res = run(spec)
        yield spec, res


def test_records_hold_the_fields_and_their_hits_are_the_metric_counts(random_run):
    _, res = random_run
    recs = records.read(res.run_dir)
    assert len(recs) == 20 == res.record["n_images"]
    r0 = recs[0]
    assert {"image_id", "label", "path", "gt_boxes", "variants"} <= set(r0)
    v = r0["variants"]["default"]
    assert {"health", "point", "point_hit", "v1", "v2", "piou"} <= set(v)
    assert set(v["health"]) == {"nonfinite", "constant"}
    assert {"tau", "iou", "hit", "boxes", "best_iou"} <= set(v["v1"])
    results = res.record["results"]["default"]
    n = len(recs)
    for rule, prefix in (("v1", "v1_"), ("v2", "v2_")):
        for d in ("30", "50", "70"):
            hits = sum(r["variants"]["default"][rule]["hit"][d] for r in recs)
            assert hits == round(results[f"{prefix}maxboxacc_iou{d}"] * n / 100)
            taus = {r["variants"]["default"][rule]["tau"][d] for r in recs}
            assert taus == {results[f"{prefix}best_tau_iou{d}"]}
    hits50 = sum(r["variants"]["default"]["v1"]["hit"]["50"] for r in recs)
    assert hits50 == round(results["maxboxacc"] * n / 100)
    assert 0 < hits50 < n  # random maps: some images hit, some miss (the check could fail both ways)


def test_records_boxes_and_iou_at_the_chosen_tau_match_the_metric_engine(random_run):
    """The stored 8-bit map gives back, at the chosen τ, the IoU the metric's own engine computes."""
    _, res = random_run
    grid = threshold_grid(res.record["metric_options"]["v1"]["cam_curve_interval"])
    for rec in records.read(res.run_dir)[:6]:
        u = records.load_map(records.map_path(res.run_dir / records.MAPS_DIR, "default", rec["image_id"]))
        assert u.dtype == np.uint8 and u.shape == (224, 224)
        gt = np.asarray(rec["gt_boxes"])
        for rule, multi in (("v1", False), ("v2", True)):
            out = rec["variants"]["default"][rule]
            tau = out["tau"]["50"]
            curve = image_best_iou((u + 0.5) / 255.0, gt, grid, multi)  # re-quantises to the same u
            k = int(np.argmin(np.abs(grid - tau)))
            assert out["best_iou"] == pytest.approx(curve[k], abs=1e-6)
            assert box_iou(out["boxes"], gt).max() == pytest.approx(out["best_iou"], abs=1e-6)


def test_boxes_at_is_the_metric_rule_on_blob_maps():
    """boxes_at at every τ of the grid gives exactly the metric engine's per-τ best IoU (v1 and V2)."""
    rng = np.random.default_rng(3)
    grid = threshold_grid(0.05)
    for _ in range(4):
        m = cv2.GaussianBlur(rng.random((64, 64)), (0, 0), 4)
        m = (m - m.min()) / (m.max() - m.min())
        gt = np.array([[10, 12, 40, 50], [30, 5, 60, 30]])
        u = records.quantize(m)
        for multi in (False, True):
            ref = image_best_iou(m, gt, grid, multi)
            ours = [box_iou(records.boxes_at(u, t, multi), gt).max() for t in grid]
            np.testing.assert_array_equal(ours, ref)


def test_image_piou_is_pxap_on_the_image_alone():
    rng = np.random.default_rng(0)
    m = rng.random((32, 32))
    fg = np.zeros((32, 32), bool)
    fg[8:20, 6:24] = True
    px = PxAP(0.01)
    px.update([m], [fg])
    expect = px.compute(ThresholdPolicy.fixed({"piou": 0.37}))["piou"]
    hist = records._encode_hist(PxAP(0.01).image_histograms([m], [fg])[0])
    assert records._image_piou(hist, px, 0.37) == pytest.approx(expect, abs=1e-4)


def test_each_batchs_record_histograms_add_up_to_its_pxap_state(random_run):
    """The records carry the histograms the metric binned (computed once): per shard, their sum is the state."""
    import base64
    import zlib

    _, res = random_run
    shards = sorted((res.run_dir / "cache").glob("batch-*.npz"))
    assert len(shards) == 3
    for path in shards:
        with np.load(path) as z:
            recs = json.loads(z["__meta__"].tobytes())["records"]
            state = np.stack([z["default/pxap/fg_hist"], z["default/pxap/bg_hist"]])
        hists = [np.frombuffer(zlib.decompress(base64.b64decode(r["variants"]["default"]["pxap_hist"])), "<i4")
                 for r in recs]
        assert np.array_equal(np.sum(hists, axis=0).reshape(2, -1), state) and state.sum() == len(recs) * 224 * 224


def test_resume_keeps_the_records(random_run):
    spec, res = random_run
    before = (res.run_dir / records.PER_IMAGE).read_text()
    from dataclasses import replace

    again = run(replace(spec, resume=True))
    assert (again.run_dir / records.PER_IMAGE).read_text() == before
    tau = json.loads((again.run_dir / records.CURVES).read_text())["default"]["v1"]["tau"]
    np.testing.assert_allclose(tau, threshold_grid(res.record["metric_options"]["v1"]["cam_curve_interval"]), atol=1e-9)


def test_worst_sorts_by_iou_at_the_chosen_tau(random_run):
    _, res = random_run
    recs = records.read(res.run_dir)
    bad = records.worst(recs, 5)
    ious = [r["variants"]["default"]["v1"]["best_iou"] for r in bad]
    assert ious == sorted(ious) and ious[-1] <= min(
        r["variants"]["default"]["v1"]["best_iou"] for r in recs if r not in bad)


def test_map_path_keeps_id_folders_and_refuses_escapes(tmp_path):
    p = records.map_path(tmp_path, "default", "001.star/a b.jpg")
    assert p == tmp_path / "default" / "001.star" / "a_b.jpg.png"
    assert records.map_path(tmp_path, "v", "../../etc/x", "_c3") == tmp_path / "v" / "etc" / "x_c3.png"


def test_fixed_box_outcome_is_the_fixed_tau_metric():
    """A fixed-τ box protocol (GenPromp's uint8 rule): the record's box and hit from the stored 8-bit map are
    the metric's, image by image (hits and misses both occur)."""
    from wsolbench.metrics import FixedBoxAccuracy
    from wsolbench.metrics.fixed_box import contour_box

    rng = np.random.default_rng(5)
    outcomes = []
    yy, xx = np.mgrid[:64, :64]
    for k in range(12):
        x0, y0 = rng.integers(0, 40, 2)
        gt = np.array([[x0, y0, x0 + 20, y0 + 20]])
        cx, cy = (x0 + 10, y0 + 10) if k % 2 else rng.integers(0, 64, 2)  # a blob on the object, or anywhere
        m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 7.0 ** 2)) + 0.3 * cv2.GaussianBlur(
            rng.random((64, 64)), (0, 0), 3)
        m = (m - m.min()) / (m.max() - m.min())
        metric = FixedBoxAccuracy(0.23, gray="uint8", gt_known_op=">=")
        metric.update([m], [gt])
        out = records.fixed_box_outcome(records.quantize(m), gt, metric)
        assert out["boxes"] == [list(contour_box(m, 0.23, "uint8"))]
        assert out["hit"]["50"] == bool(metric.compute()["gt_known_loc"])
        outcomes.append(out["hit"]["50"])
    assert any(outcomes) and not all(outcomes)


def test_pointing_records_are_the_pointing_game_per_class(random_run):
    """The TorchRay pointing game (synthetic VOC): per class, the records' hits are the metric's counts."""
    from dataclasses import replace

    from wsolbench.registry import create_dataset
    from wsolbench.viz import pointing_per_class

    spec, _ = random_run
    res = run(replace(spec, dataset="synthetic-voc", protocol="torchray-pointing", limit=6))
    recs = records.read(res.run_dir)
    assert len(recs) == 6 and all(set(r["variants"]["default"]["points"]) == {str(c) for c in r["classes"]}
                                  for r in recs)
    per_class = pointing_per_class(recs)
    result = res.record["results"]["default"]
    assert sum(len(r["classes"]) for r in recs) == result["pointing_pairs"]
    assert len(per_class) == result["pointing_classes_evaluated"]
    n_classes = create_dataset("synthetic-voc", split="test").num_classes  # TorchRay: unseen classes count 0
    assert sum(per_class.values()) / n_classes == pytest.approx(result["pointing_game"])


def test_phrase_records_are_the_phrase_pointing_counts(random_run):
    """Phrase grounding (synthetic Flickr30k): one record per (image, entity) whose hits are the metric's."""
    from dataclasses import replace

    spec, _ = random_run
    res = run(replace(spec, dataset="synthetic-flickr30k", limit=2))
    recs = records.read(res.run_dir)
    assert recs and all({"image_id", "entity", "phrases", "gt_boxes"} <= set(r) for r in recs)
    v = [r["variants"]["default"] for r in recs]
    assert all({"health", "point", "point_hit", "boxes"} <= set(x) for x in v)
    hits = sum(x["point_hit"] for x in v)
    assert 100 * hits / len(recs) == pytest.approx(res.record["results"]["default"]["pointing_game"])


def test_a_map_png_is_lossless_and_sub_filtered(tmp_path):
    """save_map: the 8-bit map reads back exactly; every row uses the Sub filter (one fixed filter encodes in
    half the time of libpng's per-row choice among all five, for smaller files on smooth maps)."""
    import struct
    import zlib

    rng = np.random.default_rng(0)
    u8 = cv2.GaussianBlur(rng.integers(0, 256, (37, 53), dtype=np.uint8), (9, 9), 3)
    path = tmp_path / "m.png"
    records.save_map(path, u8)
    assert np.array_equal(records.load_map(path), u8)
    data, at, idat = path.read_bytes(), 8, b""
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        idat += data[at + 8:at + 8 + length] if kind == b"IDAT" else b""
        at += 12 + length
    raw = zlib.decompress(idat)
    assert [raw[r * (53 + 1)] for r in range(37)] == [1] * 37  # filter type byte of each row: 1 = Sub
