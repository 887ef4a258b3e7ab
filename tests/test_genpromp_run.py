"""`wsolbench run --method genpromp --profile paper` end to end on a CUB-layout folder: micro components stand
in for Stable Diffusion, the official predictions-JSON classifier gives Top-1/Top-5 Loc, the run is scored
with the `genpromp` protocol at the config's cam_thr; without its predictions file the run stops."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("001.Black_footed_Albatross", "017.Cardinal", "200.Common_Yellowthroat")
MICRO = ("model.source=zoo", "model.zoo_scale=micro", "model.image_size=32",
         "inference.groups=[{places: [down, mid, up], levels: [1]}, {places: [up], levels: [0]}, "
         "{places: [down], levels: [0]}]", "inference.map_size=8", "train.augment.resize=32", "train.augment.crop=32",
         "train.stage1.epochs=1", "train.stage1.batch_size=2", "train.stage1.parallel_classes=3",
         "train.stage2.steps=2", "train.stage2.checkpoint_step=1", "train.stage2.batch_size=2",
         "train.stage2.grad_accum=1", "train.stage2.save_steps=1")


def write_cub(root: Path) -> list[str]:
    """The original CUB_200_2011 layout: per class two train images and one test image; returns test ids."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels, split, boxes, test_ids = [], [], [], [], []
    for k, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for j, is_train in enumerate((1, 1, 0)):
            n = len(images) + 1
            rel = f"{name}/img_{k}_{j}.jpg"
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "images" / rel)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {k + 1}")
            split.append(f"{n} {is_train}")
            boxes.append(f"{n} 4.0 6.0 20.0 30.0")
            if not is_train:
                test_ids.append(rel)
    for fname, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split), ("bounding_boxes.txt", boxes),
                         ("classes.txt", [f"{k + 1} {n}" for k, n in enumerate(CLASSES)])):
        (root / fname).write_text("\n".join(lines) + "\n")
    return test_ids


def test_paper_profile_run_reports_top1_top5_from_the_predictions_json(tmp_path, isolated_env):
    from wsolbench.cli import main

    root = tmp_path / "CUB_200_2011"
    test_ids = write_cub(root)
    # official key format (<class dir>/<file> without extension); class 1's image is predicted wrongly
    preds = {Path(i).with_suffix("").as_posix(): {"pred_scores": np.eye(3)[[0, 2, 2][k]].tolist()}
             for k, i in enumerate(test_ids)}
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    args = ["run", "--method", "genpromp", "--dataset", "cub", "--data-root", str(root), "--profile", "paper",
            "--out", str(tmp_path / "runs"), "--quiet"]
    sets = [*MICRO, "classifier.kind=json", f"classifier.predictions={tmp_path / 'preds.json'}", "inference.cam_thr=0.3"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    record = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert record["profile"] == "paper" and record["protocol"]["name"] == "genpromp"
    assert record["protocol"]["tau"] == 0.3  # the method config's inference.cam_thr reaches the protocol
    assert record["protocol_label"] == "genpromp*"  # not the paper's 0.23: never beside the paper's number
    res = record["results"]["default"]
    assert res["top1_cls"] == pytest.approx(200 / 3) and res["top5_cls"] == 100.0  # what the JSON says
    for key in ("gt_known_loc", "top1_loc", "top5_loc"):
        assert key in res, key
    assert res["top1_loc"] <= res["top5_loc"] <= res["gt_known_loc"]
    # a paper run whose predictions file is missing stops before training instead of dropping Top-1/Top-5
    missing = [*MICRO, "classifier.kind=json", f"classifier.predictions={tmp_path / 'absent.json'}"]
    assert main(args + ["--run-id", "missing"] + [a for s in missing for a in ("--set", s)]) != 0
    assert not (tmp_path / "runs" / "missing" / "metrics.json").exists()
