"""Official checkpoints into ``MMCSTNet``: MCTformer-V1 / -V2 / MCTformer+ ``{'model': state_dict}`` files, plain
timm/DeiT ViTs and MMCST state dicts, recognised by their keys (``checkpoint_layout``) and adapted
(``adapt_vit_state_dict``) for ``wsolbench.checkpoint.load_exact``, which loads them exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from wsolbench.checkpoint import CheckpointError

from .model import MMCSTNet


def _interpolate_grid_pos(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings 1×(h·w)×D resized bicubically to a new grid (adapting a checkpoint's grid)."""
    if tuple(old) == tuple(new):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)


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
