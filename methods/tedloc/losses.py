"""TeD-Loc's three losses on the sampled cells: L_KD, P_CL, I_CL and their weighted sum."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _gather_cells(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: B×C×H×W, idx: B×k flat cell indices (≥ 0) → B×k×C."""
    flat = x.flatten(2).transpose(1, 2)  # B×N×C
    return flat.gather(1, idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))


def tedloc_losses(out: dict[str, torch.Tensor], labels: torch.Tensor, fg_idx: torch.Tensor, bg_idx: torch.Tensor,
                  scores_fn: Callable[[torch.Tensor], torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """The three TeD-Loc losses and their weighted sum ``loss``.

    ``fg_idx``/``bg_idx``: B×k flat indices into the z_p grid, -1 = padding (not a sampled cell).
    ``scores_fn``: v (…×d) → (…×C) class scores f(v, t). ``cfg``: the ``losses`` config section (a term's
    λ is read only when its switch is on).
    """
    z, g_logit, h = out["z"], out["g_logit"], out["h"]
    zero = z.sum() * 0.0
    fg_valid, bg_valid = fg_idx >= 0, bg_idx >= 0
    fg_i, bg_i = fg_idx.clamp_min(0), bg_idx.clamp_min(0)
    losses: dict[str, torch.Tensor] = {}

    # L_KD: CE(y, f(z_p, t)) over sampled FG cells
    if fg_valid.any():
        z_fg = _gather_cells(z.float(), fg_i)  # B×k×d
        logits = scores_fn(z_fg)  # B×k×C
        ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(fg_i.shape[1]), reduction="none")
        w = fg_valid.flatten().float()
        losses["l_kd"] = (ce * w).sum() / w.sum()
    else:
        losses["l_kd"] = zero

    # P_CL: BCE(y'_p, g(z_p)) over sampled FG (1) and BG (0) cells
    if fg_valid.any() or bg_valid.any():
        g_fg = _gather_cells(g_logit.float(), fg_i)[..., 0]
        g_bg = _gather_cells(g_logit.float(), bg_i)[..., 0]
        logit = torch.cat([g_fg, g_bg], dim=1)
        target = torch.cat([torch.ones_like(g_fg), torch.zeros_like(g_bg)], dim=1)
        w = torch.cat([fg_valid, bg_valid], dim=1).float()
        bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        losses["p_cl"] = (bce * w).sum() / w.sum()
    else:
        losses["p_cl"] = zero

    # I_CL: CE(y, f(h, t))
    losses["i_cl"] = F.cross_entropy(scores_fn(h.float()), labels)

    total = zero
    for key, name in (("l_kd", "kd"), ("p_cl", "pcl"), ("i_cl", "icl")):
        if cfg[name]:
            total = total + float(cfg[f"lambda_{name}"]) * losses[key]
    losses["loss"] = total
    return losses
