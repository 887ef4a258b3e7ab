"""MMCST's training losses: GWRP pooling, the text-image contrastive term and L_total (see the package docstring)."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

LOSS_TERMS = ("cls", "text_patch", "class_patch", "contrast", "patch_cam")  # loss.<term>: its weight


def gwrp(x: torch.Tensor, decay: float, dim: int = -1) -> torch.Tensor:
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


def contrastive_loss(text_feats: torch.Tensor, image_feats: torch.Tensor, temperature: float) -> torch.Tensor:
    """B text vectors vs B image vectors: cosine similarity S (B×B) / temperature, CE with the identity target."""
    if text_feats.shape != image_feats.shape:
        raise ValueError(f"contrastive loss needs equal shapes, got {tuple(text_feats.shape)} and "
                         f"{tuple(image_feats.shape)}")
    s = F.normalize(text_feats, dim=-1) @ F.normalize(image_feats, dim=-1).t() / temperature
    return F.cross_entropy(s, torch.arange(s.shape[0], device=s.device))


def mmcst_losses(net: nn.Module, out: dict, target: torch.Tensor, image_embed: torch.Tensor | None,
                 loss_cfg: Mapping) -> dict[str, torch.Tensor]:
    """L_total and its terms from the ``MMCSTNet`` ``net``'s forward output ``out``; ``target`` B×C multi-hot,
    ``image_embed`` B×clip_dim (the contrastive term), ``loss_cfg`` the resolved ``loss`` section (each term's
    weight, 0 = off; pooling, GWRP decay, temperature)."""
    w = {k: float(loss_cfg[k]) for k in LOSS_TERMS}
    pooling, decay = str(loss_cfg["pooling"]), float(loss_cfg["gwrp_decay"])
    target = target.float()
    terms: dict[str, torch.Tensor] = {}
    if w["cls"]:
        terms["cls"] = F.multilabel_soft_margin_loss(out["logits"], target)
    if out["t2p"] is not None and w["text_patch"]:
        terms["text_patch"] = F.multilabel_soft_margin_loss(pool_scores(out["t2p"], pooling, decay), target)
    if out["c2p"] is not None and w["class_patch"]:
        terms["class_patch"] = F.multilabel_soft_margin_loss(pool_scores(out["c2p"], pooling, decay), target)
    if out["patchcam"] is not None and w["patch_cam"]:  # MCTformer-V2's patch-head loss
        terms["patch_cam"] = F.multilabel_soft_margin_loss(out["patch_logits"], target)
    if out["txt_out"] is not None and w["contrast"] and image_embed is not None:
        z = net.contrast_proj(out["txt_out"].mean(1))
        terms["contrast"] = contrastive_loss(z, image_embed.to(z.dtype), float(loss_cfg["temperature"]))
    if not terms:
        raise ValueError("every loss term is switched off")
    total = sum(w[k] * v for k, v in terms.items())
    return {"loss": total, **{k: v.detach() for k, v in terms.items()}}
