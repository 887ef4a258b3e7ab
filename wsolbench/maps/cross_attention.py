"""Record attention probabilities inside a diffusers U-Net through its public processor interface.

Diffusion-based localizers (GenPromp, DiffusionSeg-style methods, prompt-to-prompt analyses) read the
cross-attention probabilities between image queries and text tokens. Older code patched a diffusers
internal (``CrossAttention.get_attention_scores`` in 0.13) that no longer exists; this module uses the
public extension point instead: ``Attention.set_processor`` with a processor that computes the softmax
explicitly, records what was asked for, and returns exactly what the stock processor would.

    layers = select_layers(unet_attention_layers(unet), places=("down", "mid", "up"), levels=(2, 3))
    with AttentionRecorder(unet, layers, token_weights=one_hot_tokens(batch, [5], 77)) as rec:
        unet(z_t, t, text_embeddings)
        maps = rec.maps()          # {layer name: B×K×h×w}, mean over heads

Only the selected layers get the recording processor (every other layer keeps its fast fused one), the
recorded tensors are reduced to the selected tokens (``token_weights``: a B×K×L matrix, so one token, a
mean over a phrase's tokens or any mixture) and over heads before they are stored, so memory is
B·K·h·w per layer whatever the sequence length. ``stop_after_last=True`` ends the U-Net forward as soon as
every selected layer has been recorded (the outputs are then not needed): for Stable Diffusion with the
8x8 + 16x16 layers this skips the 32x32 and 64x64 decoder blocks.

Layer levels: ``level`` is the layer's downsampling level relative to the latent (spatial size
= latent size / 2**level, ceil-rounded per level as diffusers' stride-2 convolutions do). In
``UNet2DConditionModel`` ``down_blocks[i]`` runs at level i, the mid block at the deepest level
(``len(down_blocks) - 1``) and ``up_blocks[j]`` at level ``len(up_blocks) - 1 - j``. For Stable Diffusion
v1 at 512 px (64x64 latent): level 2 = 16x16 (down_blocks.2, up_blocks.1), level 3 = 8x8 (mid block).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

PLACES = ("down", "mid", "up")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a U-Net: its dotted name, where it sits, and its resolution level."""

    name: str
    place: str  # "down" | "mid" | "up"
    block: int  # index within down_blocks / up_blocks (0 for the mid block)
    level: int  # spatial size = latent size / 2**level
    cross: bool  # cross-attention (text keys) or self-attention


class EarlyStop(Exception):
    """Raised inside the U-Net forward once every selected layer is recorded (``stop_after_last``)."""


def unet_attention_layers(unet, kind: str = "cross") -> list[AttentionLayer]:
    """Every attention module of a ``UNet2DConditionModel`` in forward order; ``kind``: cross | self | all."""
    if kind not in ("cross", "self", "all"):
        raise ValueError(f"kind must be 'cross', 'self' or 'all', got {kind!r}")
    n_down = len(getattr(unet, "down_blocks", []))
    n_up = len(getattr(unet, "up_blocks", []))
    layers = []
    for name, module in unet.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "is_cross_attention")):
            continue
        cross = bool(module.is_cross_attention)
        if (kind == "cross" and not cross) or (kind == "self" and cross):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            place, block, level = "down", int(parts[1]), int(parts[1])
        elif parts[0] == "up_blocks":
            place, block = "up", int(parts[1])
            level = n_up - 1 - block
        elif parts[0] == "mid_block":
            place, block, level = "mid", 0, n_down - 1
        else:
            continue
        layers.append(AttentionLayer(name, place, block, level, cross))
    order = {p: i for i, p in enumerate(PLACES)}
    return sorted(layers, key=lambda l: order[l.place])  # forward order: down, mid, up (stable within)


def select_layers(layers: Iterable[AttentionLayer], places: Sequence[str] | None = None,
                  levels: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
                  names: Sequence[str] | None = None) -> list[AttentionLayer]:
    """The layers matching every given filter (None = no filter on that field)."""
    if places is not None:
        bad = set(places) - set(PLACES)
        if bad:
            raise ValueError(f"unknown U-Net place(s) {sorted(bad)}; use {PLACES}")
    out = [l for l in layers
           if (places is None or l.place in places) and (levels is None or l.level in levels)
           and (blocks is None or l.block in blocks) and (names is None or l.name in names)]
    return out


