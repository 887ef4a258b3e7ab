"""MMCST: multi-modal class-specific tokens for weakly supervised dense object localization.

Xu, Ouyang, Bennamoun, Boussaid, Xu — "Learning Multi-Modal Class-Specific Tokens for Weakly Supervised Dense
Object Localization", CVPR 2023. Built on MCTformer (Xu et al., CVPR 2022), whose conventions hold where the
paper is silent (see /work/shared/reference/methods.md).

Architecture (``MMCSTNet``)
    A timm ViT (its own ``patch_embed``, ``blocks`` and ``norm`` modules with their pretrained weights — not a
    copy) reads the sequence ``[C class tokens | C text tokens | N patch tokens]`` + learned positional
    embeddings:

    * class tokens: C copies of the pretrained class token (and of its position embedding), as MCTformer;
    * text tokens: the frozen CLIP text embeddings of ``"a photo of <class>"`` (a buffer, ``text_embed``),
      mapped to the ViT width by a **learned linear layer** ``text_proj`` (identity when the CLIP and ViT
      widths are equal), plus their own learned position embeddings (initialised like the class tokens');
    * masked self-attention: the class-token group and the text-token group do not attend to each other
      (every other pair may attend, patches attend to all tokens), so the two modalities do not compete in
      one softmax. timm's ``Attention`` has no mask argument in every version, so ``masked_block_forward``
      runs each timm ``Block`` through its own submodules (norm1, attn.qkv, attn.proj, ls1, drop_path1, norm2,
      mlp, ls2, drop_path2) and also returns the head-averaged attention weights of every layer.

Heads and losses (all multi-label soft margin, MLSM)
    * L_cls: class scores = output class tokens averaged over channels (MCTformer; final norm not applied);
    * token fusion with learnable scalars: T_txt = T_txt_in + λ1·T_txt_out, T_cls = T_cls_in + λ2·T_cls_out;
    * patch tokens → ``patch_proj`` (linear, the paper's "linearly projected", or a 3×3 conv) → F (B×N×D);
      C_t2p = F·T_txtᵀ and C_c2p = F·T_clsᵀ (divided by √D so the logits start in a sane range — our choice,
      the paper does not say how the dot products are scaled), each pooled
      to class scores with global weighted ranking pooling (``gwrp``; decay 0.996, or GAP) → L_t2p, L_c2p;
    * L_contrast: the per-image mean of the output text tokens, mapped to the CLIP width by a learned linear
      layer ``contrast_proj`` (identity when widths match), against the frozen CLIP image embeddings of the
      batch: cosine-similarity matrix S (B×B) / temperature (0.07, CLIP's initial value; the paper gives none),
      cross-entropy with the identity as target (text → image rows);
    * L_total = L_cls + L_t2p + L_c2p + L_contrast (each weight configurable; 0 switches a term off).

    * optional (``model.patch_cam``): MCTformer-V2's class head, a 3×3 conv from the patch tokens to C maps whose
      average-pooled scores get their own MLSM loss; its map ``patchcam`` is V2's fused map.

Inference
    C_mm = C_t2p + C_c2p; M̂ = ReLU(C_mm) ∘ A_c2p (class-to-patch attention, head-mean, summed over the last
    ``infer.attn_layers`` layers); M = A_p2p · M̂ (patch-to-patch attention summed over all layers, the
    MCTformer refinement); bilinear upsampling; multi-scale + flip sum; per-class min-max. With
    ``infer.resolution: native`` (the paper profile) every image is processed at its own size as MCTformer's
    map generation does (``mctformer_inputs``: PIL bicubic scales, flips; maps at the image's H×W), the position
    embeddings interpolated as DINO/MCTformer (``interpolate_pos_dino``); ``square`` resizes to input_size².
    ``localize`` returns all C maps (``multi``) or the requested classes' (``single``) and the class scores.

Ablation switches (paper Tables 5/6): ``model.text_tokens`` (+text tokens), ``model.class_patch`` (+C2P),
``loss.pooling`` (GAP vs GWRP), ``model.token_source`` (input = global class representation only, output =
sample-specific/local only, fused = both with λ), ``loss.contrast`` (0 = contrastive loss off),
``model.mask_groups`` (masked attention), ``infer.map`` / ``infer.refine`` / ``infer.fuse_attention``.
With ``text_tokens: false`` and ``class_patch: false`` this is MCTformer-V1 ("attention only"); adding
``patch_cam: true`` and ``infer.map: patchcam`` gives MCTformer-V2.

Checkpoints: ``model.safetensors`` via ``Localizer.save``; files of other code (``--checkpoint FILE``) with
``MMCST.load_foreign``: MCTformer-V1 / -V2 / MCTformer+ ``{'model': state_dict}`` files, plain timm/DeiT ViTs and
MMCST state dicts, recognised by their keys (``checkpoint_layout``), adapted (``adapt_vit_state_dict``) and loaded
exactly (``wsolbench.checkpoint.load_exact``): nothing is left at its initial value unless ``load.partial``
names it, and the run records the ``LoadReport``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsolbench.checkpoint import CheckpointError
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method

log = logging.getLogger(__name__)

MAP_VARIANTS = ("mm", "t2p", "c2p", "attn", "patchcam")
TOKEN_SOURCES = ("input", "output", "fused")
LOSS_TERMS = ("cls", "text_patch", "class_patch", "contrast", "patch_cam")  # loss.<term>: its weight
# VOC's compound class names read better to a text encoder as words
PROMPT_NAMES = {"aeroplane": "aeroplane", "diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor", "motorbike": "motorbike"}


# ============================================================================ building blocks (pure)
def gwrp(x: torch.Tensor, decay: float = 0.996, dim: int = -1) -> torch.Tensor:
    """Global weighted ranking pooling: Σ_j d^(j-1)·x_(j) / Σ_j d^(j-1), x_(j) sorted descending along ``dim``.

    decay 1 → the mean (GAP); decay → 0 → the max.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"gwrp decay must be in [0, 1], got {decay}")
    xs = x.sort(dim=dim, descending=True).values
    n = xs.shape[dim]
    w = torch.pow(torch.tensor(float(decay), dtype=torch.float64), torch.arange(n, dtype=torch.float64))
    w = (w / w.sum()).to(xs.dtype).to(xs.device)
    shape = [1] * xs.ndim
    shape[dim] = n
    return (xs * w.view(shape)).sum(dim=dim)


def pool_scores(maps: torch.Tensor, pooling: str, decay: float) -> torch.Tensor:
    """B×C×h×w (or B×C×N) correlation maps → B×C scores by ``gwrp`` or ``gap``."""
    flat = maps.flatten(2)
    if pooling == "gwrp":
        return gwrp(flat, decay, dim=-1)
    if pooling == "gap":
        return flat.mean(-1)
    raise ValueError(f"loss.pooling must be 'gwrp' or 'gap', got {pooling!r}")


