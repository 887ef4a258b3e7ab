"""CLIP relevancy maps (Chefer et al., ICCV 2021) on open_clip vision transformers.

For an image I and a text t, the score is s = logit_scale · cos(E_img(I), E_txt(t)) (CLIP's logit, as in the
Chefer CLIP notebook and the WWbL code). In each visual block b the attention probabilities A_b (B×heads×N×N,
token 0 = CLS) are recorded, and

    Ā_b = mean_heads( clamp(∂s/∂A_b ⊙ A_b, min=0) ),     R ← R + Ā_b · R   (R starts as the identity),

over the blocks from ``start_layer`` to the last. The relevancy map is the CLS row of R without the CLS
column, R[0, 1:], reshaped to the patch grid.

- ``mode="rollout"``: all blocks (Chefer et al.'s gradient-weighted rollout; the paper's H).
- ``mode="last"``: the last block only — the WWbL code's choice (then R[0, 1:] = Ā_last[0, 1:]).

The attention of each visual block is recorded by temporarily replacing the ``forward`` of its attention
module (``torch.nn.MultiheadAttention``, or open_clip's own ``Attention``) with an equivalent explicit
computation that keeps the softmax probabilities in the autograd graph; the originals are restored on exit.
CLIP's weights get no gradients (only ∂s/∂A is computed) and need not require grad.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("last", "rollout")


def _mask_to_additive(attn_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _mha_forward(store: list, index: int):
    """An explicit, probability-recording replacement for ``nn.MultiheadAttention.forward`` (self-attention
    with packed in-projection, as in CLIP's visual blocks)."""

    def forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self._qkv_same_embed_dim:
            raise NotImplementedError("relevancy recording needs a packed in-projection (kdim == vdim == embed_dim)")
        if key_padding_mask is not None:
            raise NotImplementedError("relevancy recording does not support key_padding_mask")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, d = query.shape
        lk = key.shape[1]
        h = self.num_heads
        hd = d // h
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).reshape(b, lq, h, hd).transpose(1, 2)
        k = F.linear(key, w_k, b_k).reshape(b, lk, h, hd).transpose(1, 2)
        v = F.linear(value, w_v, b_v).reshape(b, lk, h, hd).transpose(1, 2)
        logits = (q * (hd ** -0.5)) @ k.transpose(-1, -2)
        mask = _mask_to_additive(attn_mask, logits.dtype)
        if mask is not None:
            logits = logits + (mask.reshape(b, h, lq, lk) if mask.ndim == 3 else mask)
        probs = logits.softmax(dim=-1)
        store[index] = probs
        out = (probs @ v).transpose(1, 2).reshape(b, lq, d)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, (probs.mean(dim=1) if average_attn_weights else probs) if need_weights else None

    return forward


def _openclip_attention_forward(store: list, index: int):
    """Replacement for open_clip's ``transformer.Attention.forward`` (custom blocks) recording probabilities."""

    def forward(self, x, attn_mask=None):
        n, length, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(n, length, self.num_heads, -1).transpose(1, 2)
        k = k.reshape(n, length, self.num_heads, -1).transpose(1, 2)
        v = v.reshape(n, length, self.num_heads, -1).transpose(1, 2)
        mask = _mask_to_additive(attn_mask, q.dtype)
        if self.logit_scale is not None:
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            logits = logits * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            logits = (q * self.scale) @ k.transpose(-1, -2)
        if mask is not None:
            logits = logits + (mask.reshape(n, self.num_heads, length, length) if mask.ndim == 3 else mask)
        probs = logits.softmax(dim=-1)
        store[index] = probs
        out = probs @ v
        if self.head_scale is not None:
            out = out * self.head_scale
        out = out.transpose(1, 2).reshape(n, length, c)
        out = self.ln_inner(out)
        return self.out_drop(self.out_proj(out))

    return forward


def visual_blocks(visual: nn.Module) -> Sequence[nn.Module]:
    """The residual attention blocks of an open_clip ``VisionTransformer``."""
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise TypeError(f"{type(visual).__name__} is not an open_clip VisionTransformer (no "
                        "transformer.resblocks); CLIP relevancy needs a ViT image tower")
    return list(blocks)


