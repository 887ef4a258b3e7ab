"""MMCST's map generation, as MCTformer's: each pass's maps (``MMCSTNet.maps`` with the ``infer`` settings), the
multi-scale + flip passes of one image at its own size (``mctformer_inputs``), their sum, the per-class min-max."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def forward_maps(net: nn.Module, x: torch.Tensor, variants: Sequence[str], infer_cfg: Mapping
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The raw maps of each variant for one input batch (moved to the net's device) and its class scores."""
    out = net(x.to(net.pos_embed.device), need_attn=True)
    i = infer_cfg
    maps = {v: net.maps(out, v, attn_layers=int(i["attn_layers"]), fuse_attention=bool(i["fuse_attention"]),
                        refine=bool(i["refine"]), relu=bool(i["relu"]))
            for v in variants}
    return maps, out["logits"]


def sum_passes(net: nn.Module, passes: Sequence[tuple[torch.Tensor, bool]], out_hw: tuple[int, int],
               variants: Sequence[str], infer_cfg: Mapping) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Maps of every (input, flipped) pass upsampled bilinearly to ``out_hw``, flipped back and summed (in pass
    order, as MCTformer); the class scores of the first pass."""
    sums: dict[str, torch.Tensor] = {}
    logits = None
    for x, flipped in passes:
        maps, lg = forward_maps(net, x, variants, infer_cfg)
        logits = lg if logits is None else logits
        for v, m in maps.items():
            m = F.interpolate(m, size=tuple(out_hw), mode="bilinear", align_corners=False)
            m = m.flip(-1) if flipped else m
            sums[v] = sums[v] + m if v in sums else m
    return sums, logits


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


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-(image, class) min-max normalisation of B×C×H×W maps."""
    lo = m.flatten(2).min(-1).values[..., None, None]
    hi = m.flatten(2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo + 1e-8)