def group_attention_mask(num_classes: int, num_text: int, num_patches: int,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean T×T mask (True = row token may attend to column token), T = C + C_t + N.

    Blocks exactly the attention between the class-token group and the text-token group (both directions);
    tokens attend within their own group, to and from the patches.
    """
    t = num_classes + num_text + num_patches
    allowed = torch.ones(t, t, dtype=torch.bool, device=device)
    c, ct = num_classes, num_text
    allowed[:c, c:c + ct] = False
    allowed[c:c + ct, :c] = False
    return allowed


def masked_block_forward(block: nn.Module, x: torch.Tensor, allowed: torch.Tensor | None = None,
                         need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ViT ``Block`` with an attention mask, through the block's own submodules and weights.

    ``allowed``: T×T bool (True = may attend) or None. Returns (output, head-averaged attention B×T×T or None).
    Equals ``block(x)`` when ``allowed`` is None.
    """
    attn = getattr(block, "attn", None)
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")) or \
            not all(hasattr(block, a) for a in ("norm1", "norm2", "mlp")):
        raise TypeError(f"masked attention needs a timm ViT Block with a fused-qkv Attention, got "
                        f"{type(block).__name__}/{type(attn).__name__}")
    b, t, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = getattr(attn, "q_norm", nn.Identity())(q)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    scale = getattr(attn, "scale", head_dim ** -0.5)
    weights = None
    if need_weights:
        logits = (q * scale) @ k.transpose(-2, -1)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)
        weights = probs.mean(dim=1)
        o = attn.attn_drop(probs) @ v
    else:
        drop = attn.attn_drop.p if (attn.training and hasattr(attn.attn_drop, "p")) else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop, scale=scale)
    o = o.transpose(1, 2).reshape(b, t, heads * head_dim)
    o = getattr(attn, "norm", nn.Identity())(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, weights


def contrastive_loss(text_feats: torch.Tensor, image_feats: torch.Tensor, temperature: float = 0.07
                     ) -> torch.Tensor:
    """B text vectors vs B image vectors: cosine similarity S (B×B) / temperature, CE with the identity target."""
    if text_feats.shape != image_feats.shape:
        raise ValueError(f"contrastive loss needs equal shapes, got {tuple(text_feats.shape)} and "
                         f"{tuple(image_feats.shape)}")
    s = F.normalize(text_feats, dim=-1) @ F.normalize(image_feats, dim=-1).t() / temperature
    return F.cross_entropy(s, torch.arange(s.shape[0], device=s.device))


def _interpolate_grid_pos(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings 1×(h·w)×D resized bicubically to a new grid (adapting a checkpoint's grid)."""
    if tuple(old) == tuple(new):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)


def interpolate_pos_dino(pos: torch.Tensor, grid: tuple[int, int], new: tuple[int, int], square_input: bool
                         ) -> torch.Tensor:
    """Patch position embeddings 1×(h·w)×D for an input whose patch grid is ``new``, as MCTformer (after DINO).

    Bicubic with ``scale_factor = (n + 0.1) / side`` per axis (the 0.1 keeps the output size's floor at n), not
    ``size=``: the interpolation weights follow the scale factor, so the two differ. Unchanged only when the
    grid matches and the input is square, as in MCTformer's ``interpolate_pos_encoding``.
    """
    if tuple(new) == tuple(grid) and square_input:
        return pos
    d = pos.shape[-1]
    g = pos.reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, scale_factor=((new[0] + 0.1) / grid[0], (new[1] + 0.1) / grid[1]), mode="bicubic")
    if tuple(g.shape[-2:]) != tuple(new):
        raise RuntimeError(f"position-embedding interpolation gave a {tuple(g.shape[-2:])} grid for {tuple(new)}")
    return g.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)


