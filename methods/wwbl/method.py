"""WWbL — "What is Where by Looking" (Shaharabany, Tewel & Wolf, NeurIPS 2022).

A network g maps an image (and, in text mode, a CLIP text embedding) to a [0, 1] map, trained with a frozen
CLIP as the only supervision:

- L_fore = −CLIP(g∘I, t), L_back = CLIP((1−g)∘I, t) (cosine of CLIP image/text embeddings),
- L_rmap = ||H − g||² with H the CLIP relevancy map of (I, t) (Chefer et al.; ``wsolbench.maps.clip_relevancy``),
- L_reg = ||g|| (mean of the map).
  The default ``recipe: official`` is the authors' code (what produced the published numbers): 0.25·mean(1 −
  Z_fg·Z_tᵀ) + 0.25·mean(M) + 16·MSE(M, R) + 0.5·mean|Z_bg·Z_tᵀ| over the full B×B batch matrices, R from the
  last visual block only, SGD lr 0.0012, 304 px input, horizontal flip; ``recipe: paper-text`` is the paper's
  text (weights 1, 1, 4, 1 per image pair, rollout relevancy, lr 3e-4, 299 px) — see ``apply_recipe``.
- Test-time text: "image of " + the lower-cased phrase (``query_text``), as the official test code; the
  open-world captions go to g as generated.

Two networks (``mode``):

- ``grounding`` (default): the text-conditioned g of the official code — E = VGG16 ``features[:23]``
  (relu4_3), decoder D = bottleneck [conv-BN-ReLU]×2 → cosine map Σ_c (Z/|Z|)·z_t → Z ∘ map → up0 (×2,
  [conv-BN-ReLU]×2) → up1 (×2, conv→1, BN, ReLU, conv 1→1) → bilinear resize → sigmoid. Module names
  ``E.Org_model.*`` / ``D.{bottleneck,up0,up1}.*`` are those of the official checkpoint (after stripping
  DataParallel's ``module.``), so its state dict loads (``load_official_checkpoint``). E is any
  "feature extractor giving C channels at stride s": VGG16 for the paper, the zoo's VGG-like timm CNN for
  the tiny profile; the bottleneck maps C to the text width.
- ``wsol``: a U-Net on a pretrained backbone (skip connections at every stride, two conv-BN-ReLU per
  upsampling block, sigmoid), no text input; trained with the dataset's object name ("bird" for CUB).

Capabilities: ``single`` (CUB-style GT-known maps; in grounding mode the class text is fed to g),
``phrase`` (Flickr30k phrases; named extras ``open`` = the WWbL open-world map matched to the phrase in CLIP
space, and ``clip`` = the CLIP relevancy teacher) and ``open`` (no text: selective-search + grid proposals →
captioner → CLIP text embeddings → community detection (0.85, ≥2) → one g map and box per cluster).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsolbench.classnames import class_text
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method
from wsolbench.weights import MissingWeightsError  # noqa: F401 - what the paper profile raises without weights

log = logging.getLogger(__name__)

MODES = ("grounding", "wsol")
HEAD_ACTIVATIONS = ("relu", "leaky_relu", "none")
LOSS_VARIANTS = ("paper", "official")


# =========================================================================================== the networks
class BottleneckBlock(nn.Module):
    """[conv3x3 → BN → ReLU] × 2 (official ``BottleneckBlock``; names conv1, BN1, conv2, BN2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.BN1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.BN2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.BN1(self.conv1(x)))
        return F.relu(self.BN2(self.conv2(x)))


