"""Generic Grad-CAM: equals CAM/(h·w) on a GAP-linear net; token layers via reshape; frozen models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wsolbench.maps.gradcam import GradCAM, grad_cam, tokens_to_map


def _gap_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 4)).eval()


def test_gradcam_equals_cam_on_gap_linear():
    net = _gap_net()
    x = torch.randn(2, 3, 6, 7)
    maps, logits = grad_cam(net, net[1], x, targets=[[0, 3], [2, 1]])
    assert maps.shape == (2, 2, 6, 7) and logits.shape == (2, 4)
    feats = net[1](net[0](x))
    w = net[4].weight
    for b, cls in enumerate([[0, 3], [2, 1]]):
        for k, c in enumerate(cls):
            cam = torch.einsum("d,dhw->hw", w[c], feats[b]).clamp_min(0) / (6 * 7)
            torch.testing.assert_close(maps[b, k], cam, rtol=1e-5, atol=1e-6)
    # default target = arg-max class; layer by name; the bound class gives the same maps
    top = logits.argmax(1)
    m1, _ = grad_cam(net, "1", x)
    m2, _ = grad_cam(net, net[1], x, targets=top.tolist())
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(GradCAM(net, "1")(x, top.tolist()), m2)


class _TokenNet(nn.Module):
    """A ViT-shaped toy: patch embed → tokens (CLS + 3×4) → block → mean of patch tokens → head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        t = self.block(t)
        return self.head(t[:, 1:].mean(1))


def test_gradcam_on_tokens_with_reshape_and_frozen_weights():
    torch.manual_seed(1)
    net = _TokenNet().eval().requires_grad_(False)  # frozen, like CLIP
    x = torch.randn(2, 3, 6, 8)
    with torch.no_grad():  # callers often sit in no_grad; grad_cam must still work
        maps, out = grad_cam(net, net.block, x, targets=[1, 2], reshape=tokens_to_map((3, 4), drop_prefix=1))
    assert maps.shape == (2, 1, 3, 4) and out.shape == (2, 3)
    tokens = net.block(torch.cat([net.cls.expand(2, -1, -1), net.embed(x).flatten(2).transpose(1, 2)], 1))
    feats = tokens[:, 1:].transpose(1, 2).reshape(2, 8, 3, 4)
    for b, c in enumerate([1, 2]):
        cam = torch.einsum("d,dhw->hw", net.head.weight[c], feats[b]).clamp_min(0) / 12
        torch.testing.assert_close(maps[b, 0], cam, rtol=1e-5, atol=1e-6)
    # a custom score (e.g. CLIP similarity to text embeddings) through score_fn
    text = torch.randn(5, 3)
    maps2, _ = grad_cam(net, net.block, x, targets=[[4], [0]], score_fn=lambda o: o @ text.T,
                        reshape=tokens_to_map(drop_prefix=1, grid=(3, 4)))
    assert maps2.shape == (2, 1, 3, 4) and torch.isfinite(maps2).all()


def test_gradcam_errors():
    net = _TokenNet().eval()
    x = torch.randn(1, 3, 6, 8)
    with pytest.raises(ValueError, match="reshape"):
        grad_cam(net, net.block, x, targets=[0])
    with pytest.raises(ValueError, match="grid"):
        grad_cam(net, net.block, x, targets=[0], reshape=tokens_to_map(drop_prefix=0))
    with pytest.raises(ValueError, match="no submodule"):
        grad_cam(net, "nope", x)
    seq_first = tokens_to_map((3, 4), drop_prefix=1, seq_first=True)
    assert seq_first(torch.randn(13, 2, 8)).shape == (2, 8, 3, 4)
