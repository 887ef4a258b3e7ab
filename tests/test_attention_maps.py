"""The attention-recording processor: same outputs as diffusers, maps of the right shapes at the right layers."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from wsolbench.maps.cross_attention import (AttentionRecorder, EarlyStop, level_size, one_hot_tokens,  # noqa: E402
                                      select_layers, unet_attention_layers)


def _sd_like_unet():
    """A tiny U-Net with Stable Diffusion v1's block layout: 3 cross-attn down blocks + a plain one, the
    mirror on the way up, a cross-attn mid block (so with a 16x16 latent: levels 0..3 = 16, 8, 4, 2)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=12,
        attention_head_dim=4, norm_num_groups=4).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet():
    return _sd_like_unet()


def _inputs(b=2, seq=7):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 16, 16, generator=g), torch.tensor([0, 99])[:b],
            torch.randn(b, seq, 12, generator=g))


def test_layer_table_matches_sd_layout(unet):
    layers = unet_attention_layers(unet)
    assert all(l.cross and l.name.endswith("attn2") for l in layers)
    by = {(l.place, l.block): l.level for l in layers}
    assert by[("down", 0)] == 0 and by[("down", 2)] == 2 and by[("mid", 0)] == 3
    assert by[("up", 1)] == 2 and by[("up", 3)] == 0
    assert [l.place for l in layers] == sorted((l.place for l in layers), key=["down", "mid", "up"].index)
    # SD v1: the 8x8 maps (level 3) are the mid block's only; 16x16 (level 2): 1 down + 2 up layers here
    assert [l.place for l in select_layers(layers, levels=[3])] == ["mid"]
    assert len(select_layers(layers, places=["down"], levels=[2])) == 1
    assert len(select_layers(layers, places=["up"], levels=[2])) == 2
    assert len(unet_attention_layers(unet, "self")) == len(layers)
    with pytest.raises(ValueError):
        select_layers(layers, places=["middle"])


def test_outputs_unchanged_and_shapes(unet):
    x, t, e = _inputs()
    layers = unet_attention_layers(unet)
    with torch.no_grad():
        ref = unet(x, t, e).sample
        with AttentionRecorder(unet, layers, token_weights=one_hot_tokens(2, [3, [4, 5]], 7)) as rec:
            out = unet(x, t, e).sample
            maps = rec.maps()
    assert torch.allclose(out, ref, atol=1e-5)
    assert set(maps) == {l.name for l in layers}
    for l in layers:
        side = level_size((16, 16), l.level)
        assert maps[l.name].shape == (2, 2, *side)
    # processors restored: a second forward is the stock one again
    assert all(type(unet.get_submodule(l.name).processor).__name__ != "RecordingAttnProcessor" for l in layers)


def test_probabilities_sum_to_one_over_tokens(unet):
    x, t, e = _inputs()
    layers = select_layers(unet_attention_layers(unet), levels=[2])
    with torch.no_grad(), AttentionRecorder(unet, layers, reduce_heads=False) as rec:
        unet(x, t, e)
    for name, m in rec.maps().items():
        heads = unet.get_submodule(name).heads
        assert m.shape[:3] == (2, heads, 7)  # all tokens kept: B×heads×L×h×w
        assert torch.allclose(m.sum(2), torch.ones_like(m.sum(2)), atol=1e-5)


def test_recorded_values_match_explicit_softmax(unet):
    """The stored map is softmax(q k^T * scale) at the chosen token, averaged over heads."""
    x, t, e = _inputs()
    layer = select_layers(unet_attention_layers(unet), places=["mid"])[0]
    module = unet.get_submodule(layer.name)
    captured = {}
    hook = module.register_forward_pre_hook(lambda m, a, k: captured.update(h=(a[0] if a else k["hidden_states"])),
                                            with_kwargs=True)
    with torch.no_grad(), AttentionRecorder(unet, [layer], token_weights=one_hot_tokens(2, [2], 7)) as rec:
        unet(x, t, e)
    hook.remove()
    h = captured["h"]
    with torch.no_grad():
        q = module.to_q(h)
        k = module.to_k(e)
    b, n, _ = q.shape
    q = q.view(b, n, module.heads, -1).transpose(1, 2)
    k = k.view(b, 7, module.heads, -1).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)) * module.scale).softmax(-1)
    expect = probs[..., 2].mean(1).view(b, *level_size((16, 16), layer.level))
    assert torch.allclose(rec.maps()[layer.name][:, 0], expect, atol=1e-5)


def test_only_selected_layers_and_early_stop(unet):
    x, t, e = _inputs()
    all_layers = unet_attention_layers(unet)
    chosen = select_layers(all_layers, levels=[2, 3])
    calls = []
    last_up = select_layers(all_layers, places=["up"], levels=[0])[-1]
    h = unet.get_submodule(last_up.name).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), AttentionRecorder(unet, chosen, stop_after_last=True) as rec:
        assert rec.run(x, t, e) is None  # stopped after the last 16x16 up layer
        assert set(rec.maps()) == {l.name for l in chosen}
    h.remove()
    assert calls == []  # the 64x64-equivalent decoder block never ran
    with pytest.raises(EarlyStop), torch.no_grad(), AttentionRecorder(unet, chosen, stop_after_last=True):
        unet(x, t, e)


def test_accumulate_means_over_calls(unet):
    x, t, e = _inputs()
    layers = select_layers(unet_attention_layers(unet), places=["mid"])
    with torch.no_grad(), AttentionRecorder(unet, layers, token_weights=one_hot_tokens(2, [1], 7)) as rec:
        unet(x, t, e)
        a = rec.maps()[layers[0].name].clone()
        unet(x, t, e * 0)
        b = rec.maps()[layers[0].name].clone()
    with torch.no_grad(), AttentionRecorder(unet, layers, token_weights=one_hot_tokens(2, [1], 7),
                                            accumulate=True) as rec:
        unet(x, t, e)
        unet(x, t, e * 0)
        assert torch.allclose(rec.maps()[layers[0].name], (a + b) / 2, atol=1e-6)


def test_bad_token_weights_are_reported(unet):
    x, t, e = _inputs()
    layers = select_layers(unet_attention_layers(unet), places=["mid"])
    with pytest.raises(ValueError, match="token_weights"), torch.no_grad(), \
            AttentionRecorder(unet, layers, token_weights=torch.ones(3, 1, 7)):
        unet(x, t, e)
    with pytest.raises(ValueError, match="no attention layers"):
        AttentionRecorder(unet, [])