class UpBlock(nn.Module):
    """×2 bilinear upsampling, conv → BN → ReLU → conv, then BN → ReLU (``act``) or nothing (the last block:
    the official ``func='None'`` returns conv2's output; BN2 exists but is unused, as in the checkpoint)."""

    def __init__(self, cin: int, cout: int, act: bool = True, mid_activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.BN1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.BN2 = nn.BatchNorm2d(cout)
        self.act = act
        if mid_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {HEAD_ACTIVATIONS}, got {mid_activation!r}")
        self.mid_activation = mid_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.BN1(self.conv1(x))
        if self.mid_activation == "relu":
            x = F.relu(x)
        elif self.mid_activation == "leaky_relu":
            x = F.leaky_relu(x, 0.1)
        x = self.conv2(x)
        return F.relu(self.BN2(x)) if self.act else x


class TextDecoder(nn.Module):
    """The official ``MMDecoder`` with the text width as a parameter (512 for CLIP ViT-B/32)."""

    def __init__(self, in_channels: int, text_dim: int, mid_channels: int = 512,
                 head_activation: str = "relu") -> None:
        super().__init__()
        self.bottleneck = BottleneckBlock(in_channels, text_dim)
        self.up0 = UpBlock(text_dim, mid_channels, act=True)
        # the official head: conv 512→1, BN, ReLU, conv 1→1. A single ReLU'd channel can die for an image
        # (constant map); ``head_activation`` leaky_relu/none keeps the same parameters without that trap.
        self.up1 = UpBlock(mid_channels, 1, act=False, mid_activation=head_activation)

    def forward(self, z: torch.Tensor, z_text: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        zz = self.bottleneck(z)
        zz_norm = zz / zz.norm(dim=1, keepdim=True).clamp_min(1e-6)
        attn = (zz_norm * z_text[:, :, None, None].to(zz.dtype)).sum(dim=1, keepdim=True)
        zz = self.up1(self.up0(zz * attn))
        zz = F.interpolate(zz, size=out_size, mode="bilinear", align_corners=True)
        return torch.sigmoid(zz)


class Trunk(nn.Module):
    """E: a feature extractor giving C channels at stride s, held as ``Org_model`` (an nn.Sequential slice,
    e.g. VGG16 ``features[:23]``), so that the official key names ``E.Org_model.<i>.*`` match."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.Org_model = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Org_model(x)


class TextConditionedG(nn.Module):
    """g(I, z_t) ∈ [0, 1]^{1×H×W} (official ``MultiModel``: attributes E and D)."""

    def __init__(self, features: nn.Module, feat_channels: int, text_dim: int, mid_channels: int = 512,
                 head_activation: str = "relu") -> None:
        super().__init__()
        self.E = Trunk(features)
        self.D = TextDecoder(feat_channels, text_dim, mid_channels, head_activation)

    def forward(self, x: torch.Tensor, z_text: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        if z_text.shape[0] != x.shape[0]:
            raise ValueError(f"one text embedding per image expected, got {z_text.shape[0]} for {x.shape[0]} images")
        return self.D(self.E(x), z_text, tuple(out_size or x.shape[-2:]))


class SequentialTaps(nn.Module):
    """Multi-scale features of an nn.Sequential CNN (VGG-like), shallow to deep: the output before every
    MaxPool, the first MaxPool's output and the last output — for VGG16 ``features`` the official WSOL taps
    3, 4, 8, 15, 22, 29 (relu1_2, pool1, relu2_2, relu3_3, relu4_3, relu5_3; ``models/vgg16.py VGG16Net``)."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        layers = list(features)
        while layers and isinstance(layers[-1], nn.MaxPool2d):  # drop trailing pools: the last tap is the top
            layers.pop()
        self.Org_model = nn.Sequential(*layers)
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        self.taps = sorted({i - 1 for i in pools if i > 0} | set(pools[:1]) | {len(layers) - 1})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.Org_model):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs


class FeatureListTaps(nn.Module):
    """Wraps a model returning a list of feature maps (timm ``features_only``), shallow to deep."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.Org_model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.Org_model(x))


class SkipUpBlock(nn.Module):
    """Upsample to the skip's size, concatenate, [conv → BN → ReLU] × 2 (the last block: conv2 raw)."""

    def __init__(self, cin: int, cskip: int, cout: int, act: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin + cskip, cout, 3, padding=1)
        self.BN1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.BN2 = nn.BatchNorm2d(cout) if act else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = F.relu(self.BN1(self.conv1(torch.cat([x, skip], dim=1))))
        x = self.conv2(x)
        return F.relu(self.BN2(x)) if self.act else x


class UNetG(nn.Module):
    """WSOL g(I) ∈ [0, 1]^{1×H×W}: U-Net decoder over the taps of a pretrained backbone (no text input).

    Over VGG16's six ``SequentialTaps`` this is the official ``base.SkipDecoder``: bottleneck on relu5_3, then
    five up blocks (512+512→512, 512+256→256, 256+128→128, 128+64→64 at the same scale, 64+64→1), each block
    upsampling to its skip's size (= the official ×2 for inputs divisible by 32), align_corners resize, sigmoid."""

    def __init__(self, encoder: nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"the U-Net needs at least two feature scales, got channels {list(channels)}")
        self.E = encoder
        deep = channels[-1]
        self.bottleneck = BottleneckBlock(deep, deep)
        ups = []
        cin = deep
        skips = list(channels[:-1])[::-1]
        for k, cskip in enumerate(skips):
            last = k == len(skips) - 1
            cout = 1 if last else cskip
            ups.append(SkipUpBlock(cin, cskip, cout, act=not last))
            cin = cout
        self.ups = nn.ModuleList(ups)

    def forward(self, x: torch.Tensor, z_text: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        feats = self.E(x)
        z = self.bottleneck(feats[-1])
        for up, skip in zip(self.ups, feats[-2::-1]):
            z = up(z, skip)
        z = F.interpolate(z, size=tuple(out_size or x.shape[-2:]), mode="bilinear", align_corners=True)
        return torch.sigmoid(z)


def feature_channels(module: nn.Module, size: int = 64) -> list[int]:
    """Channels of each output of ``module`` on a dummy input (a tensor or a list of tensors)."""
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 3, size, size))
    module.train(was)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [int(o.shape[1]) for o in outs]


# ============================================================================ official checkpoint mapping
def official_key(key: str) -> str:
    """An official checkpoint key → this module's key (strip DataParallel's ``module.``)."""
    return key[len("module."):] if key.startswith("module.") else key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official WWbL checkpoint: the authors' ``net_best.pth`` (``torch.save(model)`` of a
    DataParallel module) through ``wsolbench.weights.load_state_dict``'s stub unpickler (every class an inert
    stub: no code runs, only tensors come out, named ``module.E.Org_model.*`` / ``module.D.*``), or a state
    dict / safetensors file (weights-only)."""
    from wsolbench.weights import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WWbL checkpoint {path} does not exist (official_checkpoint / --checkpoint)")
    return load_state_dict(path)


def load_official_into(model: nn.Module, path: str | Path):
    """Load an official WWbL grounding checkpoint into a ``TextConditionedG`` with ``checkpoint.load_exact``
    (every tensor of the model from the file and every tensor of the file used, same shapes); returns the
    ``LoadReport``."""
    from wsolbench.checkpoint import load_exact

    state = {official_key(k): v for k, v in read_state_dict(path).items()}
    return load_exact(model, state, where=path, layout="wwbl-official-grounding")


# ================================================================================================ CLIP
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


# ================================================================================================ losses
def wwbl_losses(m: torch.Tensor, r: torch.Tensor, z_fg: torch.Tensor, z_bg: torch.Tensor, z_t: torch.Tensor,
                variant: str = "paper", weights: dict | None = None) -> dict[str, torch.Tensor]:
    """The WWbL objective from its parts.

    ``m``: g's maps B×1×H×W in [0, 1]; ``r``: relevancy targets (same shape); ``z_fg`` / ``z_bg``: normalised
    CLIP image embeddings of I∘m and I∘(1−m) (B×D); ``z_t``: normalised text embeddings (B×D).
    paper: fore = −mean_b <z_fg_b, z_t_b>, back = mean_b <z_bg_b, z_t_b>, rmap = MSE(m, r), reg = mean(m);
    official: fore = mean(1 − Z_fg Z_tᵀ), back = mean|Z_bg Z_tᵀ| over all B×B pairs (the authors' code).
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"loss variant must be one of {LOSS_VARIANTS}, got {variant!r}")
    w = dict(weights or DEFAULT_LOSS_WEIGHTS[variant])
    rmap = F.mse_loss(m, r.to(m.dtype))
    reg = m.mean()
    if variant == "paper":
        fore = -(z_fg * z_t).sum(dim=-1).mean()
        back = (z_bg * z_t).sum(dim=-1).mean()
    else:
        fore = (1.0 - z_fg @ z_t.T).mean()
        back = (z_bg @ z_t.T).abs().mean()
    loss = w["fore"] * fore + w["back"] * back + w["rmap"] * rmap + w["reg"] * reg
    return {"loss": loss, "fore": fore, "back": back, "rmap": rmap, "reg": reg}


