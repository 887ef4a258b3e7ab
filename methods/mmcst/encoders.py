"""MMCST's pretrained encoders, built from the resolved ``model.backbone`` / ``model.clip`` sections: the timm ViT
the transformer is made of, and the frozen CLIP that gives the text tokens and the contrastive image embeddings.
Real weights come through ``wsolbench.weights`` (offline), the synthetic-world ones through ``wsolbench.zoo``."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timm_arch(name: str) -> str:
    """The timm model name of ``name``: a ``wsolbench.weights`` catalogue name (e.g. ``vit-b16``) or a timm name."""
    from wsolbench import weights

    spec = weights.CATALOGUE.get(name)
    return spec.source if spec is not None else name


def build_vit(backbone_cfg: Mapping, input_size: int, pretrained: bool) -> nn.Module:
    """The ViT of ``model.backbone`` without a classifier; ``pretrained``: with its real/zoo weights (offline;
    ``MissingWeightsError`` names the files and the fix), else randomly initialised."""
    b = backbone_cfg
    kwargs = {"num_classes": 0, "drop_path_rate": float(b["drop_path"]), "img_size": input_size, **dict(b["kwargs"])}
    if b["source"] == "timm":
        if pretrained:
            from wsolbench import weights

            return weights.load_timm(b["name"], b["weights_path"], **kwargs)
        import timm

        return timm.create_model(timm_arch(b["name"]), pretrained=False, **kwargs)
    if b["source"] == "zoo":
        from wsolbench import zoo

        if pretrained:
            return zoo.load_backbone("vit", b["scale"], device="cpu", **kwargs)
        return zoo.create_backbone("vit", b["scale"], seed=None, **kwargs)
    raise ValueError(f"model.backbone.source must be 'timm' or 'zoo', got {b['source']!r}")


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


def open_clip_encoder(model: nn.Module, tokenizer: Any) -> ClipEncoder:
    """An open_clip model (real or zoo) and its tokenizer as a ``ClipEncoder``: image size, mean and std from the
    ``model.visual.preprocess_cfg`` open_clip's ``create_model`` sets."""
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    return ClipEncoder(model, tokenizer, size[0] if isinstance(size, (tuple, list)) else size, pp["mean"], pp["std"])


def build_clip(clip_cfg: Mapping, pretrained: bool) -> ClipEncoder:
    """The CLIP of ``model.clip``: ``pretrained`` with its weights (real ones through THE CLIP loader
    ``wsolbench.weights.load_open_clip``: QuickGELU for OpenAI weights, TorchScript archives), else random (to
    read its widths)."""
    c = clip_cfg
    if c["source"] == "open_clip":
        import open_clip

        kwargs = dict(c["kwargs"])
        tag = c["pretrained"] if pretrained else None
        if tag:
            from wsolbench import weights

            model = weights.load_open_clip(c["arch"], tag, path=c["weights_path"], **kwargs)[0]
        else:
            model = open_clip.create_model(c["arch"], pretrained=None, **kwargs)
        # open_clip's text-config key: a test's micro CLIP has its own context length
        ctx = (kwargs.get("text_cfg") or {}).get("context_length") or getattr(model, "context_length", None)
        tok = open_clip.get_tokenizer(c["arch"], context_length=ctx) if ctx else open_clip.get_tokenizer(c["arch"])
        return open_clip_encoder(model, tok)
    if c["source"] == "zoo":
        from wsolbench import zoo

        model, tokenizer = zoo.load_clip(c["scale"]) if pretrained else zoo.create_clip(c["scale"], seed=None)
        return open_clip_encoder(model, tokenizer)
    raise ValueError(f"model.clip.source must be 'open_clip' or 'zoo', got {c['source']!r}")


def clip_dims(model_cfg: Mapping) -> tuple[int, int]:
    """(text embedding width, image embedding width) of ``model.clip`` without loading weights (1, 1 when
    ``model.text_tokens`` is off: no CLIP is used)."""
    if not model_cfg["text_tokens"]:
        return 1, 1
    c = model_cfg["clip"]
    if c["source"] == "open_clip":
        import open_clip

        arch_cfg = open_clip.get_model_config(c["arch"])
        if arch_cfg is None:
            raise ValueError(f"model.clip.arch {c['arch']!r} is not an open_clip architecture")
        d = int(c["kwargs"].get("embed_dim", arch_cfg["embed_dim"]))  # kwargs: open_clip's own overrides
        return d, d
    if c["source"] == "zoo":
        from wsolbench.zoo import spec

        d = int(spec(c["scale"], "clip")["embed_dim"])
        return d, d
    raise ValueError(f"model.clip.source must be 'open_clip' or 'zoo', got {c['source']!r}")
