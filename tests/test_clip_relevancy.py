"""Chefer-style CLIP relevancy on open_clip ViTs: a hand-built CLIP whose answer is known, and the zoo CLIP."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from wsolbench.maps.clip_relevancy import record_attention, relevancy  # noqa: E402

D = 8  # width = embedding dim


def _hand_built_clip(layers: int = 2):
    """A CLIP ViT (32 px, 8-px patches → 4x4 grid) whose image embedding says "how much red vs green".

    Patch embedding: dim 0 = mean(R) − mean(G) of the patch, so after LayerNorm a red patch is +u and a
    green one −u (u = the centred e0). The CLS token is a fixed vector w ⟂ u. Attention is uniform (q = k = 0),
    values and output projections are identities, MLPs are zero: the CLS output is w + c·u with
    c ∝ (#red − #green) patches, and the text embedding u asks for "red". Hence ∂s/∂A[cls→patch] > 0 exactly
    on the red patches: the relevancy must be positive there and 0 elsewhere.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=D, vision_cfg=CLIPVisionCfg(layers=layers, width=D, head_width=D, patch_size=8,
                                                       image_size=32),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=D, heads=1, layers=1))
    v = model.visual
    with torch.no_grad():
        v.conv1.weight.zero_()
        v.conv1.weight[0, 0] = 1.0 / 64
        v.conv1.weight[0, 1] = -1.0 / 64
        v.class_embedding.copy_(torch.tensor([0, 1, -1, 0, 0, 0, 0, 0], dtype=torch.float32))
        v.positional_embedding.zero_()
        for blk in v.transformer.resblocks:
            w = blk.attn.in_proj_weight
            w.zero_()
            w[2 * D:] = torch.eye(D)
            blk.attn.in_proj_bias.zero_()
            blk.attn.out_proj.weight.copy_(torch.eye(D))
            blk.attn.out_proj.bias.zero_()
            for lin in (blk.mlp.c_fc, blk.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        v.proj.copy_(torch.eye(D))
    u = torch.full((D,), -1.0 / D)
    u[0] += 1.0
    return model.eval(), u[None]


def _image(cells):
    img = torch.zeros(1, 3, 32, 32)
    img[:, 1] = 1.0  # green
    for r, c in cells:
        img[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    return img


@pytest.mark.parametrize("mode", ["last", "rollout"])
def test_relevancy_highlights_the_planted_object(mode):
    model, text = _hand_built_clip(layers=2)
    cells = [(1, 2), (2, 2)]
    rel = relevancy(model, _image(cells), text, mode=mode, normalize=False)
    assert rel.shape == (1, 1, 4, 4)
    on = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in cells:
        on[r, c] = True
    m = rel[0, 0]
    assert float(m[on].min()) > 0 and float(m[on].min()) > 3 * float(m[~on].max())
    if mode == "last":  # one block: only the red patches get a positive gradient
        single, _ = _hand_built_clip(layers=1), None
        m1 = relevancy(single[0], _image(cells), single[1], mode="last", normalize=False)[0, 0]
        assert (m1[on] > 0).all() and torch.allclose(m1[~on], torch.zeros(()), atol=1e-7)
    norm = relevancy(model, _image(cells), text, mode=mode, out_size=32)
    assert norm.shape == (1, 1, 32, 32) and float(norm.min()) == 0.0 and float(norm.max()) == pytest.approx(1.0)


def test_batch_items_are_independent_and_weights_untouched():
    model, text = _hand_built_clip(layers=1)
    imgs = torch.cat([_image([(0, 0)]), _image([(3, 3)])])
    rel = relevancy(model, imgs, text, normalize=False)
    assert rel[0, 0].argmax().item() == 0 and rel[1, 0].argmax().item() == 15
    assert all(p.grad is None for p in model.parameters())
    # the attention modules got their own forward back
    assert all("forward" not in blk.attn.__dict__ for blk in model.visual.transformer.resblocks)


def test_recorded_forward_matches_the_original():
    model, tok = _zoo_micro_clip()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode_image(x)
        with record_attention(model.visual) as probs:
            rec = model.encode_image(x)
    assert torch.allclose(ref, rec, atol=1e-5)
    assert probs[0].shape == (2, 2, 17, 17)  # batch, heads, 1 + 4x4 tokens
    assert torch.allclose(probs[0].sum(-1), torch.ones(2, 2, 17), atol=1e-5)


def _zoo_micro_clip():
    try:
        from wsolbench.zoo.clip import create_clip
    except ImportError:
        pytest.skip("zoo CLIP not available")
    return create_clip("micro")


def test_zoo_clip_shapes_and_range():
    model, tok = _zoo_micro_clip()
    with torch.no_grad():
        t = model.encode_text(tok(["a red star", "a blue ring"]))
    x = torch.rand(2, 3, 48, 48)  # resized to the model's 32 inside
    for mode in ("last", "rollout"):
        r = relevancy(model, x, t, mode=mode, out_size=(20, 24))
        assert r.shape == (2, 1, 20, 24)
        assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    with pytest.raises(ValueError):
        relevancy(model, x, t[:1].repeat(3, 1))
    with pytest.raises(ValueError):
        relevancy(model, x, t, mode="bogus")
