"""The WWbL objective from its parts: the paper's per-image terms or the official code's batch-matrix terms."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

LOSS_VARIANTS = ("paper", "official")


def wwbl_losses(m: torch.Tensor, r: torch.Tensor, z_fg: torch.Tensor, z_bg: torch.Tensor, z_t: torch.Tensor,
                variant: str, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The weighted WWbL loss and its four terms (``weights``: the config's ``loss.weights[variant]``).

    ``m``: g's maps B×1×H×W in [0, 1]; ``r``: relevancy targets (same shape); ``z_fg`` / ``z_bg``: normalised
    CLIP image embeddings of I∘m and I∘(1−m) (B×D); ``z_t``: normalised text embeddings (B×D).
    paper: fore = −mean_b <z_fg_b, z_t_b>, back = mean_b <z_bg_b, z_t_b>, rmap = MSE(m, r), reg = mean(m);
    official: fore = mean(1 − Z_fg Z_tᵀ), back = mean|Z_bg Z_tᵀ| over all B×B pairs (the authors' code).
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"loss variant must be one of {LOSS_VARIANTS}, got {variant!r}")
    rmap = F.mse_loss(m, r.to(m.dtype))
    reg = m.mean()
    if variant == "paper":
        fore = -(z_fg * z_t).sum(dim=-1).mean()
        back = (z_bg * z_t).sum(dim=-1).mean()
    else:
        fore = (1.0 - z_fg @ z_t.T).mean()
        back = (z_bg @ z_t.T).abs().mean()
    loss = weights["fore"] * fore + weights["back"] * back + weights["rmap"] * rmap + weights["reg"] * reg
    return {"loss": loss, "fore": fore, "back": back, "rmap": rmap, "reg": reg}
