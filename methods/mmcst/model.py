"""The MMCST network (``MMCSTNet``) around a timm ViT and its MCTformer-style localization maps.

A timm ViT's own ``patch_embed``, ``blocks`` and ``norm`` (with their pretrained weights, not a copy) read
``[C class tokens | C text tokens | N patch tokens]``; the class and text groups are kept apart by an attention
mask (``group_attention_mask``), which ``masked_block_forward`` applies through each timm ``Block``'s own
submodules (timm's ``Attention`` has no mask argument in every version). See the package docstring for the
paper's equations and where MCTformer's code fills them in.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAP_VARIANTS = ("mm", "t2p", "c2p", "attn", "patchcam")
TOKEN_SOURCES = ("input", "output", "fused")


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


class MMCSTNet(nn.Module):
    """The MMCST transformer around a timm ``VisionTransformer`` (see the package docstring).

    State-dict keys keep timm's names (``patch_embed.*``, ``blocks.i.*``, ``norm.*``) plus MCTformer's
    ``cls_token`` [1,C,D] and ``pos_embed`` [1,C+N,D]; the MMCST parts are ``text_embed`` (buffer),
    ``text_proj``, ``text_pos_embed``, ``lambda_text`` (λ1), ``lambda_cls`` (λ2), ``patch_proj`` and
    ``contrast_proj``.
    """

    # the ``model.*`` keys of the config that shape the network (passed by name from the resolved config)
    CONFIG_KEYS = ("text_tokens", "class_patch", "mask_groups", "token_source", "lambda_init", "patch_proj",
                   "final_norm", "patch_cam", "text_proj", "text_scale")

    def __init__(self, vit: nn.Module, num_classes: int, text_dim: int, clip_dim: int, *, text_tokens: bool,
                 class_patch: bool, mask_groups: bool, token_source: str, lambda_init: float, patch_proj: str,
                 final_norm: bool, patch_cam: bool, text_proj: str, text_scale: float) -> None:
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
        self.clip_dim = int(clip_dim)
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

    # ---- localization maps -----------------------------------------------------------------------------
    def maps(self, out: dict, variant: str, *, attn_layers: int, fuse_attention: bool, refine: bool, relu: bool
             ) -> torch.Tensor:
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
            present = [m for m in (out["t2p"], out["c2p"]) if m is not None]
            base = sum(present) if present else None
        elif variant == "attn":
            base = None
        else:
            base = out[variant]
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