# ============================================================================ the network
class MMCSTNet(nn.Module):
    """The MMCST transformer around a timm ``VisionTransformer`` (see the module docstring).

    State-dict keys keep timm's names (``patch_embed.*``, ``blocks.i.*``, ``norm.*``) plus MCTformer's
    ``cls_token`` [1,C,D] and ``pos_embed`` [1,C+N,D]; the MMCST parts are ``text_embed`` (buffer),
    ``text_proj``, ``text_pos_embed``, ``lambda_text`` (λ1), ``lambda_cls`` (λ2), ``patch_proj`` and
    ``contrast_proj``.
    """

    def __init__(self, vit: nn.Module, num_classes: int, text_dim: int, clip_dim: int | None = None, *,
                 text_tokens: bool = True, class_patch: bool = True, mask_groups: bool = True,
                 token_source: str = "fused", lambda_init: float = 1.0, patch_proj: str = "conv3",
                 final_norm: bool = False, patch_cam: bool = False, text_proj: str = "learned",
                 text_scale: float = 1.0) -> None:
        super().__init__()
        for attr in ("patch_embed", "blocks", "cls_token", "pos_embed"):
            if getattr(vit, attr, None) is None:
                raise TypeError(f"MMCST needs a timm VisionTransformer with a class token and absolute position "
                                f"embeddings; {type(vit).__name__} has no {attr!r}")
        if getattr(vit, "no_embed_class", False) or getattr(vit, "reg_token", None) is not None:
            raise TypeError("MMCST expects a ViT whose pos_embed covers the class token and no register tokens")
        if token_source not in TOKEN_SOURCES:
            raise ValueError(f"model.token_source must be one of {TOKEN_SOURCES}, got {token_source!r}")
        c = int(num_classes)
        if c <= 0:
            raise ValueError("MMCST needs at least one class")
        self.num_classes = c
        self.use_text = bool(text_tokens)
        self.use_c2p = bool(class_patch)
        self.mask_groups = bool(mask_groups)
        self.token_source = token_source
        self.final_norm = bool(final_norm)
        # timm modules reused with their (pretrained) weights
        self.patch_embed = vit.patch_embed
        self.pos_drop = getattr(vit, "pos_drop", nn.Identity())
        self.blocks = vit.blocks
        self.norm = getattr(vit, "norm", nn.Identity())
        d = int(vit.embed_dim)
        self.embed_dim = d
        self.patch_size = tuple(self.patch_embed.proj.kernel_size) if hasattr(self.patch_embed, "proj") else (16, 16)
        self.grid_size = tuple(int(g) for g in self.patch_embed.grid_size)
        pos = vit.pos_embed.detach()
        cls_pos = pos[:, :1]
        # MCTformer: C class tokens made by repeating the pretrained class token and its position embedding
        self.cls_token = nn.Parameter(vit.cls_token.detach()[:, :1].repeat(1, c, 1).clone())
        self.pos_embed = nn.Parameter(torch.cat([cls_pos.repeat(1, c, 1), pos[:, 1:]], dim=1).clone())
        self.text_dim = int(text_dim)
        self.clip_dim = int(clip_dim or text_dim)
        self.text_scale = float(text_scale)
        if text_proj not in ("learned", "frozen"):
            raise ValueError(f"model.text_proj must be 'learned' or 'frozen', got {text_proj!r}")
        if self.use_text:
            self.register_buffer("text_embed", torch.zeros(c, self.text_dim))
            self.text_proj = nn.Linear(self.text_dim, d) if self.text_dim != d else nn.Identity()
            self.text_proj.requires_grad_(text_proj == "learned")
            self.text_pos_embed = nn.Parameter(cls_pos.repeat(1, c, 1).clone())
            self.lambda_text = nn.Parameter(torch.tensor(float(lambda_init)))
            self.contrast_proj = nn.Linear(d, self.clip_dim) if self.clip_dim != d else nn.Identity()
        if self.use_text or self.use_c2p:
            if patch_proj == "conv3":
                self.patch_proj = nn.Conv2d(d, d, kernel_size=3, padding=1)
            elif patch_proj == "linear":
                self.patch_proj = nn.Conv2d(d, d, kernel_size=1)
            else:
                raise ValueError(f"model.patch_proj must be 'conv3' or 'linear', got {patch_proj!r}")
            nn.init.trunc_normal_(self.patch_proj.weight, std=0.02)
            nn.init.zeros_(self.patch_proj.bias)
        if self.use_c2p:
            self.lambda_cls = nn.Parameter(torch.tensor(float(lambda_init)))
        self.use_patch_cam = bool(patch_cam)
        if self.use_patch_cam:  # MCTformer-V2's class head: C class maps from the patch tokens (3x3 conv)
            self.head = nn.Conv2d(d, c, kernel_size=3, padding=1)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def new_parts(self) -> tuple[str, ...]:
        """Names of the tensors a pretrained ViT does not have (initialised here, learned in training)."""
        names = ("text_embed", "text_proj", "text_pos_embed", "lambda_text", "contrast_proj", "patch_proj",
                 "lambda_cls", "head")
        own = self.state_dict()
        return tuple(n for n in names if any(k == n or k.startswith(n + ".") for k in own))

    # ---- sequence layout -------------------------------------------------------------------------------
    @property
    def num_text(self) -> int:
        return self.num_classes if self.use_text else 0

    def attention_mask(self, num_patches: int, device=None) -> torch.Tensor | None:
        if not (self.use_text and self.mask_groups):
            return None
        return group_attention_mask(self.num_classes, self.num_text, num_patches, device=device)

    def text_tokens_in(self) -> torch.Tensor:
        """T_txt_in: the CLIP text embeddings (× ``text_scale``) in the ViT width (C×D)."""
        return self.text_proj(self.text_embed * self.text_scale)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        pe = self.patch_embed
        p = pe.proj(x)  # B×D×h×w: timm's own patch projection (any input size divisible by the patch)
        gh, gw = p.shape[-2:]
        p = p.flatten(2).transpose(1, 2)
        p = getattr(pe, "norm", nn.Identity())(p)
        c = self.num_classes
        patch_pos = interpolate_pos_dino(self.pos_embed[:, c:], self.grid_size, (gh, gw), x.shape[-1] == x.shape[-2])
        b = x.shape[0]
        parts = [self.cls_token.expand(b, -1, -1) + self.pos_embed[:, :c]]
        if self.use_text:
            txt = (self.text_tokens_in().unsqueeze(0) + self.text_pos_embed).expand(b, -1, -1)
            parts.append(txt)
        parts.append(p + patch_pos)
        return self.pos_drop(torch.cat(parts, dim=1)), (int(gh), int(gw))

    def _fuse(self, t_in: torch.Tensor, t_out: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if self.token_source == "input":
            return t_in.expand_as(t_out)
        if self.token_source == "output":
            return t_out
        return t_in + lam * t_out

    def forward(self, x: torch.Tensor, need_attn: bool = False) -> dict[str, Any]:
        """Returns logits (B×C), the output token groups, correlation maps t2p/c2p (B×C×h×w or None), the
        patch grid and (``need_attn``) the head-averaged attention of every layer (list of B×T×T)."""
        tokens, (gh, gw) = self._embed(x)
        allowed = self.attention_mask(gh * gw, device=x.device)
        attns = []
        for blk in self.blocks:
            tokens, w = masked_block_forward(blk, tokens, allowed, need_weights=need_attn)
            if need_attn:
                attns.append(w)
        if self.final_norm:
            tokens = self.norm(tokens)
        c, ct = self.num_classes, self.num_text
        cls_out, txt_out, patch_out = tokens[:, :c], tokens[:, c:c + ct], tokens[:, c + ct:]
        out: dict[str, Any] = {"logits": cls_out.mean(-1), "cls_out": cls_out, "txt_out": txt_out if ct else None,
                               "grid": (gh, gw), "attn": attns if need_attn else None, "t2p": None, "c2p": None,
                               "patchcam": None}
        b, n, d = patch_out.shape
        grid = patch_out.transpose(1, 2).reshape(b, d, gh, gw)
        if self.use_patch_cam:  # MCTformer-V2: class maps and their average-pooled scores
            out["patchcam"] = self.head(grid)
            out["patch_logits"] = out["patchcam"].mean((-2, -1))
        if self.use_text or self.use_c2p:
            fmap = self.patch_proj(grid).flatten(2).transpose(1, 2)
            scale = d ** -0.5
            if self.use_text:
                t_txt = self._fuse(self.text_tokens_in().unsqueeze(0), txt_out, self.lambda_text)
                out["t2p"] = torch.einsum("bnd,bcd->bcn", fmap, t_txt).mul(scale).reshape(b, c, gh, gw)
            if self.use_c2p:
                t_cls = self._fuse(self.cls_token, cls_out, self.lambda_cls)
                out["c2p"] = torch.einsum("bnd,bcd->bcn", fmap, t_cls).mul(scale).reshape(b, c, gh, gw)
        return out

    # ---- losses ----------------------------------------------------------------------------------------
    def losses(self, out: dict, target: torch.Tensor, image_embed: torch.Tensor | None = None, *,
               weights: dict | None = None, pooling: str = "gwrp", decay: float = 0.996,
               temperature: float = 0.07) -> dict[str, torch.Tensor]:
        """L_total and its terms; ``target`` is B×C multi-hot; ``image_embed`` B×clip_dim (contrastive term)."""
        w = {**dict.fromkeys(LOSS_TERMS, 1.0), **(weights or {})}
        target = target.float()
        terms: dict[str, torch.Tensor] = {}
        if w["cls"]:
            terms["cls"] = F.multilabel_soft_margin_loss(out["logits"], target)
        if out.get("t2p") is not None and w["text_patch"]:
            terms["text_patch"] = F.multilabel_soft_margin_loss(pool_scores(out["t2p"], pooling, decay), target)
        if out.get("c2p") is not None and w["class_patch"]:
            terms["class_patch"] = F.multilabel_soft_margin_loss(pool_scores(out["c2p"], pooling, decay), target)
        if out.get("patchcam") is not None and w["patch_cam"]:  # MCTformer-V2's patch-head loss
            terms["patch_cam"] = F.multilabel_soft_margin_loss(out["patch_logits"], target)
        if out.get("txt_out") is not None and w["contrast"] and image_embed is not None:
            z = self.contrast_proj(out["txt_out"].mean(1))
            terms["contrast"] = contrastive_loss(z, image_embed.to(z.dtype), temperature)
        if not terms:
            raise ValueError("every loss term is switched off")
        total = sum(float(w[k]) * v for k, v in terms.items())
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    # ---- localization maps -----------------------------------------------------------------------------
    def maps(self, out: dict, variant: str = "mm", *, attn_layers: int = 3, fuse_attention: bool = True,
             refine: bool = True, relu: bool = True) -> torch.Tensor:
        """Raw localization maps B×C×h×w from a ``forward(..., need_attn=True)`` output.

        ``patchcam`` with ``fuse_attention`` is MCTformer-V2's fused map (ReLU(head) × A_c2p)."""
        if variant not in MAP_VARIANTS:
            raise ValueError(f"infer.map must be one of {MAP_VARIANTS}, got {variant!r}")
        attns = out["attn"]
        if attns is None:
            raise ValueError("maps() needs forward(..., need_attn=True)")
        c, ct = self.num_classes, self.num_text
        gh, gw = out["grid"]
        stacked = torch.stack(attns)  # L×B×T×T
        n_last = max(1, min(int(attn_layers), stacked.shape[0]))
        a_c2p = stacked[-n_last:, :, :c, c + ct:].sum(0)  # B×C×N
        a_p2p = stacked[:, :, c + ct:, c + ct:].sum(0)  # B×N×N
        if variant == "mm":
            present = [m for m in (out.get("t2p"), out.get("c2p")) if m is not None]
            base = sum(present) if present else None
        elif variant == "attn":
            base = None
        else:
            base = out.get(variant)
            if base is None:
                raise ValueError(f"map {variant!r} needs the corresponding head (model.text_tokens / "
                                 "model.class_patch / model.patch_cam are off)")
        if base is None:
            m = a_c2p
        else:
            m = F.relu(base.flatten(2)) if relu else base.flatten(2)
            if fuse_attention:
                m = m * a_c2p
        if refine:
            m = torch.einsum("bik,bck->bci", a_p2p, m)
        return m.reshape(m.shape[0], c, gh, gw)


# ============================================================================ state-dict adaptation
@dataclass
class AdaptedState:
    """A checkpoint's tensors renamed/reshaped for ``MMCSTNet``, with what was dropped or reshaped and why."""

    state: dict[str, torch.Tensor]
    layout: str  # vit | mctformer-v1 | mctformer-v2 | mctformer-plus | mmcst
    ignored: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)


