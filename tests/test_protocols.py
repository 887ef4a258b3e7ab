"""Scoring protocols: each recipe's rule on hand-computed cases, and how a run picks and records its protocol."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from wsolbench import protocols as P
from wsolbench.harness import HarnessError, RunSpec, run
from wsolbench.metrics import (DenseMIoU, FixedBoxAccuracy, PhrasePointing, PointingGame, ThresholdPolicy, box_iou,
                               contour_box, max_box_acc, prepare_map, prepare_map_linear, scale_boxes,
                               scale_boxes_clamped, union_box)


# ---- the registry ----------------------------------------------------------------------------------------
def test_the_eight_builtins_and_their_facts():
    assert list(P.PROTOCOLS) == ["wsolevaluation", "tedloc", "genpromp", "wwbl-cub", "wwbl-grounding",
                                 "wwbl-open", "mctformer-miou", "torchray-pointing"]
    ws, ted, gp = P.get_protocol("wsolevaluation"), P.get_protocol("tedloc"), P.get_protocol("genpromp")
    assert (ws.map_size, ws.interval, ws.threshold) == (224, 0.001, "oracle")
    assert (ted.map_size, ted.threshold) == (256, "oracle")
    assert (gp.map_size, gp.box_scorer, dict(gp.tau_by_dataset)) == (512, "fixed-box", {"cub": 0.23, "ilsvrc": 0.25})
    assert P.get_protocol("wwbl-cub").tau == 0.1 and P.get_protocol("wwbl-cub").gt_known_op == ">"
    assert P.get_protocol("mctformer-miou").split_for("voc") == ("train_aug", "train")
    assert P.get_protocol("mctformer-miou").split_for("coco") == ("train", "train")
    assert P.get_protocol("wsolevaluation").split_for("ilsvrc") == ("train", "test")
    assert P.get_protocol("torchray-pointing").tolerance == 15
    with pytest.raises(P.ProtocolError, match="unknown protocol 'gnepromp'.*genpromp"):
        P.get_protocol("gnepromp")
    lines = P.describe_protocols()
    assert len(lines) == 8 and all("Papers:" in line for line in lines)


def test_list_protocols_explains_each_in_a_line(capsys):
    from wsolbench.cli import main

    assert main(["list", "protocols"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(P.PROTOCOLS)


def test_fixed_tau_comes_from_the_method_config_else_the_dataset_and_overrides_are_marked():
    gp = P.get_protocol("genpromp")
    own = P.resolve(gp, {}, {"inference": {"cam_thr": 0.3}}, "cub")
    assert own.tau == 0.3 and own.label() == "genpromp*"  # the method's own cam_thr, not the paper's 0.23
    assert P.resolve(gp, {}, {"inference": {"cam_thr": 0.23}}, "cub").label() == "genpromp"
    assert P.resolve(gp, {}, {}, "ilsvrc").tau == 0.25  # no cam_thr in the config: the official value
    with pytest.raises(P.ProtocolError, match="harness.tau"):
        P.resolve(gp, {}, {}, "openimages")
    same = P.resolve(P.get_protocol("wsolevaluation"), {"cam_curve_interval": 0.001, "iou_thresholds": [30, 50, 70]})
    assert same.overridden == () and same.label() == "wsolevaluation"
    coarse = P.resolve(P.get_protocol("wsolevaluation"), {"cam_curve_interval": 0.01})
    assert coarse.interval == 0.01 and coarse.label() == "wsolevaluation*" and coarse.overridden == ("interval=0.01",)
    with pytest.raises(P.ProtocolError, match="fixes τ by its rule"):
        P.resolve(gp, {"threshold_policy": "oracle"}, {}, "cub")
    assert json.loads(json.dumps(coarse.as_record()))["interval"] == 0.01
    with pytest.raises(P.ProtocolError, match="has no such setting"):
        P.resolve(P.get_protocol("mctformer-miou"), {"eval_size": 224})
    with pytest.raises(P.ProtocolError, match="threshold_policy=fixed"):
        P.resolve(P.get_protocol("wsolevaluation"), {"tau": 0.3})
    fixed = P.resolve(P.get_protocol("wsolevaluation"), {"tau": 0.3, "threshold_policy": "fixed"})
    assert (fixed.threshold, fixed.tau, fixed.label()) == ("fixed", 0.3, "wsolevaluation*")


# ---- genpromp -------------------------------------------------------------------------------------------
def test_genpromp_box_rule_is_unclipped_and_ge_vs_gt_on_an_exact_half_iou():
    m = np.zeros((512, 512), np.float32)
    m[0:7, 0:9] = 1.0  # rows 0..6, cols 0..8 → boundingRect (0, 0, 9, 7) → box (0, 0, 9, 7)
    assert contour_box(m, 0.23) == (0, 0, 9, 7)
    edge = np.zeros((512, 512), np.float32)
    edge[100:200, 400:512] = 1.0  # touches the right border: x + w = 512, not clipped to 511
    assert contour_box(edge, 0.23) == (400, 100, 512, 200)
    assert contour_box(np.zeros((8, 8), np.float32), 0.23) == (0, 0, 1, 1)  # no contour
    gt = np.array([[0, 0, 9, 3]])  # 10×4 = 40 px inside the 10×8 = 80 px box: IoU exactly 0.5
    assert box_iou([[0, 0, 9, 7]], gt)[0, 0] == 0.5
    metric = FixedBoxAccuracy(0.23, gray="uint8", gt_known_op=">=", loc_op=">")
    metric.update([m], [gt], pred_top5=[[3, 1, 2, 4, 5]], labels=[3])
    res = metric.compute()
    assert res["gt_known_loc"] == 100.0  # GenPromp: GT-known counts IoU >= 0.5
    assert res["top1_loc"] == 0.0 and res["top5_loc"] == 0.0  # Top-1/5 need IoU > 0.5
    wwbl = FixedBoxAccuracy(0.1, gray="cubehelix", gt_known_op=">")
    wwbl.update([m], [gt])
    assert wwbl.compute()["gt_known_loc"] == 0.0 and "top1_loc" not in wwbl.compute()


def test_genpromp_box_at_512_differs_from_the_oracle_box_at_224():
    raw = np.zeros((16, 16), np.float32)
    raw[4:12, :] = 0.3  # a faint band across the image: above 0.23·max, below most of the sweep
    raw[6:10, 6:10] = 1.0  # the object
    gt_orig = np.array([[84, 84, 139, 139]])  # the peak's 4×4 cells of a 224×224 image (14 px each)
    gp_map = prepare_map_linear(raw, (512, 512))
    gp_gt = scale_boxes_clamped(gt_orig, (224, 224), 512)
    box = contour_box(gp_map, 0.23)
    assert box[0] == 0 and box[2] == 512  # the band's box: the full width, x + w not clipped
    fixed = FixedBoxAccuracy(0.23)
    fixed.update([gp_map], [gp_gt])
    assert fixed.compute()["gt_known_loc"] == 0.0
    oracle = max_box_acc([prepare_map(raw, (224, 224), dtype=np.float64)], [scale_boxes(gt_orig, (224, 224))],
                         cam_curve_interval=0.001)
    assert oracle["maxboxacc"] == 100.0 and oracle["best_tau_iou50"] > 0.23  # a τ above the band finds it


def test_genpromp_gt_scaling_divides_first_and_clamps():
    assert scale_boxes_clamped([[0, 0, 100, 50]], (100, 50), 512).tolist() == [[0, 0, 511, 511]]
    assert scale_boxes_clamped([[10, 20, 30, 40]], (100, 50), 512).tolist() == [[51, 204, 153, 409]]


# ---- wwbl-grounding ---------------------------------------------------------------------------------------
def test_a_point_between_two_boxes_hits_the_union_box_and_misses_any_box():
    boxes = np.array([[0, 0, 10, 10], [30, 0, 40, 10]])
    m = np.zeros((20, 50), np.float32)
    m[5, 20] = 1.0  # argmax (20, 5): between the two boxes
    any_box, union = PhrasePointing(), PhrasePointing()
    any_box.update([m], [boxes])
    union.update([m], [union_box(boxes)])
    assert any_box.compute()["pointing_acc"] == 0.0 and union.compute()["pointing_acc"] == 100.0
    assert union_box(boxes).tolist() == [[0, 0, 40, 10]]


# ---- mctformer-miou -------------------------------------------------------------------------------------
def test_early_stop_miou_differs_from_the_sweep_best():
    # five pixels of one image (class 0 present): scores and GT (1 = the class, 0 = background)
    v = np.array([[[0.3, 0.55, 0.65, 0.9, 0.68]]], np.float32)
    gt = np.array([[0, 1, 0, 1, 0]])
    m = DenseMIoU(2, [0.0, 0.5, 0.6, 0.7])
    m.update([v], [[0]], [gt])
    # t=0: all fg → class 2/5, bg 0 → 20;  t=0.5: class 2/4, bg 1/3 → 41.67;  t=0.6: class 1/4, bg 1/4 → 25
    # (MCTformer stops here: 41.67 at 0.5);  t=0.7: class 1/2, bg 3/4 → 62.5 (the full-sweep best)
    np.testing.assert_allclose(m.curves()["miou"], [20.0, 125 / 3, 25.0, 62.5], rtol=1e-9)
    early = m.compute(ThresholdPolicy("early-stop"))
    assert early["miou"] == pytest.approx(125 / 3) and early["bg_threshold"] == 0.5
    assert early["miou_sweep_best"] == pytest.approx(62.5) and early["sweep_best_bg_threshold"] == 0.7
    assert m.compute()["miou"] == pytest.approx(62.5)  # the oracle policy is the sweep best


# ---- runs ------------------------------------------------------------------------------------------------
def _spec(tmp_path, **kw):
    base = dict(method="center", dataset="synthetic-cub", limit=8, out=tmp_path / "runs", progress=False,
                overrides=("harness.batch_size=4",))
    base.update(kw)
    return RunSpec(**base)


def test_a_run_records_its_protocol_and_protocol_flags_choose_the_recipe(isolated_env):
    default = run(_spec(isolated_env))
    rec = default.record
    assert rec["protocol"]["name"] == "wsolevaluation" and rec["protocol"]["interval"] == 0.001
    assert rec["protocol_label"] == "wsolevaluation" and rec["synthetic"] is True
    assert rec["metric_options"]["v1"]["cam_curve_interval"] == 0.001 and rec["eval_size"] == 224
    ted = run(_spec(isolated_env, protocol="tedloc"))
    assert ted.record["eval_size"] == 256 and ted.record["protocol"]["name"] == "tedloc"
    gp = run(_spec(isolated_env, protocol="genpromp"))
    res = gp.results["default"]
    assert gp.record["protocol"]["tau"] == 0.23 and res["threshold_policy"] == "fixed(tau=0.23)"
    assert set(res["not_reported"]) == {"top1_loc", "top5_loc"}  # center has no classifier: named, not dropped
    coarse = run(_spec(isolated_env, overrides=("harness.batch_size=4", "harness.cam_curve_interval=0.01")))
    assert coarse.record["protocol_label"] == "wsolevaluation*"
    saved = json.loads((coarse.run_dir / "metrics.json").read_text())
    assert saved["protocol"]["overridden"] == ["interval=0.01"]
    with pytest.raises(HarnessError, match="protocol 'mctformer-miou' scores dense"):
        run(_spec(isolated_env, protocol="mctformer-miou"))


def test_dense_runs_report_the_early_stop_value_and_the_sweep_best(isolated_env):
    res = run(_spec(isolated_env, dataset="synthetic-voc", limit=6)).results["default"]
    assert res["threshold_policy"] == "early-stop"
    assert res["miou"] <= res["miou_sweep_best"] and res["bg_threshold"] <= res["sweep_best_bg_threshold"]


def _write_voc07(root, flags_from=None):
    """A three-image VOC 2007 folder: image 000001 a cat (easy) and a dog (difficult only), 000002 a cat."""
    voc = root / "VOCdevkit" / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / d).mkdir(parents=True)
    objects = {"000001": [("cat", (11, 11, 30, 30), 0), ("dog", (61, 41, 80, 60), 1)],
               "000002": [("cat", (51, 21, 70, 40), 0)], "000003": [("dog", (1, 1, 20, 20), 0)]}
    for image_id, objs in objects.items():
        cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), np.full((60, 100, 3), 128, np.uint8))
        xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                      f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objs)
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>100</width><height>60</height></size>"
            f"{xml}</annotation>")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000003\n")
    if flags_from is not None:  # an EBP-format flag file (id + 20 tab-separated 0/1 flags); 000001 absent
        lines = {"000002": ["0"] * 20, "000003": ["0"] * 20}
        lines["000003"][11] = "1"  # dog (index 11) of 000003 is in the difficult subset; 000002's cat is easy
        (root / "pointing_game_ebp_voc07_difficult.txt").write_text(
            "".join(f"{k}\t" + "\t".join(v) + "\n" for k, v in lines.items()))
    return root


def test_voc07_pointing_game_skips_all_difficult_classes_and_scores_the_difficult_subset(isolated_env):
    root = _write_voc07(isolated_env / "voc07", flags_from=True)
    res = run(_spec(isolated_env, dataset="voc07", data_root=root, limit=None)).record
    assert res["task"] == "pointing" and res["protocol"]["name"] == "torchray-pointing" and res["split"] == "test"
    r = res["results"]["default"]
    # centre point of a 100×60 image is (50, 30) (first argmax of the resized Gaussian: checked below);
    # 000001 cat box x 10..29: miss; 000001 dog: all boxes difficult → skipped; 000002 cat box x 50..69,
    # y 20..39: hit; 000003 dog x 0..19: miss → cat 1/2, dog 0/1 → mean over the 20 classes' accuracies
    assert r["pairs_skipped_all_difficult"] == 1 and r["pointing_pairs"] == 3
    assert r["pointing_game"] == pytest.approx(100 * (0.5 + 0.0) / 20)
    # difficult subset: 000001 is not in the flag file (kept), 000002's cat is easy (skipped), 000003's dog kept
    assert r["pairs_skipped_easy_in_difficult_subset"] == 1
    assert r["pointing_game_difficult"] == pytest.approx(0.0)


def test_voc07_without_the_flag_file_names_the_missing_subset(isolated_env):
    root = _write_voc07(isolated_env / "voc07")
    r = run(_spec(isolated_env, dataset="voc07", data_root=root, limit=None)).results["default"]
    assert r["pointing_game_difficult"] is None and "pointing_game_difficult" in r["not_reported"]


def test_an_empty_class_mask_is_a_miss_in_the_pointing_game_not_an_abort():
    m = np.zeros((20, 20), np.float32)
    m[10, 10] = 1.0
    game = PointingGame(2, allow_empty_gt=True)
    game.update([m, m], [np.zeros((20, 20), bool), np.array([[8, 8, 12, 12]])], [0, 1])
    assert (game.compute()["hits"], game.compute()["misses"]) == (1, 1)  # TorchRay: mask all False → miss
    with pytest.raises(Exception, match="empty GT"):
        PointingGame(2).update([m], [np.zeros((20, 20), bool)], [0])


def test_the_real_ebp_flag_file_parses(shared_fixtures):
    from wsolbench.datasets.voc import read_ebp_flags

    flags = read_ebp_flags(shared_fixtures / "pointing-game" / "ebp_voc07_difficult.txt", 20)
    assert len(flags) == 4952 and flags["000001"][11] and sum(flags["000003"]) == 2


def test_coco_pointing_game_through_the_protocol_flag(isolated_env):
    rec = run(_spec(isolated_env, dataset="synthetic-coco", protocol="torchray-pointing", limit=6)).record
    assert rec["task"] == "pointing" and rec["results"]["default"]["pointing_pairs"] > 0


def test_an_empty_openimages_foreground_counts_as_negatives_not_an_abort(isolated_env):
    from PIL import Image

    from wsolbench.registry import create_dataset

    ds = create_dataset("synthetic-openimages", split="test")
    root = isolated_env / "oi"
    shutil.copytree(ds.root, root)
    first = ds[0]
    for mask in first.mask_paths:  # the first image's foreground masks become empty
        target = root / mask.relative_to(ds.root)
        Image.fromarray(np.zeros_like(np.asarray(Image.open(target)))).save(target)
    res = run(_spec(isolated_env, dataset="synthetic-openimages", data_root=root, limit=4)).results["default"]
    assert res["empty_foreground_images"] == 1 and res["pxap"] > 0