@contextlib.contextmanager
def record_attention(visual: nn.Module) -> Iterator[list]:
    """Within the block, every forward of ``visual`` stores each block's attention probabilities
    (B×heads×N×N, in the autograd graph) in the yielded list, index = block number."""
    blocks = visual_blocks(visual)
    store: list = [None] * len(blocks)
    patched = []
    try:
        for i, blk in enumerate(blocks):
            attn = blk.attn
            if isinstance(attn, nn.MultiheadAttention):
                fn = _mha_forward(store, i)
            elif all(hasattr(attn, a) for a in ("in_proj_weight", "num_heads", "ln_q", "out_proj")):
                fn = _openclip_attention_forward(store, i)
            else:
                raise TypeError(f"block {i}: unsupported attention module {type(attn).__name__}")
            attn.forward = types.MethodType(fn, attn)
            patched.append(attn)
        yield store
    finally:
        for attn in patched:
            if "forward" in attn.__dict__:
                del attn.forward


def image_size_of(visual: nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def relevancy(model: nn.Module, images: torch.Tensor, text_features: torch.Tensor, mode: str = "last",
              start_layer: int | None = None, out_size: int | tuple[int, int] | None = None,
              normalize: bool = True) -> torch.Tensor:
    """Relevancy of each image for its text: B×1×h×w.

    ``images``: B×3×H×W, already normalised for this CLIP model (resized to the model's input size here if
    needed). ``text_features``: B×D (one text per image) or 1×D (the same text for all), CLIP text
    embeddings (normalised here). ``mode``: "last" (WWbL code) or "rollout" (Chefer et al.); ``start_layer``
    overrides the first block used. ``out_size``: bilinear upsampling of the patch-grid map (None = grid).
    ``normalize``: per-image min-max to [0, 1] (a constant map becomes zeros).
    """
    if mode not in MODES:
        raise ValueError(f"unknown relevancy mode {mode!r}; use one of {MODES}")
    visual = model.visual
    blocks = visual_blocks(visual)
    n_blocks = len(blocks)
    if start_layer is None:
        start_layer = n_blocks - 1 if mode == "last" else 0
    start_layer = start_layer % n_blocks
    size = image_size_of(visual)
    x = images.detach()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    b = x.shape[0]
    txt = F.normalize(text_features.detach().to(x.device, torch.float32), dim=-1)
    if txt.ndim != 2 or txt.shape[0] not in (1, b):
        raise ValueError(f"text_features must be 1×D or B×D with B={b}, got {tuple(txt.shape)}")
    scale = model.logit_scale.detach().exp().float() if hasattr(model, "logit_scale") else torch.tensor(100.0)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), record_attention(visual) as probs:
            x = x.requires_grad_(True)  # so the graph exists even when CLIP's weights are frozen
            img = F.normalize(model.encode_image(x).float(), dim=-1)
            score = (scale * (img * txt).sum(dim=-1)).sum()  # images are independent: ∂Σ/∂A_b = ∂s_b/∂A_b
            used = list(range(start_layer, n_blocks))
            grads = torch.autograd.grad(score, [probs[i] for i in used])
    finally:
        model.train(was_training)
    n_tokens = probs[used[0]].shape[-1]
    rel = torch.eye(n_tokens, device=x.device, dtype=torch.float32).expand(b, n_tokens, n_tokens)
    for i, g in zip(used, grads):
        cam = (g.float() * probs[i].detach().float()).clamp(min=0).mean(dim=1)  # B×N×N
        rel = rel + torch.bmm(cam, rel)
    row = rel[:, 0, 1:]
    gh, gw = getattr(visual, "grid_size", (int(math.isqrt(row.shape[1])),) * 2)
    if row.shape[1] != gh * gw:
        raise ValueError(f"{row.shape[1]} patch tokens do not fill the {gh}×{gw} grid (extra tokens?)")
    maps = row.reshape(b, 1, gh, gw)
    if out_size is not None:
        maps = F.interpolate(maps, size=out_size if isinstance(out_size, tuple) else (out_size, out_size),
                             mode="bilinear", align_corners=False)
    if normalize:
        maps = minmax(maps)
    return maps.detach()


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] over the last two dims; a constant map becomes zeros."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))