def level_size(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size of a level: ceil-halved ``level`` times (diffusers' stride-2 conv with padding 1)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def one_hot_tokens(batch: int, positions: Sequence[int] | Sequence[Sequence[int]], seq_len: int,
                   device=None) -> torch.Tensor:
    """B×K×L token weights: K queries per item, each the MEAN over its listed token positions.

    ``positions``: ints (one single-token query each, shared by the batch) or lists of ints (one multi-token
    query each, e.g. a phrase).
    """
    queries = [[p] if isinstance(p, int) else list(p) for p in positions]
    w = torch.zeros(len(queries), seq_len, device=device)
    for k, pos in enumerate(queries):
        if not pos:
            raise ValueError(f"query {k} has no token positions")
        w[k, pos] = 1.0 / len(pos)
    return w.unsqueeze(0).expand(batch, -1, -1).contiguous()


class RecordingAttnProcessor:
    """An attention processor (same maths as diffusers' ``AttnProcessor``) that hands the probabilities to
    its recorder. Scores and softmax are computed in the recorder's ``softmax_dtype`` (None: the module's
    dtype, as diffusers' own processor without ``upcast_softmax``)."""

    def __init__(self, recorder: "AttentionRecorder", layer: AttentionLayer) -> None:
        self.recorder = recorder
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        hw = None
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hw = (height, width)
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        b = query.shape[0]
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(b, -1, heads, head_dim).transpose(1, 2)
        k = key.view(b, -1, heads, head_dim).transpose(1, 2)
        v = value.view(b, -1, heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        dt = self.recorder.softmax_dtype or q.dtype
        scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.view(b, heads, -1, attention_mask.shape[-1]).to(dt)
        probs = scores.softmax(dim=-1)  # B×heads×N×L
        out = torch.matmul(probs.to(v.dtype), v)
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, *hw)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self.recorder._record(self.layer, probs, hw)
        return out


class AttentionRecorder:
    """Installs ``RecordingAttnProcessor`` on ``layers`` of ``unet`` (a context manager; ``detach`` restores
    the original processors).

    ``token_weights``: None (store every key token) or a B×K×L (or K×L, shared) weight matrix; the stored
    map of each layer is then ``probs @ weights`` → B×K×h×w. ``reduce_heads``: average over heads before
    storing (else B×heads×K×h×w). ``accumulate``: repeated forwards add up (``maps()`` returns the mean
    over calls); otherwise each forward overwrites. ``stop_after_last``: raise ``EarlyStop`` once all layers
    are recorded in a forward (use ``run`` to call the U-Net and swallow it). ``softmax_dtype``: the dtype of
    the recorded layers' scores and softmax (float32 by default; None: the U-Net's own dtype, e.g. float16).
    """

    def __init__(self, unet, layers: Sequence[AttentionLayer], *, token_weights: torch.Tensor | None = None,
                 reduce_heads: bool = True, accumulate: bool = False, stop_after_last: bool = False,
                 store_dtype: torch.dtype = torch.float32, softmax_dtype: torch.dtype | None = torch.float32) -> None:
        if not layers:
            raise ValueError("no attention layers selected to record")
        self.unet = unet
        self.layers = list(layers)
        self.token_weights = token_weights
        self.reduce_heads = reduce_heads
        self.accumulate = accumulate
        self.stop_after_last = stop_after_last
        self.store_dtype = store_dtype
        self.softmax_dtype = softmax_dtype
        self._originals: dict[str, object] = {}
        self._hook = None
        self._latent_hw: tuple[int, int] | None = None
        self._seen: set[str] = set()
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    # -- install / remove --
    def attach(self) -> "AttentionRecorder":
        if self._originals:
            return self
        for layer in self.layers:
            module = self.unet.get_submodule(layer.name)
            self._originals[layer.name] = module.processor
            module.set_processor(RecordingAttnProcessor(self, layer))
        self._hook = self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def detach(self) -> None:
        for name, proc in self._originals.items():
            self.unet.get_submodule(name).set_processor(proc)
        self._originals = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "AttentionRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _pre_forward(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self._latent_hw = tuple(sample.shape[-2:])
        self._seen = set()
        return None

    # -- storage --
    def reset(self) -> None:
        self._sum, self._count, self._seen = {}, {}, set()

    def set_token_weights(self, weights: torch.Tensor | None) -> None:
        self.token_weights = weights

    def maps(self) -> dict[str, torch.Tensor]:
        """{layer name: recorded map}; with ``accumulate`` the mean over the recorded forwards."""
        return {name: (s / self._count[name] if self.accumulate else s) for name, s in self._sum.items()}

    def run(self, *args, **kwargs):
        """Call the U-Net; returns its output, or None when ``stop_after_last`` ended it early."""
        try:
            return self.unet(*args, **kwargs)
        except EarlyStop:
            return None

    def _spatial(self, layer: AttentionLayer, n: int, hw: tuple[int, int] | None) -> tuple[int, int]:
        if hw is not None and hw[0] * hw[1] == n:
            return hw
        if self._latent_hw is not None:
            h, w = level_size(self._latent_hw, layer.level)
            if h * w == n:
                return h, w
        side = int(round(math.sqrt(n)))
        if side * side == n:
            return side, side
        raise ValueError(f"{layer.name}: cannot infer the spatial size of {n} query positions "
                         f"(latent {self._latent_hw}, level {layer.level})")

    def _record(self, layer: AttentionLayer, probs: torch.Tensor, hw: tuple[int, int] | None) -> None:
        b, heads, n, seq = probs.shape
        h, w = self._spatial(layer, n, hw)
        weights = self.token_weights
        if weights is not None:
            weights = weights.to(device=probs.device, dtype=probs.dtype)
            if weights.ndim == 2:
                weights = weights.unsqueeze(0).expand(b, -1, -1)
            if weights.shape[0] != b or weights.shape[-1] != seq:
                raise ValueError(f"token_weights has shape {tuple(weights.shape)} but the attention at "
                                 f"{layer.name} has batch {b} and {seq} key tokens")
            sel = torch.einsum("bhnl,bkl->bhkn", probs, weights)
        else:
            sel = probs.transpose(-1, -2)  # B×heads×L×N
        sel = sel.to(self.store_dtype)  # the head mean in the storage precision
        if self.reduce_heads:
            sel = sel.mean(dim=1)
        sel = sel.reshape(*sel.shape[:-1], h, w)
        if self.accumulate and layer.name in self._sum:
            self._sum[layer.name] = self._sum[layer.name] + sel
            self._count[layer.name] += 1
        else:
            self._sum[layer.name] = sel
            self._count[layer.name] = 1
        self._seen.add(layer.name)
        if self.stop_after_last and len(self._seen) == len(self.layers):
            raise EarlyStop()
