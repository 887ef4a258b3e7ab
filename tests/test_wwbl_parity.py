"""WWbL parity with the official code (../shared/fixtures/parity/wwbl, README there).

The authors' checkpoint format (``torch.save`` of the DataParallel grounding model) and an OpenAI-layout CLIP
ViT-B/32 state dict are written from the fixture's keys with the deterministic recipe, loaded through the
paper profile's public path (``official_checkpoint`` / ``clip.weights``, and ``load_foreign`` = ``wsolbench run
--checkpoint FILE``), and the text embeddings, relevancy maps, heatmaps, the training loss and the pointing /
box outcome of each GT case are compared with the official outputs at the README's tolerances.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsolbench.config import load_method_config
from wsolbench.methods.wwbl import method as wwbl
from wsolbench.methods.wwbl import model


@pytest.fixture(scope="module")
def fixture_dir(parity_fixture) -> Path:
    return parity_fixture("wwbl")


@pytest.fixture(scope="module")
def expected(fixture_dir) -> dict:
    return dict(np.load(fixture_dir / "expected.npz"))


@pytest.fixture(scope="module")
def cases(fixture_dir) -> dict:
    return json.loads((fixture_dir / "inputs" / "cases.json").read_text())


@pytest.fixture(scope="module")
def images(fixture_dir, cases) -> list:
    return [Image.open(fixture_dir / "inputs" / im["file"]).convert("RGB") for im in cases["images"]]


@pytest.fixture(scope="module")
def official_files(fixture_dir, parity_recipe, tmp_path_factory) -> dict[str, Path]:
    """The authors' net_best.pth layout (a pickled DataParallel module), the same weights as a state dict, and
    the OpenAI CLIP state dict (``clip.load(<state-dict file>, jit=False)`` reads it)."""
    recipe = parity_recipe
    keys = json.loads((fixture_dir / "keys.json").read_text())
    out = tmp_path_factory.mktemp("wwbl_official")
    state = recipe.state_dict_for(keys["grounding"], keys["seed"], keys["gain"])
    for name, shape in keys["grounding_int_buffers"]:
        state[name] = torch.zeros(shape, dtype=torch.int64)
    torch.save(state, out / "wwbl_state_dict.pth")
    g = model.TextConditionedG(model.vgg16_features()[:23], 512, 512, mid_channels=512, head_activation="relu")
    g.load_state_dict({model.official_key(k): v for k, v in state.items()})
    torch.save(torch.nn.DataParallel(g), out / "net_best.pth")  # what train_grounding.py saves
    torch.save(recipe.state_dict_for(keys["clip"], keys["seed"], keys["gain"]), out / "ViT-B-32.pt")
    return {"pickled": out / "net_best.pth", "state_dict": out / "wwbl_state_dict.pth", "clip": out / "ViT-B-32.pt"}


def paper_config(files: dict[str, Path], *sets: str) -> dict:
    """The paper profile with the official files named by the config keys a user sets."""
    return load_method_config("wwbl", "paper", None, [f"official_checkpoint={files['pickled']}",
                                                      f"clip.weights={files['clip']}", *sets])


@pytest.fixture(scope="module")
def method(official_files) -> wwbl.WWbL:
    return wwbl.WWbL(paper_config(official_files, "eval.extras=[clip]"))


def test_the_official_files_load_exactly_through_every_public_path(method, official_files):
    from open_clip.transformer import QuickGELU

    report = method.load_report
    assert report is not None and len(report.loaded) == 62 and not report.missing and not report.unexpected
    assert isinstance(method.clip.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(method.clip.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    # the state-dict form loads the same tensors into a g of the same build (CLIP shared: no second 600 MB load)
    g = model.build_g(method.config, 512)
    assert len(model.load_official_into(g, official_files["state_dict"]).loaded) == 62
    for k, v in g.state_dict().items():
        assert torch.equal(v, method.model.state_dict()[k]), k


def test_load_foreign_is_the_checkpoint_flag(official_files, monkeypatch):
    seen = {}

    def build_clip(cfg, device):
        seen["clip"] = cfg["clip"]["weights"]
        return _StubClip()

    monkeypatch.setattr(wwbl, "build_clip", build_clip)
    cfg = paper_config(official_files, "official_checkpoint=null")
    m = wwbl.WWbL.load_foreign(official_files["state_dict"], cfg)
    assert seen["clip"] == str(official_files["clip"])
    assert m.config["official_checkpoint"] == str(official_files["state_dict"])
    assert m.load_report.layout == "wwbl-official-grounding" and len(m.load_report.loaded) == 62


class _StubClip:
    """Stands in for the 600 MB CLIP where only g's loading is tested."""

    embed_dim = 512


def test_text_embeddings(method, expected):
    texts = [str(t) for t in expected["texts"]]
    assert texts[0] == "image of a pink ball"
    z = method.clip.encode_text(texts)
    assert np.abs(z.numpy() - expected["text_emb"]).max() < 1e-3  # README: 3.2e-4 with QuickGELU, 2.1e-3 GELU


