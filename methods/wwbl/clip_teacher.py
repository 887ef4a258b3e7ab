"""WWbL's frozen CLIP (the only supervision of g): text embeddings, embeddings of masked images
(differentiable w.r.t. the mask) and relevancy maps, and building it from the config's ``clip`` group."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClipTeacher:
    """The frozen CLIP: text embeddings, masked-image embeddings (differentiable w.r.t. the mask) and
    relevancy maps. Images come in as B×3×H×W in [0, 1]."""

    def __init__(self, model: nn.Module, tokenizer: Any, mean: Sequence[float], std: Sequence[float]) -> None:
        from wsolbench.maps.clip_relevancy import image_size_of

        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = image_size_of(model.visual)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        if getattr(self, "_embed_dim", None) is None:
            self._embed_dim = int(self.encode_text(["a"]).shape[-1])
        return self._embed_dim

    def to(self, device) -> "ClipTeacher":
        self.model.to(device)
        return self

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def prepare(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images → CLIP input (resized to CLIP's size with ``align_corners=True``, as the official
        training step resizes g's input for CLIP; then normalised)."""
        x = images01
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=True)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def encode_image(self, clip_input: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(clip_input).float(), dim=-1)

    def relevancy(self, images01: torch.Tensor, z_text: torch.Tensor, mode: str,
                  out_size: tuple[int, int]) -> torch.Tensor:
        from wsolbench.maps.clip_relevancy import relevancy

        rel = relevancy(self.model, self.prepare(images01), z_text, mode=mode, out_size=self.size)
        if tuple(out_size) != tuple(self.size):
            rel = F.interpolate(rel, size=tuple(out_size), mode="bilinear", align_corners=True)
        return rel


def build_clip(cfg: dict, device: str) -> ClipTeacher:
    """The ``clip`` group's CLIP, normalised with ``clip.mean``/``clip.std`` (null: the model's own, the
    ``model.visual.preprocess_cfg`` that open_clip and the zoo set)."""
    c = cfg["clip"]
    source = c["source"]
    if source in ("zoo", "zoo-random"):
        from wsolbench import zoo

        model, tokenizer = zoo.load_clip(c["scale"]) if source == "zoo" else zoo.create_clip(c["scale"])
    elif source == "open_clip":
        from wsolbench.weights import load_open_clip

        model, tokenizer = load_open_clip(c["name"], c["pretrained"], path=c["weights"], device=device)
    else:
        raise ValueError(f"clip.source must be open_clip, zoo or zoo-random, got {source!r}")
    own = model.visual.preprocess_cfg
    mean = own["mean"] if c["mean"] is None else c["mean"]
    std = own["std"] if c["std"] is None else c["std"]
    return ClipTeacher(model.to(device), tokenizer, mean, std)
