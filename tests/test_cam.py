"""CAM: hand-computed maps, output shapes/class order, training, save/load, resume, backbones, weights errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wsolbench.datasets.base import Sample, WSOLDataset
from wsolbench.datasets.synthetic import CLASS_NAMES, render_scene
from wsolbench.localizer import InputError
from wsolbench.methods.cam.loading import IMAGENET_WEIGHTS, imagenet_weights_file, load_imagenet
from wsolbench.methods.cam.method import CAM
from wsolbench.methods.cam.model import build_cam_net
from wsolbench.methods.cam.recipes import recipe_config, recipe_file
from wsolbench.weights import CATALOGUE, MissingWeightsError

SMALL = {"backbone": "tiny", "pretrained": None, "input_size": 64, "head_channels": 16,
         "tiny": {"widths": [8, 16], "strides": [2, 2], "convs_per_stage": 1},
         "train": {"epochs": 3, "batch_size": 8, "lr": 0.05, "lr_classifier_mult": 1, "num_workers": 0,
                   "resize_size": 72, "crop_size": 64, "lr_schedule": "constant", "seed": 0},
         "eval": {"batch_size": 5}}


class _Scenes(WSOLDataset):
    def __init__(self, root: Path, seeds, multi: bool = False, size: int = 64) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.split, self.multi_label = root, "train", multi
        self.class_names = list(CLASS_NAMES[:4])
        self.samples = []
        for s in seeds:
            sc = render_scene(s, size=(size, size), n_objects=2 if multi else 1, classes=range(4))
            path = root / f"{s}.png"
            Image.fromarray(sc.image).save(path)
            labels = tuple(sorted({o.class_index for o in sc.objects}))
            self.samples.append(Sample(image_id=str(s), image_path=path, size=(size, size), labels=labels,
                                       boxes=np.stack([o.box for o in sc.objects])))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return _Scenes(tmp_path_factory.mktemp("scenes"), range(16))


def _images(n=3, size=64):
    return [Image.fromarray(render_scene(100 + i, size=(size, size)).image) for i in range(n)]


def test_cam_equals_hand_computed_weighted_sum():
    """A classifier with known weights: features = the normalised pixels, fc = a fixed 3→4 matrix."""
    m = CAM(SMALL, class_names=list("abcd"))
    m.model.backbone = nn.Identity()
    m.model.head = nn.Sequential()
    m.model.fc = nn.Linear(3, 4)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, -1.0], [-1.0, 1.0, 3.0]])
    with torch.no_grad():
        m.model.fc.weight.copy_(w)
        m.model.fc.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    imgs = _images(2)
    out = m.localize(imgs, classes=[[2, 0], [3, 1]])
    x = m.preprocess(imgs)  # B×3×64×64
    for b, cls in enumerate([[2, 0], [3, 1]]):
        for k, c in enumerate(cls):
            expected = w[c, 0] * x[b, 0] + w[c, 1] * x[b, 1] + w[c, 2] * x[b, 2]
            torch.testing.assert_close(out.maps[b, k], expected, rtol=1e-5, atol=1e-5)
    # logits = fc(GAP(features)) with the bias
    torch.testing.assert_close(out.logits, x.mean((2, 3)) @ w.T + torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_single_label_shapes_and_class_order():
    m = CAM(SMALL, class_names=list("abcd"))
    imgs = _images(3)
    one = m.localize(imgs, classes=[1, 2, 3])
    assert one.maps.shape == (3, 1, 16, 16) and one.maps.dtype == torch.float32
    assert one.logits.shape == (3, 4) and one.classes == [[1], [2], [3]]
    two = m.localize(imgs, classes=[[3, 1], [0, 2], [2, 2]])
    assert two.maps.shape == (3, 2, 16, 16) and two.classes == [[3, 1], [0, 2], [2, 2]]
    torch.testing.assert_close(two.maps[0, 1], one.maps[0, 0])  # class 1 of image 0
    torch.testing.assert_close(two.maps[1, 1], one.maps[1, 0])  # class 2 of image 1
    pred = m.localize(imgs)  # single-label model: the predicted class's map
    assert pred.maps.shape == (3, 1, 16, 16)
    assert [c[0] for c in pred.classes] == pred.logits.argmax(1).tolist()
    by_class = m.localize(imgs, classes=[c[0] for c in pred.classes])
    torch.testing.assert_close(pred.maps, by_class.maps)
    with pytest.raises(InputError, match=r"must lie in 0\.\.3"):  # Localizer.class_queries, from the class names
        m.localize(imgs, classes=[0, 1, 7])
    unnamed = CAM({**SMALL, "num_classes": 4})  # no class names: the classifier's size bounds the indices
    with pytest.raises(InputError, match="out of range for a CAM model with 4 classes"):
        unnamed.localize(imgs, classes=[0, 1, 7])
    with pytest.raises(InputError, match="phrase"):
        m.localize(imgs, texts=["a star"] * 3)


def test_multi_label_returns_every_class_in_order():
    m = CAM({**SMALL, "multi_label": True}, class_names=list("abcd"))
    imgs = _images(2)
    out = m.localize(imgs)
    assert out.maps.shape == (2, 4, 16, 16) and out.classes == [[0, 1, 2, 3]] * 2
    for k in range(4):
        torch.testing.assert_close(out.maps[:, k], m.localize(imgs, classes=[k, k]).maps[:, 0])


def test_gradcam_variant_is_relu_cam_over_area():
    cam = CAM(SMALL, class_names=list("abcd"))
    grad = CAM({**SMALL, "variant": "gradcam"}, class_names=list("abcd"))
    grad.load_state_dict(cam.state_dict())
    imgs = _images(2)
    a = cam.localize(imgs, classes=[[1, 3], [0, 2]])
    b = grad.localize(imgs, classes=[[1, 3], [0, 2]])
    torch.testing.assert_close(b.maps, a.maps.clamp_min(0) / (16 * 16), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.logits, a.logits)
    early = CAM({**SMALL, "variant": "gradcam", "gradcam_layer": "backbone.2"}, class_names=list("abcd"))
    assert early.localize(imgs, classes=[0, 1]).maps.shape == (2, 1, 32, 32)


def test_training_lowers_loss_changes_weights_and_round_trips(scenes, tmp_path):
    m = CAM(SMALL)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    result = m.fit(scenes, out_dir=tmp_path / "run", progress=False)
    hist = result["history"]
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"], [h["loss"] for h in hist]
    assert result["loss"] == "ce" and m.class_names == scenes.class_names and not m.multi_label
    changed = [k for k, v in m.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "fc.weight" in changed and any(k.startswith("backbone.") for k in changed)
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "history.json").exists()

    imgs = _images(3)
    out = m.localize(imgs, classes=[0, 1, 2])
    m.save(tmp_path / "saved")
    loaded = CAM.load(tmp_path / "saved")
    again = loaded.localize(imgs, classes=[0, 1, 2])
    assert torch.equal(out.maps, again.maps) and torch.equal(out.logits, again.logits)
    assert loaded.class_names == m.class_names and loaded.num_classes == 4


def test_resume_gives_the_same_weights(scenes, tmp_path):
    full = CAM(SMALL)
    full.fit(scenes, out_dir=tmp_path / "full", progress=False)
    part = CAM({**SMALL, "train": {**SMALL["train"], "epochs": 2}})
    part.fit(scenes, out_dir=tmp_path / "part", progress=False)
    resumed = CAM(SMALL)
    resumed.fit(scenes, out_dir=tmp_path / "part", resume=True, progress=False)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_multi_label_training_uses_soft_margin(tmp_path):
    data = _Scenes(tmp_path / "multi", range(8), multi=True)
    assert any(len(s.labels) == 2 for s in data.samples)
    m = CAM({**SMALL, "train": {**SMALL["train"], "epochs": 1}})
    assert m.fit(data, progress=False)["loss"] == "mlsm" and m.multi_label
    out = m.localize(_images(2))
    assert out.maps.shape == (2, 4, 16, 16) and out.classes == [[0, 1, 2, 3]] * 2
    m.save(tmp_path / "saved")
    assert CAM.load(tmp_path / "saved").multi_label
    with pytest.raises(ValueError, match="multi-label"):
        CAM({**SMALL, "train": {**SMALL["train"], "loss": "ce"}}).fit(data, progress=False)


@pytest.mark.parametrize("backbone,large,side", [("vgg16", False, 4), ("vgg16", True, 8), ("resnet50", False, 4),
                                                 ("resnet50", True, 8), ("inceptionv3", True, 8),
                                                 ("inceptionv3", False, 4)])
def test_wsol_backbones_feature_resolution(backbone, large, side):
    """At 224 px these give 14×14 (28×28 with large_feature_map); at 64 px 4×4 (8×8)."""
    net = build_cam_net(CAM.complete_config({"backbone": backbone, "large_feature_map": large}), num_classes=3).eval()
    with torch.no_grad():
        logits, feats = net.forward_with_features(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 3) and feats.shape[-2:] == (side, side)
    assert feats.shape[1] == net.fc.in_features


def test_unknown_backbone_or_variant_is_refused():
    with pytest.raises(ValueError, match="unknown CAM backbone 'alexnet'; choose one of vgg16, resnet50"):
        CAM({**SMALL, "backbone": "alexnet"})
    with pytest.raises(ValueError, match="cam variant must be one of"):
        CAM({**SMALL, "variant": "scorecam"})


def test_imagenet_weights_load_and_missing_file_message(isolated_env):
    with pytest.raises(MissingWeightsError) as exc:
        imagenet_weights_file("resnet50", "imagenet")
    msg = str(exc.value)
    assert "resnet50-0676ba61.pth" in msg and str(isolated_env / "weights") in msg and "fetch" in msg
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        imagenet_weights_file("vgg16", str(isolated_env / "nope.pth"))

    from torchvision.models import resnet50

    tv = resnet50(weights=None)
    wdir = isolated_env / "weights"
    wdir.mkdir()
    torch.save(tv.state_dict(), wdir / "resnet50-0676ba61.pth")
    path = imagenet_weights_file("resnet50", "imagenet")
    assert path == wdir / "resnet50-0676ba61.pth"
    assert imagenet_weights_file("resnet50", str(wdir)) == path  # an explicit folder, read by weights.resolve
    assert imagenet_weights_file("resnet50", "resnet50-0676ba61.pth") == path  # a name under the weights dir
    assert set(CAM.pretrained) == set(IMAGENET_WEIGHTS.values()) <= set(CATALOGUE)  # what the class declares
    net = build_cam_net(CAM.complete_config({"backbone": "resnet50", "large_feature_map": True}), num_classes=2)
    keys = load_imagenet(net, "resnet50", path, classifier=False)
    assert "layer4.2.conv3.weight" in keys and "fc.weight" not in keys
    assert torch.equal(net.backbone.layer3[0].conv2.weight, tv.layer3[0].conv2.weight)
    assert net.backbone.layer3[0].conv2.stride == (1, 1)  # the stride change survives loading


def test_finetune_from_a_saved_cam_copies_backbone_not_classifier(scenes, tmp_path):
    """``finetune_from: <saved CAM dir>`` fine-tunes from another CAM: backbone and head are copied before
    training, the classifier (other classes here) is not; an incompatible backbone is a clear error."""
    source = CAM(SMALL, class_names=list("abcdef"))
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(1.0)
    source.save(tmp_path / "source")
    m = CAM({**SMALL, "finetune_from": str(tmp_path / "source"), "train": {**SMALL["train"], "epochs": 1, "lr": 0.0}})
    result = m.fit(scenes, progress=False)
    assert result["pretrained"] == str(tmp_path / "source" / "model.safetensors")
    src = source.state_dict()
    for k, v in m.state_dict().items():
        if k.startswith("backbone.") and k.endswith("weight"):
            assert torch.equal(v, src[k]), k
    assert m.state_dict()["fc.weight"].shape[0] == 4
    wide = CAM({**SMALL, "tiny": {**SMALL["tiny"], "widths": [8, 32]}, "finetune_from": str(tmp_path / "source")})
    with pytest.raises(ValueError, match="not a CAM with this backbone"):
        wide.fit(scenes, progress=False)


def test_a_saved_cam_is_never_taken_for_imagenet_weights(scenes, tmp_path):
    """A saved model under ``pretrained`` (even in a folder named like the keyword) is refused with the fix;
    both keys at once, or a finetune_from without a saved model, are refused too."""
    CAM(SMALL, class_names=list("abcd")).save(tmp_path / "imagenet")
    with pytest.raises(ValueError, match=r"is a saved wsolbench model.*set finetune_from="):
        imagenet_weights_file("vgg16", str(tmp_path / "imagenet"))
    both = CAM({**SMALL, "pretrained": "imagenet", "finetune_from": str(tmp_path / "imagenet")})
    with pytest.raises(ValueError, match="both set"):
        both.fit(scenes, progress=False)
    with pytest.raises(FileNotFoundError, match="finetune_from.*model.safetensors not found"):
        CAM({**SMALL, "finetune_from": str(tmp_path)}).fit(scenes, progress=False)


def test_ilsvrc_resnet50_keeps_the_imagenet_classifier(tmp_path):
    """``pretrained_classifier`` (the ILSVRC ResNet50 recipe) copies torchvision's fc; other label sets and
    other backbones are refused with the fix."""
    from torchvision.models import resnet50

    tv = resnet50(weights=None)
    torch.nn.init.normal_(tv.fc.weight)
    torch.save(tv.state_dict(), tmp_path / "r50.pth")
    net = build_cam_net(CAM.complete_config({"backbone": "resnet50"}), num_classes=1000)
    keys = load_imagenet(net, "resnet50", tmp_path / "r50.pth", classifier=True)
    assert "fc.weight" in keys and torch.equal(net.fc.weight, tv.fc.weight) and torch.equal(net.fc.bias, tv.fc.bias)
    with pytest.raises(ValueError, match="needs the 1000 ILSVRC classes"):
        load_imagenet(build_cam_net(CAM.complete_config({"backbone": "resnet50"}), num_classes=200), "resnet50",
                      tmp_path / "r50.pth", classifier=True)
    assert recipe_config("resnet50", "ilsvrc")["pretrained_classifier"] is True  # the ILSVRC ResNet50 recipe
    assert recipe_config("resnet50", "cub")["pretrained_classifier"] is False
    assert recipe_config("vgg16", "ilsvrc")["pretrained_classifier"] is False


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "inceptionv3"])
@pytest.mark.parametrize("dataset", ["cub", "ilsvrc", "openimages"])
def test_every_backbone_dataset_recipe_resolves_with_its_sources(backbone, dataset):
    """Each recipe file sets its backbone, states a source for each value, and sits between the dataset overlay
    and the user's --set."""
    cfg = recipe_config(backbone, dataset, ["train.seed=3"])
    assert cfg["backbone"] == backbone and cfg["train"]["seed"] == 3
    assert cfg["large_feature_map"] is (backbone != "vgg16")
    if dataset != "cub":  # the dataset overlay's schedule stays (10 epochs, decay every 3)
        assert cfg["train"]["epochs"] == 10 and cfg["train"]["lr_decay_every"] == 3
    lines = [ln for ln in recipe_file(backbone, dataset).read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#") and not ln.rstrip().endswith(":")]
    assert all("#" in ln for ln in lines), lines
    with pytest.raises(ValueError, match="no CAM recipe cam_tiny_cub.yaml"):
        recipe_file("tiny", "cub")
