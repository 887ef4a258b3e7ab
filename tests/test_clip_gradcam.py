"""CLIP-ES-style Grad-CAM (wsolbench.maps.clip_gradcam) on the random-init micro zoo CLIP."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsolbench.classnames import class_text
from wsolbench.maps.clip_gradcam import ClipGradCAM, native_size_batch, patch_mean_features, prompt_embeddings

NAMES = ["star", "heart", "ring", "cross"]
BG = ["ground", "sky", "wall"]


@pytest.fixture(scope="module")
def micro_clip():
    from wsolbench import zoo

    model, tok = zoo.create_clip("micro", seed=0)
    return model.eval(), tok


def test_patch_mean_features_is_open_clip_avg_pooling(micro_clip):
    model, _ = micro_clip
    x = torch.randn(2, 3, 32, 32)
    ref = copy.deepcopy(model.visual)
    ref.pool_type = "avg"  # open_clip: ln_post on all tokens, mean of the patch tokens, then proj
    with torch.no_grad():
        torch.testing.assert_close(patch_mean_features(model, x), ref(x), rtol=1e-5, atol=1e-5)


def _reference_cam(model, text_fg, text_bg, x, label, logit_scale):
    """Independent pytorch-grad-cam-style computation: retain_grad on the last block's ln_1 output."""
    visual = model.visual
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    h = visual.transformer.resblocks[-1].ln_1.register_forward_hook(hook)
    try:
        x = x.clone()
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            feat = F.normalize(patch_mean_features(model, x), dim=-1)
            logits = torch.cat([feat @ text_fg[label:label + 1].T, feat @ text_bg.T], dim=1) * logit_scale
            prob = logits.softmax(-1)[:, 0]
            prob.sum().backward()
    finally:
        h.remove()
        for p in model.parameters():
            p.requires_grad_(False)
    a, g = store["a"][:, 1:], store["a"].grad[:, 1:]  # B×N×D, class token dropped
    w = g.mean(dim=1, keepdim=True)
    cam = (w * a).sum(-1).clamp_min(0)
    n = int(round(cam.shape[1] ** 0.5))
    cam = cam.view(-1, n, n)
    cam = cam - cam.flatten(1).min(1).values.view(-1, 1, 1)
    return cam / (cam.flatten(1).max(1).values.view(-1, 1, 1) + 1e-7)


def test_matches_an_independent_grad_cam(micro_clip):
    model, tok = micro_clip
    cg = ClipGradCAM(model, tok, NAMES, background_words=BG)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    maps = cg(x, [1, 1, 1], normalized=True)
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32
    ref = _reference_cam(model, cg.fg_text, cg.bg_text, x, 1, cg.logit_scale)
    torch.testing.assert_close(maps, ref.detach(), rtol=1e-4, atol=1e-5)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 + 1e-6


def test_labels_select_the_class_and_batches_do_not_interact(micro_clip):
    model, tok = micro_clip
    cg = ClipGradCAM(model, tok, NAMES, background_words=BG)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    both = cg(x, [0, 2], normalized=True)
    one = cg(x[1:], [2], normalized=True)
    torch.testing.assert_close(both[1], one[0], rtol=1e-4, atol=1e-5)
    other = cg(x[1:], [3], normalized=True)
    assert not torch.allclose(one, other)


def test_without_background_words_the_single_class_softmax_is_flat(micro_clip):
    # CLIP-ES's background words are what gives the softmax a gradient: alone, p(class) = 1 everywhere.
    model, tok = micro_clip
    cg = ClipGradCAM(model, tok, NAMES, background_words=[])
    maps = cg(torch.randn(1, 3, 32, 32), [0], normalized=True)
    assert float(maps.abs().max()) == 0.0


def test_images_any_size_and_pil_input(micro_clip):
    from PIL import Image

    model, tok = micro_clip
    cg = ClipGradCAM(model, tok, NAMES, background_words=BG, input_size=64)  # interpolated positional embedding
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    assert cg([img, img], [0, 1]).shape == (2, 8, 8)
    x = native_size_batch(img, model, cg.mean, cg.std)  # CLIP-ES: own size rounded up to the patch size
    assert x.shape == (1, 3, 56, 72)
    assert cg(x, [0], normalized=True).shape == (1, 7, 9)
    with pytest.raises(ValueError, match="labels"):
        cg([img], [7])


def test_prompt_embeddings_and_names(micro_clip):
    model, tok = micro_clip
    e = prompt_embeddings(model, tok, NAMES, ["a photo of a {}.", "a clean origami {}."])
    assert e.shape == (4, 32)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="placeholder"):
        prompt_embeddings(model, tok, NAMES, ["no slot"])
    assert class_text("001.Black_footed_Albatross") == "Black footed Albatross"
    assert class_text("goldfish, Carassius auratus") == "goldfish"
    assert class_text("star") == "star"
