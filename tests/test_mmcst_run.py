"""`wsolbench run --method mmcst --profile paper` end to end on VOC-format data: trained on train_aug, scored on
train at each image's own size under mctformer-miou; and an MCTformer checkpoint file given to --checkpoint."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# micro components in the paper profile's code path (random timm ViT and open_clip CLIP, no downloads)
MICRO = (
    "model.backbone.name=vit_tiny_patch16_224", "model.backbone.pretrained=false",
    "model.backbone.kwargs={patch_size: 16, embed_dim: 24, depth: 2, num_heads: 2}",
    "model.clip.pretrained=null",
    "model.clip.kwargs={embed_dim: 16, vision_cfg: {image_size: 16, layers: 1, width: 16, head_width: 8, "
    "patch_size: 8}, text_cfg: {context_length: 12, vocab_size: 49408, width: 16, heads: 2, layers: 1}}",
    "model.input_size=64", "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=1",
    "train.num_workers=0", "infer.attn_layers=1",
)


def test_paper_profile_trains_on_train_aug_and_scores_train_at_native_size(isolated_env, monkeypatch):
    from wsolbench.datasets.synthetic import make_synthetic
    from wsolbench.harness import RunSpec, run
    from wsolbench.methods.mmcst import method as mmcst

    root = make_synthetic("voc", isolated_env / "voc", counts={"train": 5, "val": 2, "aug": 3, "test": 1})
    fitted, passes = [], []
    fit = mmcst.MMCST.fit
    monkeypatch.setattr(mmcst.MMCST, "fit", lambda self, data, **kw: (fitted.append(data), fit(self, data, **kw))[1])
    inputs = mmcst.mctformer_inputs
    monkeypatch.setattr(mmcst, "mctformer_inputs", lambda img, *a: (passes.append(img.size), inputs(img, *a))[1])
    res = run(RunSpec(method="mmcst", dataset="voc", profile="paper", data_root=root, out=isolated_env / "runs",
                      progress=False, overrides=MICRO))
    record = json.loads((res.run_dir / "metrics.json").read_text())
    assert [d.split for d in fitted] == ["train_aug"] and len(fitted[0]) == 8  # train (5) + aug (3)
    assert record["train_split"] == "train_aug" and record["split"] == "train" and record["n_images"] == 5
    assert record["protocol"]["name"] == "mctformer-miou" and record["protocol"]["map_size"] is None
    assert record["checkpoint_load"] is None
    # every scored image went through MCTformer's passes at its own size (synthetic sizes vary, 112-176 px)
    from wsolbench.datasets.voc import VOC2012

    sizes = [s.load_image().size for s in VOC2012(root, "train")]
    assert passes == sizes and len(set(sizes)) > 1
    got = record["results"]["default"]
    assert 0 < got["miou"] <= got["miou_sweep_best"] and got["bg_threshold"] is not None


def test_checkpoint_file_through_the_harness(shared_fixtures, isolated_env, tmp_path):
    """`wsolbench run --method mmcst --dataset voc --profile paper --checkpoint mctformer_v1.pth` on the parity
    fixture: the run loads the file exactly, records what it loaded and scores the official mIoU."""
    import importlib.util

    import torch

    from wsolbench.harness import RunSpec, run

    fx = shared_fixtures / "parity" / "mctformer"
    if not (fx / "expected.npz").is_file():
        pytest.skip("mctformer parity fixture absent")
    spec = importlib.util.spec_from_file_location("parity_recipe", fx.parent / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    keys = json.loads((fx / "keys.json").read_text())
    ckpt = tmp_path / "mctformer_v1.pth"
    torch.save({"model": recipe.state_dict_for(keys["v1"], keys["seed"], keys["gain"])}, ckpt)
    # the fixture's images as a VOC 2012 folder (JPEGImages holds the PNG bytes, as the README's run did)
    labels = json.loads((fx / "inputs" / "labels.json").read_text())["images"]
    voc = isolated_env / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for name in labels:
        shutil.copy(fx / "inputs" / f"{name}.png", voc / "JPEGImages" / f"{name}.jpg")
        shutil.copy(fx / "inputs" / f"{name}_label.png", voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{n}\n" for n in labels))
    np.save(voc / "cls_labels.npy", {n: np.asarray(v["labels"], np.float32) for n, v in labels.items()})
    with np.load(fx / "expected.npz") as z:
        ts, curve = z["thresholds"], z["v1/miou"]
    res = run(RunSpec(method="mmcst", dataset="voc", split="train", profile="paper", data_root=isolated_env / "voc",
                      checkpoint=ckpt, out=isolated_env / "runs", progress=False,
                      overrides=("model.backbone.name=deit-s16", "model.text_tokens=false", "model.class_patch=false",
                                 "infer.map=attn", f"harness.miou_bg_thresholds=[{ts[0]}, {ts[-1] + 0.05}, 0.1]")))
    record = json.loads((res.run_dir / "metrics.json").read_text())
    load = record["checkpoint_load"]
    assert load["layout"] == "mctformer-v1" and len(load["loaded"]) == 150 and load["missing"] == []
    assert sorted(load["ignored"]) == ["head.bias", "head.weight"]
    falls = np.flatnonzero(np.diff(curve) <= 0)
    first_peak = curve[falls[0]] if falls.size else curve[-1]  # MCTformer stops at the first t not improving
    got = record["results"]["default"]
    assert record["protocol"]["threshold"] == "early-stop"
    assert abs(got["miou"] - float(first_peak)) <= 0.05 and abs(got["miou_sweep_best"] - float(curve.max())) <= 0.05


def test_checkpoint_file_for_a_method_that_cannot_read_one(isolated_env, tmp_path):
    from wsolbench.datasets.synthetic import make_synthetic
    from wsolbench.harness import HarnessError, RunSpec, run

    root = make_synthetic("voc", isolated_env / "voc", counts={"train": 2, "val": 1, "aug": 1, "test": 1})
    f = tmp_path / "weights.pth"
    f.write_bytes(b"not read")
    with pytest.raises(HarnessError, match=r"weights\.pth: method 'center' cannot read foreign checkpoint files"):
        run(RunSpec(method="center", dataset="voc", data_root=root, checkpoint=f, out=isolated_env / "runs",
                    progress=False))