DEFAULT_LOSS_WEIGHTS = {"paper": {"fore": 1.0, "back": 1.0, "rmap": 4.0, "reg": 1.0},
                        "official": {"fore": 0.25, "back": 0.5, "rmap": 16.0, "reg": 0.25}}


# ================================================================================= building from config
def _zoo(attr: str):
    try:
        import wsolbench.zoo as zoo
    except ImportError as exc:  # pragma: no cover
        raise ImportError("wsolbench.zoo is not available; the tiny profile needs the zoo models") from exc
    if not hasattr(zoo, attr):
        raise ImportError(f"wsolbench.zoo has no {attr}() yet")
    return getattr(zoo, attr)


def build_clip(cfg: dict, device: str) -> ClipTeacher:
    c = cfg["clip"]
    source = c["source"]
    if source in ("zoo", "zoo-random"):
        model, tokenizer = (_zoo("load_clip")(c["scale"]) if source == "zoo" else _zoo("create_clip")(c["scale"]))
    elif source == "open_clip":
        from wsolbench.weights import load_open_clip

        model, tokenizer = load_open_clip(c["name"], c["pretrained"], path=c.get("weights"), device=device)
    else:
        raise ValueError(f"clip.source must be open_clip, zoo or zoo-random, got {source!r}")
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = c.get("mean") or pre.get("mean") or (0.48145466, 0.4578275, 0.40821073)
    std = c.get("std") or pre.get("std") or (0.26862954, 0.26130258, 0.27577711)
    return ClipTeacher(model.to(device), tokenizer, mean, std)


def _encoder_features(cfg: dict) -> nn.Module:
    """The (random-init) feature CNN of ``encoder`` (grounding mode), weights come in ``load_pretrained``."""
    e = cfg["encoder"]
    source = e["source"]
    if source == "torchvision":
        if e["name"] != "vgg16":
            raise ValueError(f"encoder.name {e['name']!r}: the grounding encoder is torchvision vgg16")
        return vgg16_features()[: int(e["cut"])]
    if source in ("zoo", "zoo-random"):
        net = _zoo("create_backbone")("vgg", e["scale"])
        return _sequential_features(net)[: int(e["cut"])]
    raise ValueError(f"encoder.source must be torchvision, zoo or zoo-random, got {source!r}")


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same layer indices), without building the 120M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=False)


def _sequential_features(net: nn.Module) -> nn.Sequential:
    feats = getattr(net, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise TypeError(f"{type(net).__name__} has no nn.Sequential 'features' (a VGG-like CNN is expected)")
    return feats


def _unet_encoder(cfg: dict) -> nn.Module:
    u = cfg["unet"]
    backbone = u["backbone"]
    if backbone == "vgg16":
        return SequentialTaps(vgg16_features())
    if backbone in ("zoo-vgg", "zoo-vgg-random"):
        return SequentialTaps(_sequential_features(_zoo("create_backbone")("vgg", u["scale"])))
    import timm

    return FeatureListTaps(timm.create_model(backbone, pretrained=False, features_only=True))


def build_g(cfg: dict, text_dim: int) -> nn.Module:
    if cfg["mode"] == "grounding":
        feats = _encoder_features(cfg)
        c = feature_channels(feats, size=int(cfg["encoder"].get("probe_size", 64)))[-1]
        return TextConditionedG(feats, c, text_dim, int(cfg["decoder"]["mid_channels"]),
                                cfg["decoder"]["head_activation"])
    enc = _unet_encoder(cfg)
    return UNetG(enc, feature_channels(enc, size=int(cfg["unet"].get("probe_size", 64))))


# ================================================================================================ data
def drop_words(text: str, keep_prob: float, rng: np.random.Generator) -> str:
    """Keep each word with probability ``keep_prob`` (the official COCO augmentation); never empty."""
    words = text.split()
    if keep_prob >= 1.0 or not words:
        return text
    kept = [w for w in words if rng.random() < keep_prob]
    return " ".join(kept) if kept else words[int(rng.integers(len(words)))]


class TextImageDataset(torch.utils.data.Dataset):
    """(image in [0, 1], text) pairs for g's training; every random choice (caption, word dropout, crop,
    flip) comes from a generator seeded by (seed, epoch, index), so the data of an epoch is reproducible."""

    def __init__(self, samples: Sequence[Any], texts_of, *, resize: int, crop: int | None, hflip: bool,
                 word_keep_prob: float, prefix: str, seed: int) -> None:
        self.samples = list(samples)
        self.texts_of = texts_of
        self.resize, self.crop, self.hflip = int(resize), (int(crop) if crop else None), bool(hflip)
        self.word_keep_prob, self.prefix, self.seed = float(word_keep_prob), prefix, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        texts = self.texts_of(s)
        text = texts[int(rng.integers(len(texts)))]
        text = self.prefix + drop_words(text, self.word_keep_prob, rng)
        img = s.load_image().resize((self.resize, self.resize), resample=2)  # bilinear
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if self.crop and self.crop < self.resize:
            y = int(rng.integers(self.resize - self.crop + 1))
            x = int(rng.integers(self.resize - self.crop + 1))
            arr = arr[y:y + self.crop, x:x + self.crop]
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        label = int(s.labels[0]) if len(getattr(s, "labels", ())) else -1
        return {"image": torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), "text": text,
                "label": label, "index": int(index)}


# ============================================================================================ the method
def default_config() -> dict:
    from wsolbench.config import method_schema

    return method_schema("wwbl")


