"""CLIP-ES-style Grad-CAM on an ``open_clip`` ViT (Lin et al., CVPR 2023; code: linyq2117/CLIP-ES).

What CLIP-ES does, and what this module reproduces on any open_clip ``VisionTransformer``:

* text side: one embedding per class from a prompt template ("a clean origami {}." by default), plus the
  same template over a list of background words; every embedding L2-normalised (averaged over templates
  and re-normalised when several templates are given);
* image feature: ALL tokens after the last block go through ``ln_post``, the PATCH tokens are averaged
  (the class token is dropped) and projected with ``proj`` — not the usual class-token feature;
* score: ``softmax(logit_scale · cos(image, [class text, background texts]))`` and the target is the
  probability of the class (so background words compete with it, which suppresses background);
* Grad-CAM at the OUTPUT of the last residual block's ``ln_1`` (patch tokens only): channel weights = the
  spatial mean of the gradient, map = ReLU(Σ_c w_c A_c), then min-max normalised per image.

Images of any size work: the positional embedding is interpolated (bicubic) to the token grid.
The Grad-CAM machinery itself is ``wsolbench.maps.gradcam.grad_cam``.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..classnames import class_text
from .gradcam import grad_cam, tokens_to_map

CLIP_ES_PROMPT = "a clean origami {}."
# CLIP-ES's background word list for VOC (clip_text.py, BACKGROUND_CATEGORY)
CLIP_ES_BACKGROUND = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
                      "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
                      "road", "rock", "street", "valley", "bridge", "sign")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# a background word joined to another word of at least this many letters is a compound that names the word's
# scene ("lakeside", "seashore", "greenhouse"); shorter rests are endings ("rocky", "wallet", "husky")
COMPOUND_REST = 4


def _words(text: str) -> list[str]:
    """Every word of a class name, all its comma-separated synonyms included ("001.Black_footed_Albatross")."""
    return re.findall(r"[a-z]+", class_text(text, synonyms="all").lower())


def collides(word: str, name_words: set[str]) -> bool:
    """Whether background ``word`` names (part of) a class: it is one of the class-name words (or their
    plural), or a compound of it with another word of ``COMPOUND_REST``+ letters starts or ends with it."""
    w = word.lower().strip()
    for t in name_words:
        if t in (w, w + "s", w + "es"):
            return True
        rest = len(t) - len(w)
        if rest >= COMPOUND_REST and (t.startswith(w) or t.endswith(w)):
            return True
    return False


def filter_background_words(words: Sequence[str], class_names: Sequence[str],
                            synonyms: Sequence[Sequence[str]] | None = None) -> tuple[list[str], list[str]]:
    """(kept, removed) background words: CLIP-ES drops, per dataset, the words that name a class (a "keyboard"
    background would suppress ImageNet's "computer keyboard"). Checked against every class name and, when
    given, every synonym of every class (``ILSVRC.class_synonyms``)."""
    name_words: set[str] = set()
    for k, name in enumerate(class_names):
        for text in [name, *((synonyms[k] or ()) if synonyms is not None else ())]:
            name_words.update(_words(str(text)))
    kept, removed = [], []
    for w in words:
        (removed if collides(str(w), name_words) else kept).append(str(w))
    return kept, removed


@torch.no_grad()
def encode_texts(clip_model: nn.Module, tokenizer: Any, texts: Sequence[str], device: str | torch.device = "cpu",
                 batch_size: int = 256) -> torch.Tensor:
    """CLIP text embeddings (N×D, float32, L2-normalised) of ``texts``."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        emb = clip_model.encode_text(tokens).float()
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def prompt_embeddings(clip_model: nn.Module, tokenizer: Any, names: Sequence[str],
                      templates: Sequence[str] | str = (CLIP_ES_PROMPT,), device: str | torch.device = "cpu"
                      ) -> torch.Tensor:
    """One L2-normalised embedding per name: the templates' embeddings averaged, then re-normalised
    (CLIP-ES ``zeroshot_classifier``)."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("need at least one prompt template, e.g. 'a clean origami {}.'")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' placeholder for the class name")
    per_template = [encode_texts(clip_model, tokenizer, [t.format(n) for n in names], device) for t in templates]
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def _visual(clip_model: nn.Module) -> nn.Module:
    visual = getattr(clip_model, "visual", clip_model)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    missing = [n for n in needed if not hasattr(visual, n)]
    if missing:
        raise TypeError(f"CLIP-ES Grad-CAM needs an open_clip VisionTransformer image tower; "
                        f"{type(visual).__name__} lacks {missing} (ResNet/timm towers are not supported)")
    return visual


def _pos_embed(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    pos = visual.positional_embedding  # (1 + g0*g1) × D
    old = tuple(visual.grid_size)
    if tuple(grid) == old:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    d = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d)
    return torch.cat([cls_pos, patch_pos])


def patch_size(clip_model: nn.Module) -> tuple[int, int]:
    """(ph, pw) of an open_clip ViT image tower."""
    visual = _visual(clip_model)
    return _pair(visual.patch_size) if hasattr(visual, "patch_size") else _pair(visual.conv1.kernel_size)


def token_grid(clip_model: nn.Module, height: int, width: int) -> tuple[int, int]:
    ph, pw = patch_size(clip_model)
    return height // ph, width // pw


def native_size_batch(image: Any, clip_model: nn.Module, mean: Sequence[float] = OPENAI_MEAN,
                      std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """CLIP-ES input: ONE image at its own size rounded UP to a multiple of the patch size (bicubic),
    normalised → 1×3×H×W."""
    from ..imaging import to_float_chw

    x = to_float_chw(image)
    ph, pw = patch_size(clip_model)
    h = int(-(-x.shape[1] // ph) * ph)
    w = int(-(-x.shape[2] // pw) * pw)
    if (h, w) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return ((x - m) / s)[None]


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def patch_mean_features(clip_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLIP-ES image feature: mean over PATCH tokens after the last block and ``ln_post``, then ``proj``.

    ``images``: B×3×H×W normalised with the CLIP mean/std; H, W multiples of the patch size (other sizes
    interpolate the positional embedding). Returns B×D (not normalised).
    """
    visual = _visual(clip_model)
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # B×W×gh×gw
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + _pos_embed(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks:
        x = block(x)
    if not batch_first:
        x = x.transpose(0, 1)
    x = visual.ln_post(x)
    feat = x[:, 1:, :].mean(dim=1)
    if getattr(visual, "proj", None) is not None:
        feat = feat @ visual.proj
    return feat


def _minmax(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-image min-max to [0, 1] (pytorch-grad-cam's scale_cam_image: x - min, / (max + eps))."""
    flat = cam.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    flat = flat - lo
    hi = flat.max(dim=1, keepdim=True).values
    return (flat / (hi + eps)).view_as(cam)


class ClipGradCAM:
    """CLIP-ES Grad-CAM for given class indices: ``ClipGradCAM(model, tokenizer, class_names)(images, labels)``.

    ``images``: anything ``wsolbench.imaging.to_batch`` accepts (PIL, numpy HWC, tensors in [0, 1]), resized
    to ``input_size``² (``None`` = the model's native size) and normalised with the CLIP mean/std; or, with
    ``normalized=True``, a B×3×H×W tensor already prepared (any size; H, W multiples of the patch size). Returns B×gh×gw float32 maps in [0, 1] at the token grid.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any, class_names: Sequence[str], *,
                 prompt: Sequence[str] | str = CLIP_ES_PROMPT, background_words: Sequence[str] = CLIP_ES_BACKGROUND,
                 input_size: int | None = None, device: str | torch.device = "cpu",
                 logit_scale: float | None = None, readable_names: bool = True) -> None:
        self.model = clip_model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.visual = _visual(self.model)
        self.device = torch.device(device)
        self.class_names = [class_text(n) if readable_names else str(n) for n in class_names]
        self.background_words = list(background_words)
        native = _pair(getattr(self.visual, "image_size", 224))
        self.input_size = int(input_size) if input_size else native[0]
        pcfg = getattr(self.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(pcfg.get("mean", OPENAI_MEAN))
        self.std = tuple(pcfg.get("std", OPENAI_STD))
        if logit_scale is None:
            ls = getattr(self.model, "logit_scale", None)
            logit_scale = float(ls.exp()) if ls is not None else 100.0
        self.logit_scale = float(logit_scale)
        self.fg_text = prompt_embeddings(self.model, tokenizer, self.class_names, prompt, self.device)
        self.bg_text = (prompt_embeddings(self.model, tokenizer, self.background_words, prompt, self.device)
                        if self.background_words else self.fg_text.new_zeros(0, self.fg_text.shape[1]))

    def to_batch(self, images: Any, normalized: bool = False) -> torch.Tensor:
        if normalized:
            if not (torch.is_tensor(images) and images.ndim == 4):
                raise TypeError("normalized=True expects a B×3×H×W tensor already normalised with the CLIP "
                                f"mean/std, got {type(images).__name__}")
            return images.to(self.device)
        from ..imaging import to_batch

        return to_batch(images, self.input_size, self.mean, self.std).to(self.device)

    def scores(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B×(1+N_bg): softmax over [class text, background texts]; column 0 is the class probability."""
        feats = F.normalize(features.float(), dim=-1)
        fg = feats @ self.fg_text.T  # B×C
        own = fg.gather(1, labels.view(-1, 1))
        logits = torch.cat([own, feats @ self.bg_text.T], dim=1) * self.logit_scale
        return logits.softmax(dim=-1)

    def __call__(self, images: Any, labels: Sequence[int] | torch.Tensor, normalized: bool = False) -> torch.Tensor:
        x = self.to_batch(images, normalized)
        labels_t = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels,
                                   dtype=torch.long, device=self.device).view(-1)
        if labels_t.numel() != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {labels_t.numel()} labels")
        if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= len(self.class_names)):
            raise ValueError(f"labels must be in [0, {len(self.class_names)}), got {labels_t.tolist()}")
        grid = token_grid(self.model, x.shape[-2], x.shape[-1])
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        layer = self.visual.transformer.resblocks[-1].ln_1
        maps, _ = grad_cam(self.visual, layer, x, targets=[[0]] * x.shape[0],
                           forward=lambda inp: patch_mean_features(self.model, inp),
                           score_fn=lambda feats: self.scores(feats, labels_t),
                           reshape=tokens_to_map(grid, drop_prefix=1, seq_first=not batch_first))
        return _minmax(maps[:, 0]).float()
