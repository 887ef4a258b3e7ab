"""WWbL: networks, official checkpoint keys, losses, the open-world pipeline, training and persistence.

Everything runs on the micro zoo (random-init open_clip CLIP and VGG-like timm CNN) or hand-made modules.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from wsolbench.classnames import class_text  # noqa: E402
from wsolbench.datasets.base import Phrase, Sample, WSOLDataset  # noqa: E402

wwbl = pytest.importorskip("wsolbench.methods.wwbl.method")
from wsolbench.config import merge, method_schema  # noqa: E402
from wsolbench.methods.wwbl import data, losses, model, open_world  # noqa: E402
from wsolbench.methods.wwbl.clip_teacher import build_clip  # noqa: E402


# ------------------------------------------------------------------------------------------------ helpers
def micro_config(mode: str = "grounding", **over) -> dict:
    cfg = {
        "mode": mode, "input_size": 32, "class_text": "{class}",
        "clip": {"source": "zoo-random", "scale": "micro", "mean": None, "std": None},
        "encoder": {"source": "zoo-random", "scale": "micro", "cut": 23, "probe_size": 32},
        "decoder": {"mid_channels": 8},
        "unet": {"backbone": "zoo-vgg-random", "scale": "micro", "probe_size": 32},
        "captioner": {"source": "zoo-random", "scale": "micro", "num_beams": 1, "min_length": 0,
                      "max_length": 8, "batch_size": 16},
        "relevancy": {"mode": "last"},
        "train": {"epochs": 2, "batch_size": 2, "lr": 0.01, "size": 32, "resize": None, "crop": None,
                  "max_steps_per_epoch": 2, "val_limit": 2, "num_workers": 0},
        "open": {"proposal_size": 48, "selective_search": "single", "max_proposals": 12},
    }
    return wwbl.WWbL.complete_config(merge(cfg, over, schema=None))  # the schema YAML fills the rest


def scene(colour=(220, 30, 30), box=(8, 12, 30, 34), size=(48, 40)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = (40, 160, 60)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = colour
    return Image.fromarray(arr)


def colour_captioner(crops):
    """Names a crop by its dominant colour; near-duplicate wordings for the same colour."""
    out = []
    for i, c in enumerate(crops):
        a = np.asarray(c, np.float32)
        red = (a[..., 0] > 150) & (a[..., 1] < 100)
        if red.mean() > 0.3:
            out.append("a red square" if i % 2 else "the red square")  # cosine 0.93 in the micro CLIP
        else:
            out.append("green grass")
    return out


@pytest.fixture(scope="module")
def method():
    return wwbl.WWbL(micro_config(), class_names=["star", "heart"])


# ------------------------------------------------------------------------------------------------ networks
def test_text_conditioned_g_range_and_shapes():
    from wsolbench.zoo import create_backbone

    feats = create_backbone("vgg", "micro").features[:23]
    g = model.TextConditionedG(feats, feat_channels=16, text_dim=32, mid_channels=8, head_activation="relu").eval()
    x = torch.randn(3, 3, 40, 56)
    z = F.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        m = g(x, z)
        m2 = g(x, z, out_size=(20, 24))
    assert m.shape == (3, 1, 40, 56) and m2.shape == (3, 1, 20, 24)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    g.train()  # fresh BatchNorm statistics: in eval mode the 1-channel head of a random g can be all-dead
    with torch.no_grad():
        a = g(x[:2], z[:2])
        b = g(x[:2], z[[1, 0]])
    assert not torch.allclose(a[0], b[0])  # the text changes the map
    with pytest.raises(ValueError):
        g(x, z[:2])


def test_unet_g_range_and_shapes():
    from wsolbench.zoo import create_backbone

    enc = model.SequentialTaps(create_backbone("vgg", "micro").features)
    assert enc.taps == [3, 4, 8, 15, 22, 29]  # relu1_2, pool1, relu2_2, relu3_3, relu4_3, relu5_3 (VGG16Net)
    g = model.UNetG(enc, model.feature_channels(enc, 32)).eval()
    assert len(g.ups) == 5
    with torch.no_grad():
        m = g(torch.randn(2, 3, 64, 96))
    assert m.shape == (2, 1, 64, 96) and float(m.min()) >= 0 and float(m.max()) <= 1


def test_unet_over_vgg16_is_the_official_skip_decoder():
    """base.SkipDecoder over VGG16Net's taps: bottleneck 512→512, then up1..up5 with (in, out) channels
    (512+512, 512), (512+256, 256), (256+128, 128), (128+64, 64) without upsampling, (64+64, 1) raw."""
    g = model.build_g(micro_config("wsol", unet={"backbone": "vgg16", "probe_size": 32}), 32)
    assert g.E.taps == [3, 4, 8, 15, 22, 29]
    assert (g.bottleneck.conv1.in_channels, g.bottleneck.conv1.out_channels) == (512, 512)
    assert [(u.conv1.in_channels, u.conv1.out_channels) for u in g.ups] == \
        [(1024, 512), (768, 256), (384, 128), (192, 64), (128, 1)]
    assert not g.ups[-1].act and all(u.act for u in g.ups[:-1])


OFFICIAL_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)


def _official_like_g():
    return model.TextConditionedG(model.vgg16_features()[:23], 512, text_dim=512, mid_channels=512,
                                  head_activation="relu")


def test_official_state_dict_keys_load(tmp_path):
    g = _official_like_g()
    keys = set(g.state_dict())
    expected = {f"E.Org_model.{i}.{p}" for i in OFFICIAL_CONVS for p in ("weight", "bias")}
    for blk in ("bottleneck", "up0", "up1"):
        for name in ("conv1", "conv2"):
            expected |= {f"D.{blk}.{name}.weight", f"D.{blk}.{name}.bias"}
        for name in ("BN1", "BN2"):
            expected |= {f"D.{blk}.{name}.{p}" for p in ("weight", "bias", "running_mean", "running_var",
                                                          "num_batches_tracked")}
    assert keys == expected
    assert tuple(g.state_dict()["D.up1.conv1.weight"].shape) == (1, 512, 3, 3)
    assert tuple(g.state_dict()["D.up1.conv2.weight"].shape) == (1, 1, 3, 3)
    # an "official" DataParallel state dict: module.-prefixed, loaded safely and strictly
    torch.manual_seed(1)
    official = {f"module.{k}": (torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone())
                for k, v in g.state_dict().items()}
    path = tmp_path / "wwbl_state_dict.pth"
    torch.save(official, path)
    fresh = _official_like_g()
    loaded = model.load_official_into(fresh, path)
    assert len(loaded.loaded) == len(expected)
    assert torch.equal(fresh.state_dict()["D.up0.conv2.weight"], official["module.D.up0.conv2.weight"])
    # the authors' file pickles the whole DataParallel module: the stub unpickler reads its tensors, runs no code
    g.load_state_dict({k[len("module."):]: v for k, v in official.items()})
    pickled = tmp_path / "net_best.pth"
    torch.save(torch.nn.DataParallel(g), pickled)
    again = _official_like_g()
    report = model.load_official_into(again, pickled)
    assert len(report.loaded) == len(expected) and not report.missing and not report.unexpected
    for k, v in again.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    torch.save(torch.nn.Linear(2, 2), tmp_path / "other.pth")  # a pickled module of something else
    with pytest.raises(ValueError, match="not in the file"):
        model.load_official_into(fresh, tmp_path / "other.pth")
    bad = dict(official)
    bad.pop("module.D.up1.BN2.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"D\.up1\.BN2\.weight"):
        model.load_official_into(fresh, tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------------ losses
def _toy_problem():
    """A 16x16 red square on green; the "CLIP" embedding of an image is its normalised mean colour and the text
    asks for red, so a map that keeps the square (and drops the grass) scores best."""
    img = torch.zeros(1, 3, 16, 16)
    img[:, 1] = 1.0
    obj = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    obj[..., 5:11, 4:12] = True
    img[:, 0][obj[:, 0]] = 1.0
    img[:, 1][obj[:, 0]] = 0.0
    z_t = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    return img, obj, z_t


def _embed(x):
    return F.normalize(x.mean(dim=(2, 3)), dim=-1)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("term", ["fore", "back", "rmap", "reg"])
def test_each_loss_moves_the_map_the_right_way(variant, term):
    img, obj, z_t = _toy_problem()
    theta = torch.zeros(1, 1, 16, 16, requires_grad=True)
    r = obj.float()  # the relevancy target: the object
    weights = {k: (1.0 if k == term else 0.0) for k in ("fore", "back", "rmap", "reg")}

    def objective(th):
        m = torch.sigmoid(th)
        return m, losses.wwbl_losses(m, r, _embed(img * m), _embed(img * (1 - m)), z_t, variant, weights)

    m0, out = objective(theta)
    (grad,) = torch.autograd.grad(out["loss"], theta)
    m1, out1 = objective((theta - 2.0 * grad).detach())
    assert float(out1["loss"].detach()) < float(out["loss"].detach())
    m0 = m0.detach()
    contrast = lambda m: float(m[obj].mean() - m[~obj].mean())  # noqa: E731
    if term == "reg":
        assert float(m1.mean()) < float(m0.mean())
    else:
        assert contrast(m1) > contrast(m0) + 1e-4
        assert float(m1[obj].mean()) > float(m0[obj].mean()) or term != "rmap"
        assert float(m1[~obj].mean()) < float(m0[~obj].mean())


PAPER_WEIGHTS = {"fore": 1.0, "back": 1.0, "rmap": 4.0, "reg": 1.0}  # the paper: 1, 1, 4, 1
OFFICIAL_WEIGHTS = {"fore": 0.25, "back": 0.5, "rmap": 16.0, "reg": 0.25}  # train_grounding.py


def test_paper_and_official_weights():
    cfg = method_schema("wwbl")
    assert cfg["loss"]["weights"]["paper"] == PAPER_WEIGHTS
    assert cfg["loss"]["weights"]["official"] == OFFICIAL_WEIGHTS
    with pytest.raises(ValueError):
        losses.wwbl_losses(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 3), torch.zeros(1, 3),
                           torch.zeros(1, 3), "bogus", PAPER_WEIGHTS)


def test_method_losses_train_g_only(method):
    x01 = torch.rand(2, 3, 32, 32)
    method.model.train()
    out = method.losses(x01, ["image of a red star", "image of a blue ring"])
    method.model.zero_grad()
    out["loss"].backward()
    method.model.eval()
    assert torch.isfinite(out["loss"])
    assert set(out) == {"loss", "fore", "back", "rmap", "reg"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.parameters())
    assert all(p.grad is None for p in method.clip.model.parameters())


# ------------------------------------------------------------------------------------------------ inference
def test_localize_single_and_phrase_shapes(method):
    imgs = [scene(), scene(size=(40, 40))]
    out = method.localize(imgs, classes=[0, 1])
    assert out.maps.shape == (2, 1, 32, 32)
    out = method.localize(imgs, classes=[[0, 1], [1, 0]])
    assert out.maps.shape == (2, 2, 32, 32)
    out = method.localize([imgs[0]], texts=[["a red square", "green grass", "a star"]])
    assert out.maps.shape == (1, 3, 32, 32)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1


def test_wsol_mode_is_class_agnostic():
    m = wwbl.WWbL(micro_config("wsol"), class_names=["star", "heart"])
    assert {c.value for c in m.capabilities} == {"single"}
    out = m.localize([scene()], classes=[[0, 1]])
    assert out.maps.shape == (1, 2, 32, 32) and torch.equal(out.maps[0, 0], out.maps[0, 1])
    with pytest.raises(TypeError):
        m.localize([scene()], texts=[["a star"]])


def test_open_world_pipeline_returns_box_caption_pairs():
    m = wwbl.WWbL.from_components(micro_config(), clip=build_clip(micro_config(), "cpu"),
                                  g=model.build_g(micro_config(), 32), captioner=colour_captioner)
    img = scene()
    out = m.localize([img])
    assert len(out.boxes) == 1 and len(out.captions) == 1
    boxes, caps = out.boxes[0], out.captions[0]
    assert boxes.shape == (len(caps), 4) and len(caps) >= 1
    assert set(caps) <= {"a red square", "the red square", "green grass"}
    assert out.maps.shape == (1, len(caps), 32, 32)
    w, h = img.size
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    res = m.open_world(img)
    # the two wordings of the red square are near-duplicates: they land in one cluster, named by one of them
    red = [c for c in res.clusters if any("red" in res.proposal_captions[i] for i in c)]
    assert len(red) == 1 and {res.proposal_captions[i] for i in red[0]} == {"a red square", "the red square"}
    assert sum("red" in c for c in res.captions) == 1
    assert m.open_world(img) is res  # cached per image
    # matching a GT phrase picks the caption closest in CLIP space (identical text → that caption)
    idx = m.match_captions([["green grass"]], res.embeddings)
    assert res.captions[idx[0]] == "green grass"


def test_test_time_text_is_the_official_query(method, monkeypatch):
    """Phrases go to g as "image of " + phrase.lower() (datasets/flicker.py); open-world captions as generated;
    GT phrases matched to captions get the phrase treatment, the captions none."""
    seen = []
    encode = method.clip.encode_text

    def spy(texts):
        seen.append(list(texts))
        return encode(texts)

    monkeypatch.setattr(method.clip, "encode_text", spy)
    method.localize([scene()], texts=[["A Red Square"]])
    assert seen[-1] == ["image of a red square"]
    method.g_maps(method._images01([scene()]), ["A caption"], as_query=False)
    assert seen[-1] == ["A caption"]
    method.match_captions([["The Grass", "grass"]], torch.zeros(2, method.clip.embed_dim))
    assert seen[-1] == ["image of the grass", "image of grass"]


class _FakeBlipProcessor:
    def __call__(self, images, return_tensors, text=None):
        self.text = text
        return {"pixel_values": torch.zeros(len(images), 3, 4, 4), "input_ids": torch.zeros(len(images), 5).long()}

    def batch_decode(self, ids, skip_special_tokens):
        return ["a picture of a red square on grass"] * len(ids)


class _FakeBlip:
    device = torch.device("cpu")

    def generate(self, **kwargs):
        self.kwargs = kwargs
        return torch.zeros(len(kwargs["pixel_values"]), 3).long()


def test_blip_captions_use_the_official_prompt_and_beam():
    cfg = micro_config(captioner={"prompt": "a picture of ", "num_beams": 3, "min_length": 5, "max_length": 30})
    blip, processor = _FakeBlip(), _FakeBlipProcessor()
    m = wwbl.WWbL.from_components(cfg, clip=build_clip(cfg, "cpu"), g=model.build_g(cfg, 32),
                                  captioner=(blip, processor))
    caps = m.caption_crops([scene(), scene()])
    assert caps == ["a red square on grass"] * 2  # the prompt is stripped, as BLIP's generate does
    assert processor.text == ["a picture of "] * 2 and "input_ids" in blip.kwargs
    assert (blip.kwargs["num_beams"], blip.kwargs["min_length"], blip.kwargs["max_length"]) == (3, 5, 30)
    paper = method_schema("wwbl")["captioner"]
    assert (paper["prompt"], paper["num_beams"], paper["min_length"], paper["max_length"]) == \
        ("a picture of ", 3, 5, 30)
    assert open_world.strip_prompt("a picture of a dog", "a picture of ") == "a dog"
    assert open_world.strip_prompt("two dogs", "a picture of ") == "two dogs"


def test_an_image_without_caption_cluster_is_skipped_and_counted(tmp_path):
    """Every proposal gets its own unrelated caption: no cluster of 2 forms. The official metric skips such
    an image; wsolbench counts it, gives NaN 'open' maps (no prediction) and scores nothing for it."""
    cfg = micro_config(eval={"extras": ["open"]})
    words = iter(range(10**6))
    m = wwbl.WWbL.from_components(cfg, clip=build_clip(cfg, "cpu"), g=model.build_g(cfg, 32),
                                  captioner=lambda crops: [f"thing number {next(words)}" for _ in crops])
    m.config["open"]["cluster_threshold"] = 1.01  # distinct captions never reach it
    res = m.open_world(scene())
    assert res.captions == [] and res.clusters == [] and len(res.proposal_captions) > 0
    assert len(m.open_skipped) == 1
    out = m.localize([scene()], texts=[["a red square"]])
    assert torch.isnan(out.extras["open"]).all() and torch.isfinite(out.maps).all()
    metrics, rows = harness_phrase_scores(m, _Captioned(tmp_path / "d", n=2))
    assert len(m.open_skipped) == 3  # the scene above and both dataset images
    assert metrics["open"]["pointing"].count == 0 and rows["open"]["pointing_game"] is None
    assert rows["open"]["nonfinite_maps"] == 4  # no prediction: 2 images x their entity's 2 phrase maps
    assert metrics["default"]["pointing"].count == 2 and rows["default"]["nonfinite_maps"] == 0


def test_open_world_with_zoo_captioner_runs(method):
    out = method.localize([scene()])
    assert len(out.captions[0]) == out.boxes[0].shape[0] == out.maps.shape[1] or len(out.captions[0]) == 0


def test_phrase_extras_open_and_clip():
    cfg = micro_config(eval={"extras": ["open", "clip"]})
    m = wwbl.WWbL.from_components(cfg, clip=build_clip(cfg, "cpu"), g=model.build_g(cfg, 32),
                                  captioner=colour_captioner)
    out = m.localize([scene()], texts=[["a red square", "grass"]])
    assert set(out.extras) == {"open", "clip"}
    for v in out.extras.values():
        assert v.shape == out.maps.shape


def harness_phrase_scores(m, ds) -> tuple[dict, dict]:
    """``m`` scored on ``ds`` by the harness's phrase evaluator (the one Flickr30k loop, ``wwbl-grounding``):
    its metric objects and its rows, per map variant (default = g, open, clip)."""
    from wsolbench.config import harness_defaults
    from wsolbench.harness import evaluator_class
    from wsolbench.protocols import get_protocol

    protocol = get_protocol("wwbl-grounding")
    evaluator = evaluator_class("phrases", protocol)(harness_defaults(), ds, m, protocol)
    samples = list(ds)
    batch, _ = evaluator.process(samples, [s.load_image() for s in samples])
    evaluator.absorb(batch)
    return evaluator.metrics, evaluator.compute()


# ------------------------------------------------------------------------------------------------ training
class _Captioned(WSOLDataset):
    """A tiny in-memory phrase dataset (PNG files in tmp_path)."""

    def __init__(self, root: Path, n: int = 4) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.samples = []
        for i in range(n):
            box = (4 + 3 * i, 6, 24 + 3 * i, 26)
            path = root / f"{i}.png"
            scene(box=box).save(path)
            gt = np.array([[box[0], box[1], box[2] - 1, box[3] - 1]], np.float32)
            self.samples.append(Sample(
                image_id=str(i), image_path=path, size=(48, 40), labels=(i % 2,),
                boxes=np.array([box], np.float32), captions=("a red square on green grass",),
                phrases=(Phrase(text="a red square", boxes=gt, entity_id="1"),
                         Phrase(text="the red block", boxes=gt, entity_id="1")),
                meta={"chain_boxes": {"1": gt}, "chain_order": ["1"]}))


def test_fit_selects_by_val_pointing_and_resumes(tmp_path):
    ds = _Captioned(tmp_path / "data")
    m = wwbl.WWbL(micro_config(), class_names=["star", "heart"])
    res = m.fit(ds, val_data=ds, out_dir=tmp_path / "train", progress=False)
    hist = res["history"]
    assert len(hist) == 2 and all("val_pointing" in r for r in hist)
    assert res["best_epoch"] in (1, 2)
    assert (tmp_path / "train" / "best.safetensors").exists()
    # resuming a finished run trains nothing more and keeps the best epoch
    m2 = wwbl.WWbL(micro_config(), class_names=["star", "heart"])
    res2 = m2.fit(ds, val_data=ds, out_dir=tmp_path / "train", resume=True, progress=False)
    assert res2["best_epoch"] == res["best_epoch"]
    for k, v in m.model.state_dict().items():
        assert torch.equal(v, m2.model.state_dict()[k]), k


def test_training_text_sampling_is_deterministic(tmp_path):
    ds = _Captioned(tmp_path / "d2", n=2)
    make = lambda: data.TextImageDataset(ds.samples, lambda s: list(s.captions), resize=36, crop=32,  # noqa: E731
                                         hflip=True, word_keep_prob=0.5, prefix="image of ", seed=3)
    a, b = make(), make()
    a.set_epoch(1)
    b.set_epoch(1)
    for i in range(2):
        x, y = a[i], b[i]
        assert x["text"] == y["text"] and x["text"].startswith("image of ")
        assert torch.equal(x["image"], y["image"]) and x["image"].shape == (3, 32, 32)
    assert data.drop_words("a b c", 0.0, np.random.default_rng(0)) in {"a", "b", "c"}


def test_save_load_roundtrip(method, tmp_path):
    img = scene()
    before = method.localize([img], texts=[["a red square"]]).maps
    method.save(tmp_path / "ckpt")
    again = wwbl.WWbL.load(tmp_path / "ckpt")
    after = again.localize([img], texts=[["a red square"]]).maps
    assert torch.allclose(before, after, atol=1e-6)


def test_class_names_are_cleaned():
    assert class_text("001.Black_footed_Albatross", lower=True) == "black footed albatross"
    assert class_text("goldfish, Carassius auratus", lower=True) == "goldfish"


def test_config_files_resolve():
    from wsolbench.config import load_method_config

    paper = load_method_config("wwbl", "paper", "flickr30k")
    assert paper["mode"] == "grounding" and paper["recipe"] == "official"
    assert paper["eval"]["extras"] == ["open", "clip"]
    assert paper["protocol"]["phrases"] == "wwbl-grounding"
    cub = load_method_config("wwbl", "paper", "cub")
    assert cub["mode"] == "wsol" and cub["class_text"] == "bird" and cub["train"]["batch_size"] == 48
    assert cub["mean"] == cub["std"] == [0.5, 0.5, 0.5] and cub["protocol"]["boxes"] == "wwbl-cub"
    tiny = load_method_config("wwbl", "tiny", "cub")
    assert tiny["mode"] == "wsol" and tiny["clip"]["source"] == "zoo" and tiny["unet"]["backbone"] == "zoo-vgg"


def _recipe_keys(cfg):
    return (cfg["loss"]["variant"], cfg["relevancy"]["mode"], cfg["train"]["lr"], cfg["train"]["size"],
            cfg["train"]["hflip"])


def test_training_recipes_by_name():
    from wsolbench.config import load_method_config

    official = wwbl.apply_recipe(load_method_config("wwbl", "paper", "flickr30k"))
    assert _recipe_keys(official) == ("official", "last", 0.0012, 304, True)
    text = wwbl.apply_recipe(load_method_config("wwbl", "paper", "flickr30k", ["recipe=paper-text"]))
    assert _recipe_keys(text) == ("paper", "rollout", 0.0003, 299, False)
    mixed = wwbl.apply_recipe(load_method_config("wwbl", "paper", None, ["recipe=paper-text", "train.lr=0.01"]))
    assert _recipe_keys(mixed) == ("paper", "rollout", 0.01, 299, False)  # a value the user sets wins
    cub = wwbl.apply_recipe(load_method_config("wwbl", "paper", "cub"))
    assert _recipe_keys(cub) == ("paper", "rollout", 0.0003, 224, True)
    assert official["loss"]["weights"][official["loss"]["variant"]] == OFFICIAL_WEIGHTS
    with pytest.raises(ValueError, match="recipe"):
        wwbl.apply_recipe(load_method_config("wwbl", "paper", None, ["recipe=bogus"]))


def test_paper_profile_without_weights_names_the_files(monkeypatch, tmp_path):
    monkeypatch.setenv("WSOLBENCH_WEIGHTS", str(tmp_path / "weights"))
    from wsolbench.config import load_method_config

    cfg = load_method_config("wwbl", "paper", "flickr30k")
    with pytest.raises(FileNotFoundError, match="ViT-B-32"):
        wwbl.WWbL(cfg)


def test_the_harness_scores_grounding_open_and_clip_per_entity(tmp_path):
    ds = _Captioned(tmp_path / "p", n=2)
    cfg = micro_config(eval={"extras": ["open", "clip"]})
    m = wwbl.WWbL.from_components(cfg, clip=build_clip(cfg, "cpu"), g=model.build_g(cfg, 32),
                                  captioner=colour_captioner)
    metrics, rows = harness_phrase_scores(m, ds)
    assert set(rows) == {"default", "open", "clip"}
    for variant, row in rows.items():
        assert metrics[variant]["pointing"].count == 2  # one query per (image, entity), its phrases averaged
        assert 0.0 <= row["pointing_game"] <= 100.0 and 0.0 <= row["bbox_acc"] <= 100.0


def test_box_rules(method):
    m = np.zeros((40, 50), np.float32)
    m[10:20, 5:25] = 1.0  # the large blob
    m[30:33, 40:43] = 0.8  # a small one
    gb = method.map_box(m, (50, 40))  # the open-world box: the grounding rule at the image's size
    assert gb.shape == (4,) and gb.dtype == np.float32 and gb[0] <= 5 and gb[2] >= 24
    # the WSOL box is the wwbl-cub protocol's: cubehelix gray, zero below int(0.1·max), the largest contour
    from wsolbench.metrics.fixed_box import contour_box
    from wsolbench.protocols import get_protocol

    cub = get_protocol("wwbl-cub")
    assert (cub.tau, cub.gray) == (0.1, "cubehelix")
    assert contour_box(m, cub.tau, cub.gray) == (5, 10, 25, 20)
    assert contour_box(np.zeros((8, 8), np.float32), cub.tau, cub.gray) == (0, 0, 1, 1)


MICRO_OVERRIDES = (
    "input_size=32", "clip.source=zoo-random", "clip.scale=micro", "encoder.source=zoo-random",
    "encoder.scale=micro", "encoder.cut=23", "encoder.probe_size=32", "decoder.mid_channels=8",
    "unet.backbone=zoo-vgg-random", "unet.scale=micro", "unet.probe_size=32",
    "captioner.source=zoo-random", "captioner.scale=micro", "captioner.max_length=8", "relevancy.mode=last",
    "train.epochs=1", "train.size=32", "train.resize=null", "train.crop=null", "train.max_steps_per_epoch=2",
    "train.val_limit=2", "open.proposal_size=48", "open.max_proposals=8", "harness.batch_size=4",
)


@pytest.mark.parametrize("dataset, metric", [("synthetic-cub", "gt_known_loc"),
                                             ("synthetic-flickr30k", "pointing_game")])
def test_registered_and_runs_through_the_harness(isolated_env, dataset, metric):
    from wsolbench.harness import RunSpec, run
    from wsolbench.registry import get_method_class

    assert get_method_class("wwbl") is wwbl.WWbL
    res = run(RunSpec(method="wwbl", dataset=dataset, profile="tiny", limit=6, out=isolated_env / "runs",
                      progress=False, overrides=MICRO_OVERRIDES))
    import json

    results = json.loads((res.run_dir / "metrics.json").read_text())["results"]
    assert 0 <= results["default"][metric] <= 100
    if dataset == "synthetic-flickr30k":  # the open-world map and the CLIP teacher are scored as their own rows
        assert {"open", "clip"} <= set(results)


def test_harness_skips_and_counts_images_without_caption_cluster(isolated_env):
    """wwbl-open: an image whose pipeline forms no caption cluster is left out of the 'open' row (as the
    official metric) and counted among its non-finite maps; the grounding row scores every entity."""
    import json

    from wsolbench.harness import RunSpec, run

    res = run(RunSpec(method="wwbl", dataset="synthetic-flickr30k", profile="tiny", limit=3,
                      out=isolated_env / "runs", progress=False,
                      overrides=MICRO_OVERRIDES + ("open.cluster_threshold=1.01", "eval.extras=[open]")))
    results = json.loads((res.run_dir / "metrics.json").read_text())["results"]
    assert results["open"]["pointing_game"] is None and results["open"]["nonfinite_maps"] > 0
    assert results["default"]["pointing_game"] is not None and results["default"]["nonfinite_maps"] == 0