def apply_recipe(cfg: dict) -> dict:
    """``cfg`` with the null keys that ``recipes[recipe]`` names (dotted, e.g. ``train.lr``) set to the recipe's
    values; keys set in a config file or with --set keep their value."""
    name = cfg.get("recipe")
    recipes = cfg.get("recipes") or {}
    if name not in recipes:
        raise ValueError(f"recipe {name!r} is not one of {sorted(recipes)} (config key recipe)")
    out = copy.deepcopy(cfg)
    for dotted, value in recipes[name].items():
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = node[part]
        if node.get(leaf) is None:
            node[leaf] = copy.deepcopy(value)
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@dataclass
class OpenWorldResult:
    """WWbL's answer for one image without text input."""

    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1, original pixels
    captions: list[str]  # N cluster captions
    maps: torch.Tensor  # N×S×S, g's maps for the captions (raw, in [0, 1])
    embeddings: torch.Tensor  # N×D normalised CLIP text embeddings of the captions
    proposals: np.ndarray  # (P, 4) the proposals that were captioned
    proposal_captions: list[str]
    clusters: list[list[int]]  # indices into the proposals


@register_method("wwbl")
class WWbL(Localizer):
    """WWbL (see the module docstring). ``mode`` grounding: single/phrase/open; mode wsol: single."""

    capabilities = frozenset({Capability.SINGLE, Capability.PHRASE, Capability.OPEN})
    needs_training = True
    tiny_zoo = ("vgg", "clip", "captioner")
    pretrained = ("vgg16", "resnet50", "inception-v3", "clip-vit-b32-openai", "blip-caption-base")
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu", *, components: dict | None = None) -> None:
        cfg = apply_recipe(_deep_merge(default_config(), config or {}))
        super().__init__(cfg, class_names, device)
        components = components or {}
        self.mode = cfg["mode"]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if cfg["loss"]["variant"] not in LOSS_VARIANTS:
            raise ValueError(f"loss.variant must be one of {LOSS_VARIANTS}, got {cfg['loss']['variant']!r}")
        if self.mode == "wsol":
            self.capabilities = frozenset({Capability.SINGLE})
        self.input_size = int(cfg["input_size"])
        self.mean = tuple(cfg["mean"])
        self.std = tuple(cfg["std"])
        self.clip = components.get("clip") or build_clip(cfg, device)
        self.model = (components.get("g") or build_g(cfg, self.clip.embed_dim)).to(device).eval()
        self._captioner = components.get("captioner")
        self._open_cache: OrderedDict[str, OpenWorldResult] = OrderedDict()
        self.open_skipped: set[str] = set()  # images (content hashes) where the open-world pipeline found no cluster
        if cfg.get("official_checkpoint"):
            self.load_official_checkpoint(cfg["official_checkpoint"])

    @classmethod
    def from_components(cls, config: dict | None = None, *, clip: ClipTeacher, g: nn.Module, captioner: Any = None,
                        class_names: Sequence[str] | None = None, device: str = "cpu") -> "WWbL":
        """Assemble from ready-made parts (notebooks, tests): a ``ClipTeacher``, g, and optionally a captioner
        — a (model, processor) pair of transformers BLIP or any callable ``list[PIL] -> list[str]``."""
        return cls(config, class_names, device, components={"clip": clip, "g": g, "captioner": captioner})

    # ------------------------------------------------------------------------------------- helpers
    def _g_input(self, images01: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
        return (images01 - m) / s

    def _images01(self, images: Any, size: int | None = None) -> torch.Tensor:
        return self.preprocess(images, size=size or self.input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def class_text(self, label: int) -> str:
        name = class_text(self.class_names[label], lower=True) if 0 <= label < len(self.class_names) else "object"
        return self.config["class_text"].format(**{"class": name})

    def query_text(self, text: str) -> str:
        """A test-time query as the official test code writes it: ``prefix_test`` + the phrase, lower-cased
        when ``lower_test`` (``"image of " + phrase.lower()``, the training captions' form)."""
        t = self.config["text"]
        return t["prefix_test"] + (str(text).lower() if t["lower_test"] else str(text))

    def g_maps(self, images01: torch.Tensor, texts: Sequence[str] | None = None,
               out_size: tuple[int, int] | None = None, as_query: bool = True) -> torch.Tensor:
        """g's maps B×1×H×W for [0, 1] images (grounding mode: one text per image). ``as_query``: the texts are
        test queries (``query_text``); False feeds them as they are (open-world captions, as the official code)."""
        x = self._g_input(images01)
        if self.mode == "wsol":
            return self.model(x, None, out_size)
        if texts is None or len(texts) != x.shape[0]:
            raise InputError("grounding mode needs one text per image")
        z = self.clip.encode_text([self.query_text(t) for t in texts] if as_query else list(texts))
        return self.model(x, z, out_size)

    # ----------------------------------------------------------------------------------- interface
    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        from wsolbench.imaging import as_image_list

        imgs = as_image_list(images)
        b = len(imgs)
        self.model.eval()
        if texts is not None:
            self.require(Capability.PHRASE)
            return self._localize_phrases(imgs, self.text_queries(texts, b))
        if classes is None and self.mode == "grounding":
            self.require(Capability.OPEN)
            return self._localize_open(imgs)
        self.require(Capability.SINGLE)
        queries = self.class_queries(classes, b)
        x01 = self._images01(imgs)
        with torch.no_grad():
            if self.mode == "wsol":
                m = self.g_maps(x01)  # class-agnostic
                k = 1 if queries is None else len(queries[0])
                maps = m.expand(b, k, -1, -1)
            else:
                k = len(queries[0])
                flat = [self.class_text(c) for q in queries for c in q]
                maps = self.g_maps(x01.repeat_interleave(k, dim=0), flat).view(b, k, *x01.shape[-2:])
        return LocalizerOutput(maps=maps.float().cpu(), classes=queries)

    def _localize_phrases(self, imgs: list, queries: list[list[str]]) -> LocalizerOutput:
        extras_wanted = set(self.config["eval"]["extras"] or [])
        maps, extra_maps = [], {name: [] for name in extras_wanted}
        for img, q in zip(imgs, queries):
            x01 = self._images01([img])
            k = len(q)
            with torch.no_grad():
                maps.append(self.g_maps(x01.expand(k, -1, -1, -1), q)[:, 0])
            if "clip" in extras_wanted:
                z = self.clip.encode_text([self.query_text(t) for t in q])
                extra_maps["clip"].append(self.clip.relevancy(x01.expand(k, -1, -1, -1), z,
                                                              self.config["relevancy"]["mode"],
                                                              tuple(x01.shape[-2:]))[:, 0])
            if "open" in extras_wanted:
                res = self.open_world(img)
                if len(res.captions) == 0:  # no caption cluster: the official metric skips the image (NaN = no map)
                    extra_maps["open"].append(torch.full((k, *x01.shape[-2:]), float("nan")))
                else:  # group: the K texts are one entity's phrases (the harness, WWbL's protocol); each: K queries
                    groups = [list(q)] if self.config["eval"]["open_match"] == "group" else [[t] for t in q]
                    idx = self.match_captions(groups, res.embeddings)
                    extra_maps["open"].append(res.maps[idx * k if len(idx) == 1 else idx])
        out = LocalizerOutput(maps=torch.stack(maps).float().cpu())
        out.extras = {name: torch.stack(v).float().cpu() for name, v in extra_maps.items()}
        return out

    def _localize_open(self, imgs: list) -> LocalizerOutput:
        results = [self.open_world(img) for img in imgs]
        n = max([len(r.captions) for r in results] + [1])
        s = self.input_size
        maps = torch.zeros(len(imgs), n, s, s)
        for i, r in enumerate(results):
            if len(r.captions):
                maps[i, : len(r.captions)] = r.maps
        return LocalizerOutput(maps=maps, boxes=[r.boxes for r in results], captions=[r.captions for r in results],
                               extras={})

    # --------------------------------------------------------------------------- open world (WWbL)
    @property
    def captioner(self):
        if self._captioner is None:
            self._captioner = build_captioner(self.config, self.device)
        return self._captioner

    def caption_crops(self, crops: list) -> list[str]:
        """One caption per crop: a callable captioner as it answers; a transformers BLIP (model, processor)
        prompted with ``captioner.prompt`` (BLIP's "a picture of "), beam search, the prompt removed."""
        if callable(self.captioner) and not isinstance(self.captioner, tuple):
            return [str(c).strip() for c in self.captioner(crops)]
        model, processor = self.captioner
        c = self.config["captioner"]
        prompt = c.get("prompt") or ""
        out: list[str] = []
        bs = int(c["batch_size"])
        for i in range(0, len(crops), bs):
            batch = crops[i:i + bs]
            kw = {"text": [prompt] * len(batch)} if prompt else {}
            inputs = processor(images=batch, return_tensors="pt", **kw)
            gen = dict(num_beams=int(c["num_beams"]), max_length=int(c["max_length"]), do_sample=False)
            if c.get("min_length"):
                gen["min_length"] = int(c["min_length"])
            if prompt:
                gen["input_ids"] = inputs["input_ids"].to(model.device)
            with torch.no_grad():
                ids = model.generate(pixel_values=inputs["pixel_values"].to(model.device), **gen)
            out += [strip_prompt(t, prompt) for t in processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    def open_world(self, image: Any) -> OpenWorldResult:
        """WWbL without text: proposals → captions → CLIP clustering → one g map and one box per cluster.

        Results are cached per image content (the harness asks once per phrase)."""
        from PIL import Image

        from wsolbench.maps.clustering import closest_to_centroid, community_detection
        from wsolbench.maps.proposals import wwbl_proposals

        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("RGB")
        key = hashlib.sha1(np.asarray(pil).tobytes() + str(pil.size).encode()).hexdigest()
        if key in self._open_cache:
            self._open_cache.move_to_end(key)
            return self._open_cache[key]
        o = self.config["open"]
        w0, h0 = pil.size
        size = int(o["proposal_size"])
        # selective search sees g's normalised input at 224 (official); crops come from the PIL image resized
        # to 224 (PIL's default bicubic, as the official np_img)
        ss_input = self._g_input(self._images01([pil], size=size))[0].permute(1, 2, 0).contiguous().numpy()
        boxes224 = wwbl_proposals(ss_input, mode=o["selective_search"], grid_fractions=tuple(o["grid_fractions"]),
                                  min_area_frac=float(o["min_area_frac"]), max_proposals=o["max_proposals"])
        small = pil.resize((size, size), Image.BICUBIC)
        crops = [small.crop(tuple(int(v) for v in b)) for b in boxes224]
        props = (boxes224 * np.array([w0 / size, h0 / size, w0 / size, h0 / size])).astype(np.float32)
        captions = self.caption_crops(crops) if crops else []
        emb = self.clip.encode_text(captions) if captions else torch.zeros(0, self.clip.embed_dim)
        clusters = community_detection(emb.cpu(), threshold=float(o["cluster_threshold"]),
                                       min_size=int(o["cluster_min_size"])) if captions else []
        if not clusters:
            self.open_skipped.add(key)
        names = [captions[closest_to_centroid(emb.cpu(), c)] for c in clusters]
        if names:
            x01 = self._images01([pil])
            with torch.no_grad():
                maps = self.g_maps(x01.expand(len(names), -1, -1, -1), names, as_query=False)[:, 0].float().cpu()
            boxes = np.stack([self.map_box(m.numpy(), (w0, h0)) for m in maps]).astype(np.float32)
            name_emb = self.clip.encode_text(names).cpu()
        else:
            maps = torch.zeros(0, self.input_size, self.input_size)
            boxes = np.zeros((0, 4), np.float32)
            name_emb = torch.zeros(0, emb.shape[-1] if emb.ndim == 2 else self.clip.embed_dim)
        res = OpenWorldResult(boxes=boxes, captions=names, maps=maps, embeddings=name_emb, proposals=props,
                              proposal_captions=captions, clusters=clusters)
        self._open_cache[key] = res
        while len(self._open_cache) > int(o["cache_size"]):
            self._open_cache.popitem(last=False)
        return res

    def match_captions(self, phrase_groups: Sequence[Sequence[str]], caption_embeddings: torch.Tensor) -> list[int]:
        """For each GT entity (one or more phrases), the index of the closest predicted caption in CLIP space:
        argmax over captions of <mean of the phrases' normalised embeddings, caption embedding> (the official
        metric: the GT phrases as test queries, ``query_text``; the captions as generated)."""
        out = []
        cap = F.normalize(caption_embeddings.float().cpu(), dim=-1)
        for phrases in phrase_groups:
            z = self.clip.encode_text([self.query_text(p) for p in phrases]).cpu().mean(dim=0)
            out.append(int(torch.argmax(cap @ z)))
        return out

    def map_box(self, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The grounding box (x0, y0, x1, y1 in original pixels) of a map: resized (bilinear) to the image,
        then the WWbL rule (min-max, zero below 0.5·max, a box per contour scored by its mean, NMS 0.05, keep
        > 0.5 × best, union) from ``wsolbench.metrics``."""
        import cv2

        w, h = size
        resized = cv2.resize(np.asarray(m, np.float32), (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        return grounding_box(resized).astype(np.float32)

    def wsol_box(self, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """WWbL's WSOL box: zero below 0.1·max, bounding box of the largest contour (original pixels)."""
        import cv2

        w, h = size
        resized = cv2.resize(np.asarray(m, np.float32), (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
        return largest_contour_box(resized, float(self.config["wsol"]["box_threshold"])).astype(np.float32)

    # ------------------------------------------------------------------------------------ training
    def losses(self, images01: torch.Tensor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The WWbL losses for a batch of [0, 1] images and their (already prefixed) texts."""
        cfg = self.config
        z_t = self.clip.encode_text(list(texts))
        size = tuple(images01.shape[-2:])
        x = self._g_input(images01)
        m = self.model(x, None, size) if self.mode == "wsol" else self.model(x, z_t, size)
        r = self.clip.relevancy(images01, z_t, cfg["relevancy"]["mode"], size).to(m.dtype)
        mc = F.interpolate(m, size=self.clip.size, mode="bilinear", align_corners=True)
        cin = self.clip.prepare(images01)  # masked in CLIP's normalised space (0 = the mean colour), as the code
        z_fg = self.clip.encode_image(cin * mc)
        z_bg = self.clip.encode_image(cin * (1.0 - mc))
        variant = cfg["loss"]["variant"]
        out = wwbl_losses(m, r, z_fg, z_bg, z_t, variant, cfg["loss"]["weights"][variant])
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}

    def _texts_fn(self):
        t = self.config["text"]

        def texts_of(s) -> list[str]:
            if self.mode == "grounding" and t["train_source"] in ("captions", "auto"):
                if getattr(s, "captions", ()):
                    return list(s.captions)
                if getattr(s, "phrases", ()):
                    return [p.text for p in s.phrases]
                if t["train_source"] == "captions":
                    raise ValueError(f"{s.image_id}: no captions to train on (text.train_source: captions)")
            label = int(s.labels[0]) if len(getattr(s, "labels", ())) else -1
            return [self.class_text(label)]

        return texts_of

    def load_pretrained(self) -> list[str]:
        """Copy the pretrained backbone weights into g's encoder (ImageNet VGG16 / ResNet50 / InceptionV3 from
        the weights catalogue, or the zoo CNN); returns the loaded tensor names."""
        from wsolbench.weights import load_state_dict, resolve

        cfg = self.config
        if self.mode == "grounding":
            e = cfg["encoder"]
            if e["source"] == "zoo":
                src = _sequential_features(_zoo("load_backbone")("vgg", e["scale"]))[: int(e["cut"])]
                self.model.E.Org_model.load_state_dict(src.state_dict())
                return list(src.state_dict())
            if e["source"] == "torchvision" and e.get("pretrained"):
                path = resolve("vgg16", None if e["pretrained"] == "imagenet" else e["pretrained"])
                return _load_vgg_features(self.model.E.Org_model, load_state_dict(path))
            return []
        u = cfg["unet"]
        if u["backbone"] == "zoo-vgg":
            src = _sequential_features(_zoo("load_backbone")("vgg", u["scale"]))
            own = self.model.E.Org_model.state_dict()
            state = {k: v for k, v in src.state_dict().items() if k in own}
            self.model.E.Org_model.load_state_dict(state)
            return list(state)
        if u["backbone"] == "zoo-vgg-random" or not u.get("pretrained"):
            return []
        explicit = None if u["pretrained"] == "imagenet" else u["pretrained"]
        if u["backbone"] == "vgg16":
            return _load_vgg_features(self.model.E.Org_model, load_state_dict(resolve("vgg16", explicit)))
        catalogue = {"resnet50": "resnet50", "inception_v3": "inception-v3"}  # torchvision names = timm's
        if u["backbone"] not in catalogue and explicit is None:
            raise ValueError(f"unet.pretrained: give the path of ImageNet weights for {u['backbone']!r} (the weights "
                             "catalogue has vgg16, resnet50, inception_v3)")
        path = resolve(catalogue[u["backbone"]], explicit) if u["backbone"] in catalogue else Path(explicit)
        state = load_state_dict(path)
        own = self.model.E.Org_model.state_dict()
        state = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{path}: {len(missing)} backbone tensors of {u['backbone']} missing, e.g. {missing[:3]}")
        self.model.E.Org_model.load_state_dict(state, strict=False)
        return sorted(state)

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        from wsolbench.training import TrainLoop, make_loader, seed_everything

        cfg = self.config
        t = cfg["train"]
        if cfg.get("official_checkpoint"):
            log.info("WWbL: official checkpoint loaded; skipping training")
            return {"skipped": "official_checkpoint"}
        seed_everything(int(t["seed"]))
        if not (resume and out_dir is not None and (Path(out_dir) / "last.pt").exists()):
            self.load_pretrained()
        size = int(t["size"])
        ds = TextImageDataset(list(train_data), self._texts_fn(), resize=int(t["resize"] or size),
                              crop=t["crop"], hflip=bool(t["hflip"]), word_keep_prob=float(t["word_keep_prob"]),
                              prefix=cfg["text"]["prefix_train"], seed=int(t["seed"]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=float(t["lr"]), momentum=float(t["momentum"]),
                              weight_decay=float(t["weight_decay"]))
        out = Path(out_dir) if out_dir is not None else None
        best = _BestKeeper(out, self.model)
        if resume:
            best.restore()
        val_samples = list(val_data)[: t["val_limit"]] if (val_data is not None and t["val_limit"] != 0) else []

        calib = int(t["bn_recalibration_batches"] or 0)

        def on_epoch_end(epoch: int, record: dict) -> None:
            if calib:
                self.recalibrate_bn(ds, calib, int(t["batch_size"]))
            if val_samples and t["select_by"] == "pointing":
                score = self.val_pointing(val_samples)
                record["val_pointing"] = score
                best.offer(score, epoch + 1)
            self.model.train()

        def loader(epoch: int):
            ds.set_epoch(epoch)
            return make_loader(ds, None, batch_size=int(t["batch_size"]), shuffle=True, seed=int(t["seed"]),
                               drop_last=len(ds) > int(t["batch_size"]), epoch=epoch,
                               num_workers=int(t["num_workers"]))

        def step(batch: dict) -> dict:
            return self.losses(batch["image"].to(self.device), batch["text"])

        loop = TrainLoop(out, epochs=int(t["epochs"]), modules={"g": self.model}, optimizer=opt,
                         progress=progress, desc="wwbl", max_steps_per_epoch=t["max_steps_per_epoch"],
                         on_epoch_end=on_epoch_end)
        history = loop.run(loader, step, resume=resume)
        self.model.eval()
        if best.best_state is not None:
            self.model.load_state_dict(best.best_state)
        return {"history": history, "best_epoch": best.best_epoch, "best_val_pointing": best.best_score}

    def recalibrate_bn(self, ds: "TextImageDataset", num_batches: int, batch_size: int) -> None:
        """Re-estimate g's BatchNorm running statistics with the current weights ("precise BN"): a cumulative
        average over the first ``num_batches`` batches of a fixed, deterministic pass over the training data.
        Short trainings otherwise leave running statistics that lag the weights, and the 1-channel BN of the
        official head then zeroes the whole map in eval mode."""
        bns = [mod for mod in self.model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        fixed = copy.copy(ds)
        fixed.set_epoch(2**31 - 1)  # its own crops/captions, the same at every call
        momenta = [b.momentum for b in bns]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
        self.model.train()
        n = len(fixed)
        with torch.no_grad():
            for k in range(min(num_batches, math.ceil(n / batch_size))):
                items = [fixed[i] for i in range(k * batch_size, min(n, (k + 1) * batch_size))]
                x01 = torch.stack([it["image"] for it in items]).to(self.device)
                x = self._g_input(x01)
                if self.mode == "wsol":
                    self.model(x, None, tuple(x.shape[-2:]))
                else:
                    self.model(x, self.clip.encode_text([it["text"] for it in items]), tuple(x.shape[-2:]))
        for b, mom in zip(bns, momenta):
            b.momentum = mom

    def val_pointing(self, samples: Sequence[Any]) -> float:
        """Pointing accuracy (``wsolbench.metrics.PhrasePointing``: argmax of the map resized to the image,
        inside the union of the GT boxes, as the official ``inference_bbox``) on ``samples``: per (image, phrase with boxes) for phrase data, per image with its
        class text for box data. The model-selection criterion of the official code."""
        from wsolbench.metrics import PhrasePointing
        from wsolbench.metrics.pointing import union_box

        metric = PhrasePointing()
        self.model.eval()
        for s in samples:
            img = s.load_image()
            if getattr(s, "phrases", ()):
                queries = [(p.text, p.boxes) for p in s.phrases if len(p.boxes)]
            else:
                queries = [(self.class_text(int(s.labels[0]) if len(s.labels) else -1), s.boxes)]
            queries = [q for q in queries if len(q[1])]
            if not queries:
                continue
            x01 = self._images01([img])
            with torch.no_grad():
                maps = self.g_maps(x01.expand(len(queries), -1, -1, -1), [q[0] for q in queries])[:, 0]
            metric.update(list(maps.float().cpu().numpy()), [union_box(q[1]) for q in queries],
                          [img.size] * len(queries))
        return float(metric.compute()["pointing_acc"]) if metric.count else 0.0

    # ---------------------------------------------------------------------------------- persistence
    def load_official_checkpoint(self, path: str | Path) -> None:
        """Load the authors' grounding g (their pickled ``net_best.pth`` or its state dict; ``module.E.Org_model.*``
        / ``module.D.*`` keys); ``load_report`` records what it gave."""
        if self.mode != "grounding":
            raise ValueError(f"{path}: the official checkpoint is the grounding model; set mode: grounding")
        self.load_report = load_official_into(self.model, path)

    @classmethod
    def load_foreign(cls, path: str | Path, config: dict, class_names: Sequence[str] | None = None,
                     device: str = "cpu") -> "WWbL":
        """``wsolbench run --checkpoint FILE``: the authors' grounding checkpoint, as ``official_checkpoint``."""
        return cls(_deep_merge(config, {"official_checkpoint": str(path)}), class_names, device)


class _BestKeeper:
    """Keeps the g weights of the best validation epoch (in memory and, with an out_dir, on disk, so a
    resumed run knows the best so far)."""

    def __init__(self, out_dir: Path | None, model: nn.Module) -> None:
        self.out_dir, self.model = out_dir, model
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def restore(self) -> None:
        if self.out_dir is None or not (self.out_dir / "best.json").exists():
            return
        from safetensors.torch import load_file

        meta = json.loads((self.out_dir / "best.json").read_text(encoding="utf-8"))
        self.best_score, self.best_epoch = float(meta["score"]), int(meta["epoch"])
        self.best_state = load_file(str(self.out_dir / "best.safetensors"))

    def offer(self, score: float, epoch: int) -> None:
        if self.best_score is not None and score <= self.best_score:
            return
        self.best_score, self.best_epoch = float(score), int(epoch)
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.out_dir is not None:
            from wsolbench.checkpoint import save_tensors
            from wsolbench.io import write_json

            save_tensors(self.best_state, self.out_dir / "best.safetensors")
            write_json(self.out_dir / "best.json", {"score": self.best_score, "epoch": self.best_epoch})


def _load_vgg_features(trunk: nn.Sequential, state: dict[str, torch.Tensor]) -> list[str]:
    """torchvision VGG16 ``features.<i>.*`` tensors → a ``features[:k]`` slice (or the U-Net taps)."""
    own = trunk.state_dict()
    mapped = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    mapped = {k: v for k, v in mapped.items() if k in own}
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ValueError(f"not torchvision VGG16 weights: {len(missing)} tensors missing, e.g. {missing[:3]}")
    trunk.load_state_dict(mapped)
    return sorted(mapped)


def strip_prompt(caption: str, prompt: str) -> str:
    """A BLIP caption without its prompt (BLIP's ``generate`` returns ``caption[len(prompt):]``)."""
    caption, stem = caption.strip(), prompt.strip()
    return caption[len(stem):].strip() if stem and caption.lower().startswith(stem.lower()) else caption


def grounding_box(m: np.ndarray) -> np.ndarray:
    """The WWbL grounding box (x0, y0, x1, y1, map pixels) of a map: ``wsolbench.metrics.grounding.generate_box``
    (min-max, cubehelix gray, zero at or below int(0.5·max), a box per contour scored by its mean, NMS 0.05,
    keep > 0.5 × best, union)."""
    from wsolbench.metrics.grounding import generate_box

    return np.asarray(generate_box(np.asarray(m, np.float64)), np.float64)


def largest_contour_box(m: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """WWbL's WSOL box (its ``generate_bbox``): the map min-max normalised to the same cubehelix gray as the
    grounding rule, zeroed below int(threshold · max), bounding box (x, y, x + w, y + h) of the largest contour
    by ``cv2.contourArea``; no contour → (0, 0, 1, 1)."""
    import cv2

    from wsolbench.metrics.grounding import cubehelix_gray

    gray = cubehelix_gray(np.asarray(m, np.float64))
    _, thr = cv2.threshold(gray, int(threshold * np.max(gray)), 255, cv2.THRESH_TOZERO)
    contours = cv2.findContours(thr, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.array([0.0, 0.0, 1.0, 1.0])
    x, y, w, h = cv2.boundingRect(max(contours, key=cv2.contourArea))
    return np.array([x, y, x + w, y + h], np.float64)


def build_captioner(cfg: dict, device: str):
    c = cfg["captioner"]
    source = c["source"]
    if source in ("zoo", "zoo-random"):
        model, processor = (_zoo("load_captioner")(c["scale"]) if source == "zoo" else
                            _zoo("create_captioner")(c["scale"]))
    elif source == "transformers":
        from wsolbench.weights import load_blip

        model, processor = load_blip(c.get("weights"), device=device)
    else:
        raise ValueError(f"captioner.source must be transformers, zoo or zoo-random, got {source!r}")
    return model.to(device).eval(), processor


def evaluate_wwbl_protocol(method: WWbL, dataset: Any, variants: Sequence[str] = ("grounding", "open"),
                           limit: int | None = None, min_area_frac: float = 0.05) -> dict[str, dict[str, float]]:
    """The WWbL Flickr30k protocol (its ``inference_bbox`` and ``wwbl_algo1_point_metric``), scored with
    ``wsolbench.metrics``: one query per (image, entity) of ``grounding_samples`` (entities whose first box
    covers > 5% of the image), with all the phrases of the 5 sentences that refer to it.

    - ``grounding``: g's maps of the entity's phrases, averaged;
    - ``open``: the open-world pipeline runs once per image (no text); the entity's phrases (mean of their
      normalised CLIP embeddings, as test queries) pick the closest predicted caption, whose map is scored; an
      image where the pipeline formed no caption cluster is skipped, as the official metric does, and counted
      (``skipped_images``);
    - ``clip``: the CLIP relevancy maps of the phrases, averaged (the teacher).

    Pointing: argmax inside the entity's union box; box accuracy: the grounding box vs the union GT box.
    ``limit``: the first N images. Returns {variant: {pointing_game, bbox_acc, entities, skipped_images}}.
    """
    import cv2

    from wsolbench.datasets.flickr30k import grounding_samples
    from wsolbench.metrics import GroundingBoxAccuracy, PhrasePointing
    from wsolbench.metrics.pointing import union_box

    samples = list(dataset)[:limit] if limit else list(dataset)
    queries = grounding_samples(samples, min_area_frac=min_area_frac)
    by_image: dict[str, list] = OrderedDict()
    for q in queries:
        by_image.setdefault(q.image_id, []).append(q)
    paths = {s.image_id: s for s in samples}
    mets = {v: (PhrasePointing(), GroundingBoxAccuracy()) for v in variants}
    skipped = dict.fromkeys(variants, 0)
    method.model.eval()
    for image_id, qs in by_image.items():
        img = paths[image_id].load_image()
        w, h = img.size
        x01 = method._images01([img])
        res = method.open_world(img) if "open" in variants else None
        if res is not None and not res.captions:
            skipped["open"] += 1
        for q in qs:
            phrases = list(q.phrases)
            for v in variants:
                if v == "grounding":
                    with torch.no_grad():
                        m = method.g_maps(x01.expand(len(phrases), -1, -1, -1), phrases)[:, 0].mean(0)
                elif v == "clip":
                    z = method.clip.encode_text([method.query_text(p) for p in phrases])
                    m = method.clip.relevancy(x01.expand(len(phrases), -1, -1, -1), z,
                                              method.config["relevancy"]["mode"], tuple(x01.shape[-2:]))[:, 0].mean(0)
                elif v == "open":
                    if not res.captions:
                        continue
                    m = res.maps[method.match_captions([phrases], res.embeddings)[0]]
                else:
                    raise ValueError(f"unknown variant {v!r}; use grounding, open, clip")
                mm = cv2.resize(m.float().cpu().numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
                mets[v][0].update([mm], [union_box(q.boxes)])
                mets[v][1].update([mm], [q.boxes])
    out = {}
    for v, (pt, bx) in mets.items():
        out[v] = {"pointing_game": pt.compute()["pointing_acc"] if pt.count else float("nan"),
                  "bbox_acc": bx.compute()["box_acc"] if bx.count else float("nan"), "entities": pt.count,
                  "skipped_images": skipped[v]}
    return out