def _per_image(expected):
    pairs = expected["pairs"]
    for i in range(len(expected["image_size_wh"])):
        yield i, np.where(pairs[:, 0] == i)[0]


def test_g_on_the_official_input_and_text(method, expected):
    """g alone, as ``inference_bbox`` calls it (the normalised image repeated once per phrase): the official maps
    (0.0 here; expanding the [0, 1] image before normalising picks another conv path, 1e-5 away)."""
    x = torch.from_numpy(expected["input224_uint8"]).permute(0, 3, 1, 2).float() / 255
    z = torch.from_numpy(expected["text_emb"])
    for i, idx in _per_image(expected):
        with torch.no_grad():
            h = method.model(method._g_input(x[[i]]).repeat(len(idx), 1, 1, 1), z[idx], (224, 224))[:, 0]
        assert np.abs(h.numpy() - expected["heatmap"][idx]).max() < 1e-5


@pytest.mark.parametrize("image", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_heatmaps_and_relevancy_through_localize(method, expected, cases, images, image):
    """The public path: the phrase as a user gives it (the "image of " prefix and lower-casing are the
    method's), wsolbench's own resize and CLIP; the 'clip' extra is the relevancy teacher. CI runs image 0
    (the module stays near a minute); images 1 and 2 are marked slow."""
    pairs = expected["pairs"]
    for i, idx in _per_image(expected):
        if i != image:
            continue
        phrases = [cases["images"][i]["phrases"][p] for p in pairs[idx, 1]]
        out = method.localize([images[i]], texts=[[p.upper() if k == 0 else p for k, p in enumerate(phrases)]])
        heat = out.maps[0].numpy()
        assert np.abs(heat - expected["heatmap"][idx]).max() < 0.05  # README: 0.017; 0.56 without the prefix
        rel = out.extras["clip"][0].numpy()
        assert np.abs(rel - expected["relevancy"][idx]).max() < 0.15
        for r, e in zip(rel, expected["relevancy"][idx]):
            assert np.corrcoef(r.ravel(), e.ravel())[0, 1] >= 0.98


def test_training_loss_of_the_official_step(method, expected, cases, images):
    """``gen_step`` at the default (official) recipe: 304 px input, last-block relevancy, 0.25/0.25/16/0.5,
    CLIP's resize with align_corners=True; g in train mode (batch statistics)."""
    cfg = method.config
    assert (cfg["loss"]["variant"], cfg["relevancy"]["mode"], cfg["train"]["size"], cfg["train"]["lr"],
            cfg["train"]["hflip"]) == ("official", "last", 304, 0.0012, True)
    batch = cases["loss_batch"]
    size = int(cfg["train"]["size"])
    x = torch.stack([torch.from_numpy(np.asarray(images[i].resize((size, size), Image.BILINEAR), np.float32) / 255)
                     .permute(2, 0, 1) for i in batch["images"]])
    kept = {k: v.clone() for k, v in method.model.state_dict().items()}  # train mode moves BN's running stats
    method.model.train()
    try:
        out = method.losses(x, batch["texts"])
    finally:
        method.model.eval()
        method.model.load_state_dict(kept)
    assert abs(float(out["loss"].detach()) - float(expected["loss"])) < 2e-3  # README: 8.1e-4 (0.061 if False)


def test_pointing_and_box_outcomes(method, expected, cases):
    """Each GT case scored with the wwbl-grounding rules (pointing inside the entity's UNION box, the grounding
    box vs the union GT box) gives the official outcome, on the official maps and on wsolbench's g output."""
    from wsolbench.metrics import GroundingBoxAccuracy, PhrasePointing
    from wsolbench.metrics.pointing import union_box

    x = torch.from_numpy(expected["input224_uint8"]).permute(0, 3, 1, 2).float() / 255
    z = torch.from_numpy(expected["text_emb"])
    ours = np.zeros_like(expected["heatmap"])
    for i, idx in _per_image(expected):
        with torch.no_grad():
            ours[idx] = method.model(method._g_input(x[[i]]).repeat(len(idx), 1, 1, 1), z[idx], (224, 224))[:, 0]
    pairs = expected["pairs"]
    for maps in (expected["heatmap"], ours):
        for c, case in enumerate(cases["cases"]):
            p = int(expected["case_pair"][c])
            size = tuple(int(s) for s in expected["image_size_wh"][pairs[p, 0]])
            boxes = np.asarray(case["boxes"], np.float64)
            hit, box = PhrasePointing(), GroundingBoxAccuracy()
            hit.update([maps[p]], [union_box(boxes)], [size])
            box.update([maps[p]], [boxes], [size])
            assert (hit.compute()["pointing_acc"] == 100.0) == bool(expected["case_hit"][c]), case["name"]
            assert (box.compute()["box_acc"] == 100.0) == bool(expected["case_box_correct"][c]), case["name"]