def mctformer_settings(adapted: AdaptedState) -> str | None:
    """The ``--set`` overrides that build the model an MCTformer file was written for (None for other layouts)."""
    if not adapted.layout.startswith("mctformer"):
        return None
    width = int(adapted.state["cls_token"].shape[-1])
    backbone = {384: "deit-s16", 768: "deit-b16"}.get(width, f"<a ViT of width {width}>")
    head = "model.patch_cam=false infer.map=attn" if adapted.layout == "mctformer-v1" else \
        "model.patch_cam=true infer.map=patchcam"
    return f"model.backbone.name={backbone} model.text_tokens=false model.class_patch=false {head}"


def checkpoint_layout(state: dict[str, Any]) -> str:
    """Which code wrote ``state`` (an unwrapped state dict), from its keys and shapes only."""
    if "pos_embed_cls" in state and "pos_embed_pat" in state:
        return "mctformer-plus"  # MCTformer+ (xulianuwa/MCTformer HEAD): class and patch position embeddings apart
    if any(k in state for k in ("text_embed", "text_proj.weight", "patch_proj.weight", "lambda_cls")):
        return "mmcst"
    cls = state.get("cls_token")
    if cls is None or cls.ndim != 3:
        return "unknown"
    if cls.shape[1] == 1:
        return "vit"  # a plain ViT (timm / DeiT): one class token
    head = state.get("head.weight")
    return "mctformer-v2" if head is not None and head.ndim == 4 else "mctformer-v1"


def _grid_side(n: int, where: str, name: str) -> int:
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise CheckpointError(f"{where}: {name} holds {n} patch positions, not a square grid")
    return side


def adapt_vit_state_dict(state: dict[str, Any], net: MMCSTNet, where: str = "checkpoint") -> AdaptedState:
    """A timm-ViT / MCTformer-V1, -V2, + / MMCST state dict → the tensors ``net`` holds, for ``load_exact``.

    Unwraps ``{'model': ...}`` and ``module.`` prefixes. The class-token count comes from ``cls_token`` (never
    guessed from ``pos_embed``'s length): one (a plain ViT) is repeated for the C class tokens with its position
    embedding, as MCTformer initialises; MCTformer+'s trained ``pos_embed_cls``/``pos_embed_pat`` form the
    position embeddings (its inherited ``pos_embed`` is never used by its forward); a patch grid other than the
    net's is resized bicubically (recorded). Tensors the source model never uses are dropped with the reason
    (a plain ViT's ImageNet classifier, MCTformer-V1's ``head``); everything else is left for ``load_exact`` to
    match or refuse. Raises ``CheckpointError`` for class counts or layouts that cannot fit.
    """
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items() if torch.is_tensor(v)}
    layout = checkpoint_layout(state)
    if layout == "unknown":
        raise CheckpointError(f"{where}: not a ViT/MCTformer/MMCST state dict (no cls_token [1,n,D]); keys "
                              f"start {sorted(state)[:4]}")
    c = net.num_classes
    res = AdaptedState(dict(state), layout)
    out = res.state
    if layout == "mmcst":
        return res
    n_cls = int(state["cls_token"].shape[1])
    if n_cls not in (1, c):
        raise CheckpointError(f"{where}: the file has {n_cls} class tokens ({layout}), the model {c} classes; "
                              "load it with the dataset it was trained on")
    if n_cls == 1:
        out["cls_token"] = state["cls_token"].repeat(1, c, 1)
        res.adapted["cls_token"] = f"the one class token repeated for {c} classes"
    if layout == "mctformer-plus":
        res.ignored["pos_embed"] = "MCTformer+ never uses pos_embed (it adds pos_embed_cls and pos_embed_pat)"
        del out["pos_embed"]
        prefix, grid = out.pop("pos_embed_cls"), out.pop("pos_embed_pat")
        res.adapted["pos_embed"] = "pos_embed_cls and pos_embed_pat, concatenated"
    elif "pos_embed" in state:
        pos = state["pos_embed"]
        if pos.shape[1] <= n_cls:
            raise CheckpointError(f"{where}: pos_embed {tuple(pos.shape)} has no patch positions after the "
                                  f"{n_cls} class token(s)")
        prefix, grid = pos[:, :n_cls], pos[:, n_cls:]
        if n_cls == 1:
            prefix = prefix.repeat(1, c, 1)
            res.adapted["pos_embed"] = f"the class token's position embedding repeated for {c} classes"
    else:
        prefix = grid = None
    if grid is not None:
        side = _grid_side(grid.shape[1], where, "pos_embed")
        if (side, side) != tuple(net.grid_size):
            grid = _interpolate_grid_pos(grid, (side, side), net.grid_size)
            how = f"patch grid {side}x{side} resized to {net.grid_size[0]}x{net.grid_size[1]} (bicubic)"
            res.adapted["pos_embed"] = "; ".join(filter(None, [res.adapted.get("pos_embed"), how]))
        out["pos_embed"] = torch.cat([prefix, grid], dim=1)
    head = state.get("head.weight")
    if head is not None:
        if layout == "vit":
            reason = "the ViT's ImageNet classifier (MMCST scores classes from its class tokens)"
        elif layout == "mctformer-v1" and head.ndim == 2:
            reason = "MCTformer-V1's forward never uses head (class scores are the class tokens' mean)"
        elif layout == "mctformer-v1":
            raise CheckpointError(f"{where}: an MCTformer-V1 head of shape {tuple(head.shape)} (last_opt='fc') "
                                  "is not supported; only the default last_opt='average' is")
        else:
            reason = None  # V2 / MCTformer+ class head: the model's patch_cam head (load_exact checks it)
        if reason:
            for k in ("head.weight", "head.bias"):
                if out.pop(k, None) is not None:
                    res.ignored[k] = reason
    return res


