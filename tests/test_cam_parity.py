"""CAM parity with clovaai/wsolevaluation (../shared/fixtures/parity/wsolevaluation-cam, README there).

For VGG16, ResNet50 and InceptionV3, with and without the large feature map: a wsolevaluation-layout
checkpoint (``torch.save({'architecture', 'epoch', 'state_dict', 'optimizer'})``) is written from the fixture's
keys with the deterministic recipe, loaded through ``CAM.load_foreign`` (what ``wsolbench run --checkpoint FILE``
calls) with the paper profile's CUB config, and its logits, raw CAMs, prepared maps and box outcomes are
compared with the official code's, at the README's tolerances (box outcomes exact).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsolbench.config import load_method_config
from wsolbench.methods.cam.method import CAM
from wsolbench.methods.cam.recipes import recipe_config
from wsolbench.metrics import max_box_acc, prepare_map
from wsolbench.metrics.boxes import image_best_iou

TAGS = ["vgg16_lfm0", "vgg16_lfm1", "resnet50_lfm0", "resnet50_lfm1", "inception_v3_lfm0", "inception_v3_lfm1"]
BACKBONE = {"vgg16": "vgg16", "resnet50": "resnet50", "inception_v3": "inceptionv3"}


@pytest.fixture(scope="module")
def fixture_dir(parity_fixture) -> Path:
    return parity_fixture("wsolevaluation-cam")


@pytest.fixture(scope="module")
def recipe(parity_recipe):
    return parity_recipe


@pytest.fixture(scope="module")
def expected(fixture_dir):
    return dict(np.load(fixture_dir / "expected.npz"))


@pytest.fixture(scope="module")
def images(fixture_dir):
    meta = json.loads((fixture_dir / "inputs" / "images.json").read_text())
    return [Image.open(fixture_dir / "inputs" / "resized224" / m["file"]).convert("RGB") for m in meta]


def write_wsolevaluation_checkpoint(recipe, keys_json: Path, out: Path) -> Path:
    """What wsolevaluation's ``Trainer._torch_save_model`` writes, with the recipe's stand-in weights."""
    info = json.loads(keys_json.read_text())
    state = recipe.state_dict_for(info["keys"], seed=0, gain=math.sqrt(2))
    for name, shape, dtype, value in info["integer_buffers"]:
        state[name] = torch.full(shape, value, dtype=getattr(torch, dtype))
    arch = info["checkpoint_dict"]["architecture"]
    torch.save({"architecture": arch, "epoch": 0, "state_dict": state, "optimizer": {}}, out)
    return out


def load(recipe, fixture_dir, tag, tmp_path, **overrides) -> CAM:
    arch, lfm = tag.rsplit("_lfm", 1)
    ckpt = write_wsolevaluation_checkpoint(recipe, fixture_dir / tag / "keys.json", tmp_path / f"{tag}.pth.tar")
    sets = [f"large_feature_map={'true' if lfm == '1' else 'false'}"] + [f"{k}={v}" for k, v in overrides.items()]
    cfg = recipe_config(BACKBONE[arch], "cub", sets)  # the paper profile's CUB recipe of this backbone
    return CAM.load_foreign(ckpt, cfg, class_names=[f"class{i}" for i in range(200)])


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


@pytest.mark.parametrize("tag", TAGS)
def test_wsolevaluation_cam_parity(tag, recipe, fixture_dir, expected, images, tmp_path):
    method = load(recipe, fixture_dir, tag, tmp_path)
    labels = [int(v) for v in expected["labels"]]
    out = method.localize(images, classes=labels)

    ref_logits = expected[f"{tag}/logits"]
    tol = 1e-4 * max(1.0, float(np.abs(ref_logits).max()))
    np.testing.assert_allclose(out.logits.numpy(), ref_logits, rtol=0, atol=tol)

    ref_cam = expected[f"{tag}/cam_raw"]
    assert tuple(out.maps.shape) == (3, 1) + ref_cam.shape[1:]
    for i in range(3):  # the reference scales VGG/ResNet CAMs by 1/D and adds Inception's bias: min-max removes both
        np.testing.assert_allclose(_minmax(out.maps[i, 0].numpy()), _minmax(ref_cam[i]), rtol=0, atol=1e-4)

    prepared = np.stack([prepare_map(out.maps[i, 0], (224, 224)) for i in range(3)])
    np.testing.assert_allclose(prepared, expected[f"{tag}/scoremap"], rtol=0, atol=1e-4)

    gt = expected["gt_boxes_224"]
    boxes = [gt[expected["gt_boxes_image_index"] == i] for i in range(3)]
    deltas = expected["iou_thresholds"] / 100.0
    for version, multi in (("v1", False), ("v2", True)):
        correct = np.stack([image_best_iou(prepared[i].astype(np.float64), boxes[i], expected["taus"], multi,
                                           deltas)[None, :] >= deltas[:, None] for i in range(3)])
        np.testing.assert_array_equal(correct, expected[f"{tag}/box_correct_{version}"])
        result = max_box_acc(prepared, boxes, multi_contour=multi)
        got = [result[f"maxboxacc_iou{d}"] for d in expected["iou_thresholds"]]
        np.testing.assert_allclose(got, expected[f"{tag}/maxboxacc_{version}"], rtol=0, atol=1e-9)


def test_torchvision_input_rescale_breaks_inception_parity(recipe, fixture_dir, expected, images, tmp_path):
    """The [-1, 1] rescale (``inception_input: pm1``) is not what wsolevaluation feeds: its maps differ."""
    method = load(recipe, fixture_dir, "inception_v3_lfm0", tmp_path, inception_input="pm1")
    out = method.localize(images, classes=[int(v) for v in expected["labels"]])
    prepared = np.stack([prepare_map(out.maps[i, 0], (224, 224)) for i in range(3)])
    assert np.abs(prepared - expected["inception_v3_lfm0/scoremap"]).max() > 0.1


def test_wrong_feature_map_size_or_architecture_is_refused(recipe, fixture_dir, tmp_path):
    ckpt = write_wsolevaluation_checkpoint(recipe, fixture_dir / "vgg16_lfm1" / "keys.json", tmp_path / "v.pth.tar")
    names = [f"c{i}" for i in range(200)]
    cfg = load_method_config("cam", "paper", "cub", ["backbone=vgg16", "large_feature_map=false"])
    with pytest.raises(ValueError, match=r"v\.pth\.tar \(read as a wsolevaluation vgg16 CAM with "
                                         r"large_feature_map=false\): 6 of the model's"):
        CAM.load_foreign(ckpt, cfg, class_names=names)
    with pytest.raises(ValueError, match="backbone=vgg16"):
        CAM.load_foreign(ckpt, load_method_config("cam", "paper", "cub", ["backbone=resnet50"]), class_names=names)
    with pytest.raises(ValueError, match="classifies 200 classes but the dataset has 3"):
        CAM.load_foreign(ckpt, load_method_config("cam", "paper", "cub", ["large_feature_map=true"]),
                         class_names=["a", "b", "c"])


def test_checkpoint_missing_a_tensor_is_refused(recipe, fixture_dir, tmp_path):
    path = write_wsolevaluation_checkpoint(recipe, fixture_dir / "resnet50_lfm0" / "keys.json", tmp_path / "r.pth")
    obj = torch.load(path, weights_only=True)
    del obj["state_dict"]["fc.weight"]
    torch.save(obj, path)
    cfg = load_method_config("cam", "paper", "cub", ["backbone=resnet50"])
    with pytest.raises(ValueError, match=r"1 of the model's 320 tensors are not in the file \(fc\.weight\)"):
        CAM.load_foreign(path, cfg)
    partial = load_method_config("cam", "paper", "cub", ["backbone=resnet50", "load.partial=[fc.weight]"])
    method = CAM.load_foreign(path, partial)  # a partial load only when named, and recorded
    assert method.load_report.missing == ["fc.weight"] and method.load_report.layout == "wsolevaluation-resnet50"


def test_cli_checkpoint_file_evaluates_a_wsolevaluation_cam(recipe, fixture_dir, isolated_env):
    """``wsolbench run --checkpoint FILE`` runs a wsolevaluation checkpoint through the harness (here a VGG16 CAM
    with a 10-class classifier for the synthetic CUB) and records what was loaded."""
    from wsolbench.harness import RunSpec, run

    info = json.loads((fixture_dir / "vgg16_lfm0" / "keys.json").read_text())
    keys = [[n, [10] + s[1:] if n.startswith("fc.") else s] for n, s in info["keys"]]
    state = recipe.state_dict_for(keys, seed=1, gain=math.sqrt(2))
    torch.save({"architecture": "vgg16", "epoch": 3, "state_dict": state, "optimizer": {}}, isolated_env / "b.pth.tar")
    result = run(RunSpec(method="cam", dataset="synthetic-cub", profile="paper", limit=4, out=isolated_env / "runs",
                         checkpoint=isolated_env / "b.pth.tar", progress=False,
                         overrides=("harness.batch_size=4", "input_size=64")))
    loaded = result.record["checkpoint_load"]
    assert loaded["layout"] == "wsolevaluation-vgg16" and len(loaded["loaded"]) == 30
    assert not loaded["missing"] and not loaded["unexpected"] and result.record["n_images"] == 4