# ============================================================================ CLIP access
class ClipEncoder:
    """A frozen CLIP: text embeddings of prompts and image embeddings of ViT-normalised batches."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_size: int, mean, std) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def embed_dim(self) -> int:
        for attr in ("embed_dim", "output_dim"):
            v = getattr(self.model, attr, None) or getattr(getattr(self.model, "visual", None), attr, None)
            if isinstance(v, int):
                return v
        with torch.no_grad():
            return int(self.encode_text(["a"]).shape[-1])

    def to(self, device) -> "ClipEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts))
        if isinstance(tokens, dict) or hasattr(tokens, "input_ids"):
            tokens = tokens["input_ids"]
        return self.model.encode_text(tokens.to(dev)).float()

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, mean, std) -> torch.Tensor:
        """``x``: B×3×H×W normalised with (mean, std) → CLIP image embeddings (B×E)."""
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        raw = (x * s + m).clamp(0, 1)
        if raw.shape[-1] != self.image_size or raw.shape[-2] != self.image_size:
            raw = F.interpolate(raw, size=(self.image_size, self.image_size), mode="bicubic",
                                align_corners=False).clamp(0, 1)
        cm = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        cs = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        dev = next(self.model.parameters()).device
        return self.model.encode_image(((raw - cm) / cs).to(dev)).float()


def _open_clip_encoder(model: nn.Module, arch: str, context_length: int | None = None) -> ClipEncoder:
    import open_clip

    pp = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    size = pp.get("size", getattr(getattr(model, "visual", None), "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx = context_length or getattr(model, "context_length", None)
    tok = open_clip.get_tokenizer(arch, context_length=ctx) if ctx else open_clip.get_tokenizer(arch)
    return ClipEncoder(model, tok, size, pp.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                       pp.get("std", (0.26862954, 0.26130258, 0.27577711)))


# ============================================================================ real weights (paper profile)
def timm_arch(name: str) -> str:
    """The timm model name of ``name``: a ``wsolbench.weights`` catalogue name (e.g. ``vit-b16``) or a timm name."""
    from wsolbench import weights

    spec = weights.CATALOGUE.get(name)
    return spec.source if spec is not None else name


def create_real_open_clip(arch: str, tag: str, path: str | None = None, kwargs: dict | None = None) -> nn.Module:
    """open_clip ``arch`` with the weights ``tag`` (e.g. ViT-B-16 / openai) found offline, through THE CLIP
    loader ``wsolbench.weights.load_open_clip`` (QuickGELU for OpenAI weights, TorchScript archives)."""
    from wsolbench import weights

    return weights.load_open_clip(arch, tag, path=path, **dict(kwargs or {}))[0]


# ============================================================================ the Localizer
@register_method("mmcst")
class MMCST(Localizer):
    """MMCST (Xu et al., CVPR 2023); see the module docstring. Capabilities: ``multi`` and ``single``."""

    capabilities = frozenset({Capability.MULTI, Capability.SINGLE})
    needs_training = True
    tiny_zoo = ("vit", "clip")
    pretrained = ("vit-b16", "deit-s16", "deit-b16", "clip-vit-b16-openai")

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        super().__init__(config, class_names, device)
        if not self.class_names:
            raise ValueError("MMCST needs the dataset's class names (one class/text token per class)")
        cfg = self.config
        self.mcfg = cfg.get("model", {})
        self.lcfg = cfg.get("loss", {})
        self.tcfg = cfg.get("train", {})
        self.icfg = cfg.get("infer", {})
        self.input_size = int(self.mcfg.get("input_size", 224))
        self._clip: ClipEncoder | None = None
        self._clip_pretrained = False
        vit = self._build_vit(pretrained=False)
        pcfg = getattr(vit, "pretrained_cfg", None) or {}
        self.mean = tuple(pcfg.get("mean", self.mean))
        self.std = tuple(pcfg.get("std", self.std))
        text_dim, clip_dim = self._clip_dims()
        m = self.mcfg
        self.model = MMCSTNet(vit, len(self.class_names), text_dim, clip_dim,
                              text_tokens=bool(m.get("text_tokens", True)),
                              class_patch=bool(m.get("class_patch", True)),
                              mask_groups=bool(m.get("mask_groups", True)),
                              token_source=str(m.get("token_source", "fused")),
                              lambda_init=float(m.get("lambda_init", 1.0)),
                              patch_proj=str(m.get("patch_proj", "linear")),
                              final_norm=bool(m.get("final_norm", False)),
                              patch_cam=bool(m.get("patch_cam", False)),
                              text_proj=str(m.get("text_proj", "learned")),
                              text_scale=float(m.get("text_scale", 1.0))).to(device)
        available = {"mm", "attn"} | ({"t2p"} if self.model.use_text else set()) | \
            ({"c2p"} if self.model.use_c2p else set()) | ({"patchcam"} if self.model.use_patch_cam else set())
        for v in [self.icfg.get("map", "mm")] + list(self.icfg.get("extras") or []):
            if v not in available:
                raise ValueError(f"infer map {v!r} is not available with this model (model.text_tokens="
                                 f"{self.model.use_text}, model.class_patch={self.model.use_c2p}, model.patch_cam="
                                 f"{self.model.use_patch_cam}); choose from {sorted(available)}")
        resolution = str(self.icfg.get("resolution", "native"))
        if resolution not in ("native", "square"):
            raise ValueError(f"infer.resolution must be 'native' or 'square', got {resolution!r}")
        self.maps_at_image_size = resolution == "native"
        if str(self.tcfg.get("select", "last")) not in ("last", "val_map"):
            raise ValueError(f"train.select must be 'last' or 'val_map', got {self.tcfg.get('select')!r}")
        ps = self.model.patch_size[0]
        if self.input_size % ps:
            raise ValueError(f"model.input_size {self.input_size} is not a multiple of the patch size {ps}")
        self._text_ready = False  # text_embed computed (fit/localize) or loaded
        self._trained = False

    # ---- construction helpers --------------------------------------------------------------------------
    def _build_vit(self, pretrained: bool) -> nn.Module:
        b = self.mcfg.get("backbone", {})
        source = b.get("source", "timm")
        if source == "timm":
            kwargs = {"num_classes": 0, "drop_path_rate": float(b.get("drop_path", 0.0)), "img_size": self.input_size,
                      **dict(b.get("kwargs") or {})}
            name = b.get("name", "vit-b16")
            if pretrained:  # real weights, offline (MissingWeightsError names the files and the fix)
                from wsolbench import weights

                return weights.load_timm(name, b.get("weights_path"), **kwargs)
            import timm

            return timm.create_model(timm_arch(name), pretrained=False, **kwargs)
        if source == "zoo":
            from wsolbench import zoo

            kwargs = {"num_classes": 0, "drop_path_rate": float(b.get("drop_path", 0.0)),
                      "img_size": self.input_size, **dict(b.get("kwargs") or {})}
            scale = b.get("scale", "tiny")
            if pretrained:
                return zoo.load_backbone("vit", scale, device="cpu", **kwargs)
            return zoo.create_backbone("vit", scale, seed=None, **kwargs)
        raise ValueError(f"model.backbone.source must be 'timm' or 'zoo', got {source!r}")

    def _clip_dims(self) -> tuple[int, int]:
        """(text embedding width, image embedding width) of the configured CLIP without loading weights."""
        if not self.mcfg.get("text_tokens", True):
            return 1, 1
        c = self.mcfg.get("clip", {})
        if c.get("source", "open_clip") == "open_clip":
            import open_clip

            arch = c.get("arch", "ViT-B-16")
            model_cfg = open_clip.get_model_config(arch)
            if model_cfg is None:
                raise ValueError(f"model.clip.arch {arch!r} is not an open_clip architecture")
            d = int((c.get("kwargs") or {}).get("embed_dim", model_cfg["embed_dim"]))
            return d, d
        if c.get("source") == "zoo":
            from wsolbench.zoo import spec

            d = int(spec(c.get("scale", "tiny"), "clip")["embed_dim"])
            return d, d
        d = self.clip(pretrained=False).embed_dim
        return d, d

    def clip(self, pretrained: bool = True) -> ClipEncoder:
        """The frozen CLIP (built once; ``pretrained=False`` only to read its widths)."""
        if self._clip is not None and (self._clip_pretrained or not pretrained):
            return self._clip
        c = self.mcfg.get("clip", {})
        source = c.get("source", "open_clip")
        if source == "open_clip":
            import open_clip

            arch = c.get("arch", "ViT-B-16")
            kwargs = dict(c.get("kwargs") or {})
            tag = c.get("pretrained") if pretrained else None
            model = create_real_open_clip(arch, tag, c.get("weights_path"), kwargs) if tag else \
                open_clip.create_model(arch, pretrained=None, **kwargs)
            enc = _open_clip_encoder(model, arch, (kwargs.get("text_cfg") or {}).get("context_length"))
        elif source == "zoo":
            from wsolbench import zoo

            scale = c.get("scale", "tiny")
            model, tokenizer = zoo.load_clip(scale) if pretrained else zoo.create_clip(scale, seed=None)
            enc = _zoo_clip_encoder(model, tokenizer)
        else:
            raise ValueError(f"model.clip.source must be 'open_clip' or 'zoo', got {source!r}")
        self._clip = enc.to(self.device)
        self._clip_pretrained = bool(pretrained)
        return self._clip

    def _prompts(self) -> list[str]:
        template = str(self.mcfg.get("prompt", "a photo of {}"))
        return [template.format(PROMPT_NAMES.get(n, n.replace("_", " "))) for n in self.class_names]

    def ensure_text_embeddings(self) -> None:
        """Fill ``text_embed`` with the CLIP text embeddings of the prompts (once; kept in checkpoints)."""
        if self._text_ready or not self.model.use_text:
            self._text_ready = True
            return
        emb = self.clip(pretrained=True).encode_text(self._prompts())
        if bool(self.mcfg.get("normalize_text", True)):
            emb = F.normalize(emb, dim=-1)
        self.model.text_embed.copy_(emb.to(self.model.text_embed.device))
        self._text_ready = True

    # ---- persistence -----------------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        self._text_ready = True
        self._trained = True

    @classmethod
    def load_foreign(cls, path: str | Path, config: dict, class_names: Sequence[str] | None = None,
                     device: str = "cpu") -> "MMCST":
        """Build from ``config`` and load an MCTformer-V1 / -V2 / MCTformer+ ``{'model': state_dict}`` file, a
        plain ViT state dict or an MMCST one, exactly (``load_exact``): every model tensor must come from the
        file unless ``load.partial`` names it; ``load_report`` says what was loaded, dropped and reshaped."""
        from wsolbench.checkpoint import load_exact, load_tensors, partial_names

        method = cls.from_config(config, class_names=class_names, device=device)
        adapted = adapt_vit_state_dict(load_tensors(path, device="cpu"), method.model, where=str(path))
        try:
            method.load_report = load_exact(method.model, adapted.state, partial=partial_names(config), where=path,
                                            ignored=adapted.ignored, adapted=adapted.adapted, layout=adapted.layout)
        except CheckpointError as exc:
            hint = mctformer_settings(adapted)
            raise CheckpointError(f"{exc}. This is an {adapted.layout} file: --set {hint}" if hint else str(exc)) \
                from exc
        log.info(method.load_report.summary())
        method._text_ready = "text_embed" in method.load_report.loaded  # else computed with CLIP when needed
        method._trained = True
        method.model.eval()
        return method

    # ---- training --------------------------------------------------------------------------------------
    def _train_transform(self):
        t = self.tcfg
        if t.get("augment", "simple") == "mctformer":
            from timm.data import create_transform

            return create_transform(input_size=self.input_size, is_training=True, color_jitter=0.4,
                                    auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                                    re_prob=0.25, re_mode="pixel", re_count=1, mean=self.mean, std=self.std)
        from wsolbench.training import train_transform

        return train_transform(int(t.get("resize_size", round(self.input_size * 256 / 224))), self.input_size,
                               mean=self.mean, std=self.std, flip=True)

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        from wsolbench.training import TrainLoop, make_loader, seed_everything

        t = self.tcfg
        seed_everything(int(t.get("seed", 0)))
        if not self._trained and bool(self.mcfg.get("backbone", {}).get("pretrained", True)):
            self._init_from_pretrained()
        self.ensure_text_embeddings()
        net = self.model
        w = {k: float(self.lcfg.get(k, 1.0)) for k in LOSS_TERMS}
        use_contrast = net.use_text and w["contrast"] > 0
        clip = self.clip(pretrained=True) if use_contrast else None
        params = [p for p in net.parameters() if p.requires_grad]
        lr, wd = scaled_lr(t), float(t.get("weight_decay", 0.0))
        opt_name = str(t.get("optimizer", "adam")).lower()
        if opt_name == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        elif opt_name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        else:
            raise ValueError(f"train.optimizer must be 'adam' or 'adamw', got {opt_name!r}")
        epochs = int(t.get("epochs", 60))
        bs = int(t.get("batch_size", 32))
        n = len(train_data)
        drop_last = n >= 2 * bs  # the contrastive loss wants full batches; tiny sets keep every sample
        steps_per_epoch = max(1, (n // bs) if drop_last else math.ceil(n / bs))
        if t.get("max_steps_per_epoch"):
            steps_per_epoch = min(steps_per_epoch, int(t["max_steps_per_epoch"]))
        sched = _make_scheduler(opt, str(t.get("scheduler", "none")), epochs * steps_per_epoch,
                                int(t.get("warmup_epochs", 0)) * steps_per_epoch, lr, float(t.get("min_lr", 0.0)))
        transform = self._train_transform()
        num_classes = len(self.class_names)
        seed = int(t.get("seed", 0))
        dev = self.device
        pooling, decay = str(self.lcfg.get("pooling", "gwrp")), float(self.lcfg.get("gwrp_decay", 0.996))
        temperature = float(self.lcfg.get("temperature", 0.07))

        def make_epoch_loader(epoch: int):
            return make_loader(train_data, transform, batch_size=bs, shuffle=True, seed=seed, target="multi",
                               drop_last=drop_last, epoch=epoch, num_workers=int(t.get("num_workers", 0)),
                               num_classes=num_classes)

        def step(batch):
            x = batch["image"].to(dev)
            y = batch["label"].to(dev)
            out = net(x)
            img = clip.encode_images(x, self.mean, self.std).to(dev) if clip is not None else None
            return net.losses(out, y, img, weights=w, pooling=pooling, decay=decay, temperature=temperature)

        select = _ValMapSelection(self, val_data, out_dir) if str(t.get("select", "last")) == "val_map" else None
        loop = TrainLoop(out_dir, epochs, {"model": net}, opt, sched, progress=progress, desc="mmcst",
                         grad_clip=t.get("grad_clip"), scheduler_interval="step",
                         max_steps_per_epoch=t.get("max_steps_per_epoch"),
                         on_epoch_end=None if select is None else lambda e, r: select.epoch_end(e, r, loop.history))
        history = loop.run(make_epoch_loader, step, resume=resume)
        result: dict[str, Any] = {"history": history}
        if select is not None:
            result["selected_epoch"] = select.restore_best(history)
        net.eval()
        self._trained = True
        return result

    @torch.no_grad()
    def val_map(self, data: Any, batch_size: int = 48) -> float:
        """MCTformer's validation mAP: per image, the average precision of its sigmoid class scores against its
        labels (images without labels skipped), averaged; inputs resized (shorter side 256/224·S, bicubic) and
        centre-cropped to S, as MCTformer's val transform (engine.evaluate / datasets.build_transform)."""
        from torchvision import transforms as T

        from wsolbench.training import make_loader

        s = self.input_size
        tf = T.Compose([T.Resize(int(256 / 224 * s), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s),
                        T.ToTensor(), T.Normalize(self.mean, self.std)])
        loader = make_loader(data, tf, batch_size=batch_size, shuffle=False, target="multi",
                             num_classes=len(self.class_names), num_workers=int(self.tcfg.get("num_workers", 0)))
        was_training = self.model.training
        self.model.eval()
        aps = []
        for batch in loader:
            scores = self.model(batch["image"].to(self.device))["logits"].sigmoid().float().cpu().numpy()
            labels = batch["label"].numpy()
            aps += [sample_average_precision(y, p) for y, p in zip(labels, scores) if y.sum() > 0]
        self.model.train(was_training)
        if not aps:
            raise ValueError("val_map: no validation image has a label")
        return float(np.mean(aps))

    def _init_from_pretrained(self) -> None:
        """Initialise the transformer from the pretrained ViT (class token repeated C times, as MCTformer); every
        ViT tensor must load, and only the MMCST parts (``MMCSTNet.new_parts``) keep their initial values."""
        from wsolbench.checkpoint import load_exact

        vit = self._build_vit(pretrained=True)
        name = self.mcfg.get("backbone", {}).get("name", "vit")
        adapted = adapt_vit_state_dict(vit.state_dict(), self.model, where=f"pretrained backbone {name}")
        load_exact(self.model, adapted.state, partial=self.model.new_parts(), where=f"pretrained backbone {name}")

    # ---- inference -------------------------------------------------------------------------------------
    def _forward_maps(self, x: torch.Tensor, variants: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = self.model(x.to(self.device), need_attn=True)
        i = self.icfg
        maps = {v: self.model.maps(out, v, attn_layers=int(i.get("attn_layers", 3)),
                                   fuse_attention=bool(i.get("fuse_attention", True)),
                                   refine=bool(i.get("refine", True)), relu=bool(i.get("relu", True)))
                for v in variants}
        return maps, out["logits"]

    def _sum_passes(self, passes: Sequence[tuple[torch.Tensor, bool]], out_hw: tuple[int, int],
                    variants: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Maps of every (input, flipped) pass upsampled bilinearly to ``out_hw``, flipped back and summed (in
        pass order, as MCTformer); the class scores of the first pass."""
        sums: dict[str, torch.Tensor] = {}
        logits = None
        for x, flipped in passes:
            maps, lg = self._forward_maps(x, variants)
            logits = lg if logits is None else logits
            for v, m in maps.items():
                m = F.interpolate(m, size=tuple(out_hw), mode="bilinear", align_corners=False)
                m = m.flip(-1) if flipped else m
                sums[v] = sums[v] + m if v in sums else m
        return sums, logits

    @torch.no_grad()
    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        from wsolbench.imaging import as_image_list

        if texts is not None:
            self.require(Capability.PHRASE)
        imgs = as_image_list(images)
        b = len(imgs)
        queries = self.class_queries(classes, b)
        self.require(Capability.SINGLE if queries is not None else Capability.MULTI)
        c = len(self.class_names)
        if queries is not None and any(not 0 <= q < c for qs in queries for q in qs):
            raise InputError(f"class indices must be in [0, {c}), got {queries}")
        if not self._trained:
            log.warning("MMCST.localize on an untrained model: call fit() or load() first")
        self.ensure_text_embeddings()
        self.model.eval()
        i = self.icfg
        main = str(i.get("map", "mm"))
        extras = [str(e) for e in (i.get("extras") or [])]
        variants = list(dict.fromkeys([main] + extras))
        scales = [float(x) for x in (i.get("scales") or [1.0])]
        flip = bool(i.get("flip", False))
        if self.maps_at_image_size:  # each image at its own size (MCTformer)
            per_image = [self._sum_passes(*mctformer_inputs(im, scales, flip, self.mean, self.std), variants)
                         for im in imgs]
            sizes = sorted({tuple(m[main].shape[-2:]) for m, _ in per_image})
            if len(sizes) > 1:
                raise InputError(f"infer.resolution 'native' gives each image's maps at its own size; one localize "
                                 f"call got sizes {sizes}: pass images of one size (or one image) per call (in a run: "
                                 "--set harness.batch_size=1), or set infer.resolution=square")
            sums = {v: torch.cat([m[v] for m, _ in per_image]) for v in variants}
            logits = torch.cat([lg for _, lg in per_image])
        else:  # every image resized to input_size², scales at round(input_size·s) px (168, 280 for 224)
            s0 = self.input_size
            passes = []
            for scale in scales:
                x = self.preprocess(imgs, round(s0 * scale))
                passes += [(x, False)] + ([(x.flip(-1), True)] if flip else [])
            sums, logits = self._sum_passes(passes, (s0, s0), variants)
        normed = {v: _minmax(m) for v, m in sums.items()}
        if queries is None:
            pick = lambda m: m  # noqa: E731
            qcls = [list(range(c))] * b
        else:
            idx = torch.tensor(queries, device=sums[main].device)
            pick = lambda m: torch.gather(m, 1, idx[:, :, None, None].expand(-1, -1, *m.shape[-2:]))  # noqa: E731
            qcls = queries
        return LocalizerOutput(maps=pick(normed[main]).float().cpu(), logits=logits.float().cpu(), classes=qcls,
                               extras={v: pick(normed[v]).float().cpu() for v in extras if v != main})


class _ValMapSelection:
    """``train.select: val_map``: score val mAP after every epoch and keep the best epoch's weights (MCTformer's
    checkpoint_best.pth), on disk beside the training checkpoint so a resumed run still knows them."""

    FILE = "best_val_map.safetensors"

    def __init__(self, method: "MMCST", val_data: Any, out_dir: str | Path | None) -> None:
        if val_data is None:
            raise ValueError("train.select=val_map needs validation data (the dataset's val split); "
                             "use train.select=last without one")
        self.method, self.val_data = method, val_data
        self.path = Path(out_dir) / self.FILE if out_dir is not None else None
        self.best_state: dict[str, torch.Tensor] | None = None

    def epoch_end(self, epoch: int, record: dict, history: Sequence[dict]) -> None:
        from wsolbench.checkpoint import save_tensors
        from wsolbench.distributed import training_world

        record["val_map"] = self.method.val_map(self.val_data, int(self.method.tcfg.get("batch_size", 32)))
        if record["val_map"] > max((h.get("val_map", -1.0) for h in history), default=-1.0):
            self.best_state = {k: v.detach().to("cpu").clone() for k, v in self.method.model.state_dict().items()}
            if self.path is not None and training_world().is_main:
                save_tensors(self.best_state, self.path)

    def restore_best(self, history: Sequence[dict]) -> int:
        """Load the best epoch's weights; return that epoch (1-based)."""
        from wsolbench.checkpoint import load_tensors

        best = max(range(len(history)), key=lambda i: history[i].get("val_map", -1.0))
        state = load_tensors(self.path) if self.path is not None and self.path.exists() else self.best_state
        if state is None or "val_map" not in history[best]:
            raise ValueError("train.select=val_map: no epoch was scored on val (resumed from a run trained with "
                             "train.select=last?); train again without --resume, or use train.select=last")
        self.method.model.load_state_dict(state)
        return best + 1


def sample_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one image's class scores against its 0/1 labels, as scikit-learn's
    ``average_precision_score`` (Σ (R_n − R_{n−1}) P_n over the distinct scores, ties grouped), which MCTformer's
    ``compute_mAP`` applies per image."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(labels)[order] > 0
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last position of each run of equal scores
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def scaled_lr(train_cfg: dict) -> float:
    """``train.lr``, times batch/``lr_base_batch`` when that is set (MCTformer's main.py: lr × batch / 512)."""
    lr = float(train_cfg.get("lr", 5e-4))
    base = train_cfg.get("lr_base_batch")
    return lr * int(train_cfg.get("batch_size", 32)) / float(base) if base else lr


def mctformer_inputs(img: Any, scales: Sequence[float], flip: bool, mean, std
                     ) -> tuple[list[tuple[torch.Tensor, bool]], tuple[int, int]]:
    """The passes of MCTformer's multi-scale map generation for one image, as (1×3×h×w input, flipped), and the
    image's (H, W), the size the maps are generated at.

    As ``VOC12DatasetMS``: PIL bicubic resize to (round(W·s), round(H·s)) — Python's round, no crop, the patch
    embedding drops a remainder under 16 px — then ToTensor, Normalize, and each scale also flipped."""
    from PIL import Image

    from wsolbench.imaging import to_float_chw

    if not isinstance(img, Image.Image):  # arrays/tensors: 8-bit RGB first, as a JPEG on disk would be
        img = Image.fromarray(to_float_chw(img).mul(255).round().byte().permute(1, 2, 0).numpy())
    img = img.convert("RGB")
    w, h = img.size
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    passes = []
    for s in scales:
        x = (to_float_chw(img.resize((round(w * s), round(h * s)), resample=Image.BICUBIC)) - m) / sd
        passes.append((x[None], False))
        if flip:
            passes.append((x.flip(-1)[None], True))
    return passes, (h, w)


def _minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-(image, class) min-max normalisation of B×C×H×W maps."""
    lo = m.flatten(2).min(-1).values[..., None, None]
    hi = m.flatten(2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo + 1e-8)


def _make_scheduler(opt, kind: str, total: int, warmup: int, lr: float, min_lr: float):
    """Per-step LR schedule: none, or cosine to ``min_lr`` after a linear warm-up (MCTformer's timm cosine)."""
    if kind == "none":
        return None
    if kind != "cosine":
        raise ValueError(f"train.scheduler must be 'none' or 'cosine', got {kind!r}")
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _zoo_clip_encoder(model: nn.Module, tokenizer: Any) -> ClipEncoder:
    """The zoo CLIP (an open_clip model + tokenizer; ``model.visual.preprocess_cfg``) as a ``ClipEncoder``."""
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    size = pp.get("size") or getattr(model.visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipEncoder(model, tokenizer, size, pp.get("mean", (0.48145466, 0.4578275, 0.40821073)),
                       pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
