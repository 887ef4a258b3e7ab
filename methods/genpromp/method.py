"""GenPromp (Zhao et al., ICCV 2023): WSOL as conditional image denoising with generative prompts.

Model: a latent diffusion model (VAE, cross-attention U-Net, CLIP text encoder; Stable Diffusion v1.4 in the
paper profile, the zoo's synthetic-world model in the tiny profile) plus a test-time classifier for the
category (EfficientNet-B7 in the paper; here a timm model, the zoo classifier, or a predictions JSON in the
official format ``{image name: {"pred_scores": [C floats]}}``).

Prompts (per class c, each the text-encoder ``last_hidden_state`` averaged over the 7 templates):
  * f_d, discriminative: "a photo of a {meta token}"; the meta token is ``prompts.meta_token`` when set
    ("bird" for CUB), else taken from the class's FULL name by the official rule: split it into
    comma-separated synonyms, take each synonym's LAST word, use the first of those that is a single
    tokenizer token, else the last BPE piece of the first one ("electric ray, crampfish" -> "ray",
    "hammerhead, hammerhead shark" -> "shark"). The full names come from ``class_synonyms`` (the harness
    passes the dataset's: ILSVRC's synset mapping), else the class names.
  * f_r, representative: "a photo of a <cub-c>" with a learned concept token (id = tokenizer size + c,
    49408 + c for SD) whose embedding row is initialised from the meta token's.
  * f_c = w * f_r + (1 - w) * f_d (``prompts.combine_ratio`` w = 0.6); ``prompts.embedding`` selects
    f_d / f_r / f_c for the paper's ablation.

Training (``fit``): stage 1 learns each class's concept row alone with the denoising loss
||eps - eps_theta(z_t, t, f_r)||^2 on that class's images (every other parameter frozen; classes can be
run side by side with ``parallel_classes``: each row has its own AdamW and only its own images' loss, so
this is exactly per-class training in lockstep). Stage 2 finetunes the whole U-Net with
f = 0.5 f_r + 0.5 f_d. Both resume (stage 1 per finished class, stage 2 every ``save_steps``) and write
the official checkpoint layout: ``tokens/{token_id}.bin`` = ``{token: tensor[D]}`` and ``unet/``
(diffusers ``save_pretrained``); official checkpoints load through ``model.token_path``/``model.unet_path``.

Inference (``localize``): image -> uint8 RGB, PIL bicubic resize to ``model.image_size``, x/127.5 - 1 (the
official pipeline) -> one VAE sample x scaling factor = z_0; one Gaussian noise draw per image shared by all
timesteps (``draws``: a hook that supplies z_0 / the VAE draw and the noise instead, e.g. the official run's);
z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps; ONE U-Net forward over the batch of (query, timestep)
pairs conditioned on the query's prompt embedding; cross-attention probabilities (explicit softmax in the
U-Net's dtype or float32, ``inference.softmax_dtype``; ``wsolbench.maps.cross_attention``) recorded only at the
configured layers, at the class token's position (index 5 of "<bos> a photo of a X"), averaged over heads.

TIMESTEP INDEXING: ``inference.timesteps`` are diffusers scheduler indices, 0-based (t = 0..999, the
index into ``alphas_cumprod``). The paper's t = 1 and t = 100 are indices 0 and 99, the official code's
values; the default is ``[0, 99]``.

Aggregation (the official ``diffusion_cam``): ``inference.groups`` lists layer groups by U-Net place
(down/mid/up) and level (spatial size = latent / 2**level). The paper's default for a 64x64 latent is three
groups: every 8x8 map (level 3: the mid block for SD), the 16x16 maps of the up path, the 16x16 maps of the
down path. Each group is averaged over heads, layers and timesteps, resized (bicubic) to ``map_size``
(64); the groups are averaged and each map is divided by its maximum.

Classifier: GT-known maps come from ``localize(images, classes=gt)``; ``out.logits`` are the classifier's
scores, so Top-1/Top-5 Loc follow (a prediction counts only when it is the GT class, whose map is then
the predicted class's map, as in the official top1/top5 modes). ``localize(images)`` (no classes) maps the
classifier's top-1 class; ``localize_predicted(images, k)`` the top-k. A predictions JSON is read by image
id (``meta``, which the harness passes); without ids, or for an id the file lacks, ``localize`` raises rather
than return maps without scores. Capabilities: ``single`` and ``phrase`` (not ``multi``: the paper never
maps every class of an image, and doing so costs C U-Net passes per image).

Phrases: ``localize(images, texts=[[...]])`` conditions on "a photo of a {phrase}" (f_d only: a phrase
has no learned concept token) and averages the attention over the phrase's token positions.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsolbench.maps.cross_attention import (AttentionLayer, AttentionRecorder, select_layers, unet_attention_layers)
from wsolbench.classnames import class_text
from wsolbench.imaging import as_image_list, to_float_chw
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method
from wsolbench.weights import diffusers_load_kwargs, load_diffusers_folder

log = logging.getLogger(__name__)

TEMPLATES = ("a photo of a {}", "a rendering of a {}", "the photo of a {}", "a photo of my {}",
             "a photo of the {}", "a photo of one {}", "a rendition of a {}")
EMBEDDINGS = ("combined", "discriminative", "representative")
STAGE2_STATE = "stage2_state.pt"
SYNONYMS_FILE = "class_synonyms.json"


# ------------------------------------------------------------------------------------------ prompts
def select_meta_token(class_name: str, tokenizer) -> str:
    """The official meta-token rule (see the module docstring) on one class's full name: all its
    comma-separated synonyms ("hammerhead, hammerhead shark" -> "shark"; its first synonym alone gives the
    BPE piece "head")."""
    synonyms = [s.strip() for s in class_text(class_name, synonyms="all").split(",") if s.strip()]
    if not synonyms:
        raise ValueError(f"empty class name {class_name!r}")
    words = [s.split(" ")[-1] for s in synonyms]
    for w in words:
        if len(tokenizer.encode(w, add_special_tokens=False)) == 1:
            return w
    ids = tokenizer.encode(words[0], add_special_tokens=False)
    # CLIP's decode drops the end-of-word mark; a deep-copied transformers-5 tokenizer no longer does
    return tokenizer.decode([ids[-1]]).replace("</w>", " ").strip()


def _check_synonyms(synonyms: Sequence[Sequence[str]] | None, class_names: Sequence[str]) -> list[tuple[str, ...]] | None:
    """One non-empty tuple of names per class, or None."""
    if synonyms is None:
        return None
    out = [tuple(str(n) for n in ([s] if isinstance(s, str) else s)) for s in synonyms]
    if len(out) != len(class_names) or not all(out):
        raise ValueError(f"class_synonyms must hold one non-empty list of names per class ({len(class_names)}), "
                         f"got {len(out)}")
    return out


def combine_embeddings(f_r: torch.Tensor, f_d: torch.Tensor, ratio: float, mode: str = "combined"):
    """f_c = ratio * f_r + (1 - ratio) * f_d; ``mode`` discriminative/representative returns f_d / f_r."""
    if mode == "discriminative":
        return f_d
    if mode == "representative":
        return f_r
    if mode != "combined":
        raise ValueError(f"prompts.embedding must be one of {EMBEDDINGS}, got {mode!r}")
    return ratio * f_r + (1.0 - ratio) * f_d


class ConceptTokenEmbedding(nn.Module):
    """The text encoder's token embedding plus one separately-trainable row per concept token.

    Ids below ``offset`` read the frozen base table; id ``offset + c`` reads ``rows[c]``. Keeping each row
    its own Parameter lets stage 1 train exactly one class's row (and lets AdamW's weight decay touch
    nothing else)."""

    def __init__(self, base: nn.Embedding, init: torch.Tensor, offset: int) -> None:
        super().__init__()
        self.base = base
        self.offset = int(offset)
        self.rows = nn.ParameterList([nn.Parameter(r.detach().clone(), requires_grad=False) for r in init])
        # None, or one factor per sequence multiplying the vocabulary rows it reads: stage 1's official
        # weight decay of the whole (shared) token-embedding matrix, without touching the frozen table
        self.base_scale: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # what get_input_embeddings().weight users expect
        return torch.cat([self.base.weight[: self.offset], self.table()], 0)

    @property
    def num_embeddings(self) -> int:
        return self.offset + len(self.rows)

    def table(self) -> torch.Tensor:
        return torch.stack(list(self.rows)) if len(self.rows) else self.base.weight[:0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_concept = ids >= self.offset
        out = self.base(torch.where(is_concept, torch.zeros_like(ids), ids))
        if self.base_scale is not None:
            out = out * self.base_scale.to(out).view(-1, *([1] * (out.ndim - 1)))
        if not bool(is_concept.any()):
            return out
        concept_ids = (ids[is_concept] - self.offset).tolist()
        uniq = sorted(set(concept_ids))
        if uniq[-1] >= len(self.rows):
            raise IndexError(f"concept token id {self.offset + uniq[-1]} has no embedding row "
                             f"({len(self.rows)} concepts)")
        pos = {c: i for i, c in enumerate(uniq)}
        table = torch.stack([self.rows[c] for c in uniq]).to(out.dtype)
        out = out.clone()
        out[is_concept] = table[torch.tensor([pos[c] for c in concept_ids], device=out.device)]
        return out


# ------------------------------------------------------------------------------------------ pixels, draws
def official_pixels(img: Any, size: int, index: int = 0) -> torch.Tensor:
    """3×S×S in [-1, 1] as the official pipeline makes them: the uint8 RGB image, PIL bicubic resize to
    S×S, then x / 127.5 - 1 (computed in float64, stored float32). Non-PIL inputs become uint8 first
    (float images in [0, 1] are rounded to the nearest grey level)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        pil = img.convert("RGB")
    elif isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        pil = Image.fromarray(img)
    else:
        chw = to_float_chw(img, index)
        pil = Image.fromarray((chw.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8))
    if pil.size != (size, size):
        pil = pil.resize((size, size), resample=Image.BICUBIC)
    arr = (np.asarray(pil, dtype=np.uint8) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class LatentDraws:
    """Random draws given to the method instead of its own (``GenPromp.draws``), one row per image of a
    ``localize`` call: ``noise`` (B×C×h×w diffusion noise, shared by every timestep) and either ``z0``
    (B×C×h×w latents already × the VAE scaling factor; the VAE is then skipped) or ``vae_eps`` (B×C×h×w
    N(0, 1) of the posterior sample z0 = (mean + std·eps)·scaling). With neither, the VAE sample is drawn
    from torch's global generator."""

    noise: torch.Tensor
    z0: torch.Tensor | None = None
    vae_eps: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------ aggregation
def group_layers(layers: Sequence[AttentionLayer], groups: Sequence[dict]) -> list[list[AttentionLayer]]:
    """The layers of each configured group (``{places: [...], levels: [...]}``); empty groups are errors."""
    out = []
    for i, g in enumerate(groups):
        sel = select_layers(layers, places=g.get("places"), levels=g.get("levels"), blocks=g.get("blocks"))
        if not sel:
            have = sorted({(l.place, l.level) for l in layers})
            raise ValueError(f"inference.groups[{i}] = {g} matches no cross-attention layer of this U-Net; "
                             f"it has (place, level): {have}")
        out.append(sel)
    return out


def group_maps(layer_maps: dict[str, torch.Tensor], groups: Sequence[Sequence[AttentionLayer]],
               out_size: int) -> torch.Tensor:
    """Per group (the official ``diffusion_cam`` groups): the mean over its layers and the T timesteps of
    ``layer_maps[name]`` (Q×T×h×w, already averaged over heads), resized bicubic (cv2 INTER_CUBIC's kernel)
    to out_size. Returns G×Q×out_size×out_size float32."""
    per_group = []
    for layers in groups:
        stack = torch.stack([layer_maps[l.name].float().mean(dim=1) for l in layers], 0).mean(0)  # Q×h×w
        per_group.append(F.interpolate(stack[:, None], size=(out_size, out_size), mode="bicubic",
                                       align_corners=False)[:, 0])
    return torch.stack(per_group, 0)


def aggregate_maps(layer_maps: dict[str, torch.Tensor], groups: Sequence[Sequence[AttentionLayer]],
                   out_size: int, eps: float = 1e-12) -> torch.Tensor:
    """The official aggregation: the mean of the ``group_maps``, each map divided by its max.
    Returns Q×out_size×out_size float32."""
    cams = group_maps(layer_maps, groups, out_size).mean(0)
    return cams / cams.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)


# ------------------------------------------------------------------------------------------ components
def _torch_dtype(name: str) -> torch.dtype:
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"model.dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _cast(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move to device; change dtype only when it differs (diffusers warns on every dtype cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def missing_weights(message: str) -> Exception:
    from wsolbench.weights import MissingWeightsError

    return MissingWeightsError(message)


def _resolve_pretrained(name: str) -> Path:
    """A local diffusers folder for ``name`` (a folder, or a catalogue/hub name resolved offline by
    ``wsolbench.weights``: weights dir, then the Hugging Face cache; MissingWeightsError otherwise)."""
    from wsolbench import weights

    return Path(weights.resolve_diffusers(name))


def _resolve_file(path: str | None) -> Path | None:
    """A user path: absolute/relative to the CWD, else relative to the weights dir."""
    if path in (None, ""):
        return None
    p = Path(str(path)).expanduser()
    if p.exists():
        return p
    from wsolbench.paths import weights_dir

    wd = weights_dir()
    if wd is not None and (wd / p).exists():
        return wd / p
    return p


def _build_components(cfg: dict) -> dict:
    m = cfg["model"]
    if m["source"] == "zoo":
        from wsolbench import zoo

        scale = m["zoo_scale"]
        if scale == "micro":
            return zoo.create_diffusion_components("micro")
        return load_diffusers_folder(zoo.diffusion_dir(scale))
    if m["source"] == "pretrained":
        return load_diffusers_folder(_resolve_pretrained(m["pretrained"]))
    raise ValueError(f"model.source must be 'pretrained' or 'zoo', got {m['source']!r}")


# ------------------------------------------------------------------------------------------ classifier
class PredictionsClassifier:
    """Class scores from an official-format JSON ``{image name: {"pred_scores": [C floats]}}``.

    Keys are matched to ``image_ids`` exactly, then without extension, then by basename without extension."""

    def __init__(self, path: Path) -> None:
        if not Path(path).exists():
            raise missing_weights(f"GenPromp classifier predictions not found: {path}. Put the official "
                                      f"EfficientNet-B7 predictions JSON there, or set classifier.kind=none "
                                      f"(GT-known only) / timm / zoo")
        self.path = Path(path)
        raw = json.loads(self.path.read_text(encoding="utf-8"))
        self.scores: dict[str, list[float]] = {}
        for k, v in raw.items():
            s = v["pred_scores"] if isinstance(v, dict) else v
            for key in {k, _stem(k), Path(_stem(k)).name}:
                self.scores.setdefault(key, s)

    def __call__(self, images, image_ids: Sequence[str] | None) -> torch.Tensor:
        """The scores of each image, found by its id; a missing id is an error (never a dropped metric)."""
        if image_ids is None:
            raise InputError(f"classifier.kind=json reads {self.path} by image id: pass meta=[ImageMeta(image_id)] "
                             f"to localize (the harness does), or set classifier.kind=none for GT-known maps only")
        rows = []
        for i in image_ids:
            for key in (str(i), _stem(str(i)), Path(_stem(str(i))).name):
                if key in self.scores:
                    rows.append(self.scores[key])
                    break
            else:
                raise InputError(f"{self.path}: no prediction for image {i!r} (keys look like "
                                 f"{next(iter(self.scores), None)!r}); use the predictions JSON of this split")
        return torch.tensor(rows, dtype=torch.float32)


def _stem(name: str) -> str:
    return re.sub(r"\.(jpe?g|png|bmp|JPE?G|PNG)$", "", name)


class ModelClassifier:
    """A timm-style classifier: resize (bilinear, no crop) + normalise -> logits."""

    def __init__(self, model: nn.Module, size: int, mean, std, device: str) -> None:
        self.model = model.eval().to(device)
        self.size, self.mean, self.std, self.device = int(size), tuple(mean), tuple(std), device

    @torch.no_grad()
    def __call__(self, images, image_ids=None) -> torch.Tensor:
        from wsolbench.imaging import to_batch

        x = to_batch(images, self.size, self.mean, self.std).to(self.device)
        return self.model(x).float().cpu()


def build_classifier(cfg: dict, device: str):
    c = cfg["classifier"]
    kind = c["kind"]
    if kind in (None, "none"):
        return None
    if kind == "json":
        return PredictionsClassifier(_resolve_file(c["predictions"]))
    if kind == "zoo":
        from wsolbench import zoo

        model = zoo.load_backbone("classifier", c["zoo_scale"])
    elif kind == "timm":
        import timm

        from wsolbench import weights

        path = _resolve_file(c["checkpoint"]) if c["checkpoint"] else weights.resolve(c["name"])
        if not Path(path).exists():
            raise missing_weights(f"GenPromp classifier checkpoint not found: {path} (timm model {c['name']})")
        model = timm.create_model(c["name"], pretrained=False, num_classes=int(c["num_classes"]))
        model.load_state_dict(weights.load_state_dict(path))
    else:
        raise ValueError(f"classifier.kind must be none, json, timm or zoo, got {kind!r}")
    pc = getattr(model, "pretrained_cfg", None) or {}
    size = c["input_size"] or (pc.get("input_size") or (3, 224, 224))[-1]
    mean = c["mean"] or pc.get("mean") or (0.485, 0.456, 0.406)
    std = c["std"] or pc.get("std") or (0.229, 0.224, 0.225)
    return ModelClassifier(model, size, mean, std, device)


# ------------------------------------------------------------------------------------------ training helpers
def world_size() -> int:
    """Processes of this run (torch.distributed's world size, 1 without it)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def scaled_lr(stage: dict) -> float:
    """A stage's learning rate: with ``scale_lr`` the official (accelerate) total-batch scaling
    lr x batch_size x grad_accum x processes (``processes`` null = this run's world size)."""
    lr = float(stage["lr"])
    if not stage["scale_lr"]:
        return lr
    processes = int(stage["processes"]) if stage["processes"] else world_size()
    return lr * int(stage["batch_size"]) * int(stage["grad_accum"]) * processes


DECAY_SCOPES = ("vocabulary", "concept")


# ------------------------------------------------------------------------------------------ the method
@register_method("genpromp")
class GenPromp(Localizer):
    """GenPromp; see the module docstring. ``components`` (dict vae/unet/text_encoder/tokenizer/scheduler)
    bypasses ``model.source`` (tests, notebooks)."""

    capabilities = frozenset({Capability.SINGLE, Capability.PHRASE})
    needs_training = True
    tiny_zoo = ("diffusion", "classifier")
    pretrained = ("sd-v1-4", "efficientnet-b7")
    single_label_training = True  # one concept token per class, trained on the images of that class

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None, device: str = "cpu",
                 components: dict | None = None, class_synonyms: Sequence[Sequence[str]] | None = None) -> None:
        super().__init__(config, class_names, device)
        cfg = self.config
        self.class_synonyms = _check_synonyms(class_synonyms, self.class_names)
        self._cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        comps = components if components is not None else _build_components(cfg)
        self.tokenizer = comps["tokenizer"]
        self.text_encoder = comps["text_encoder"].eval()
        self.vae = comps["vae"].eval()
        self.unet = comps["unet"].eval()
        self.scheduler = comps["scheduler"]
        # None: each image's VAE sample and noise come from ``inference.noise_seed`` and its content; a
        # function of the call's pixels (B×3×S×S) returning ``LatentDraws``: those draws are used instead
        # (how the parity test feeds the official run's recorded noise)
        self.draws: Callable[[torch.Tensor], LatentDraws] | None = None
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
        self.image_size = int(cfg["model"]["image_size"])
        self.infer_dtype = (_torch_dtype(cfg["model"]["dtype"]) if str(device).startswith("cuda")
                            else torch.float32)
        self.templates = tuple(cfg["prompts"]["templates"])
        self.max_length = int(self.tokenizer.model_max_length)
        self._setup_concepts()
        self.unet_finetuned = False
        if cfg["model"]["token_path"]:
            self.load_official_tokens(_resolve_file(cfg["model"]["token_path"]))
        if cfg["model"]["unet_path"] and cfg["inference"]["finetuned"]:
            self.load_unet(_resolve_file(cfg["model"]["unet_path"]))
        self.text_encoder.to(device)
        _cast(self.vae, device, self.infer_dtype)
        _cast(self.unet, device, self.infer_dtype)
        self.classifier = build_classifier(cfg, device)
        self.cross_layers = unet_attention_layers(self.unet, "cross")
        self.groups = group_layers(self.cross_layers, cfg["inference"]["groups"])
        self._record_layers = sorted({l for g in self.groups for l in g}, key=self.cross_layers.index)

    @classmethod
    def from_config(cls, config: dict, class_names: Sequence[str] | None = None, device: str = "cpu",
                    components: dict | None = None, class_synonyms: Sequence[Sequence[str]] | None = None):
        """``class_synonyms``: all names of each class (the ILSVRC synset mapping's; the harness passes the
        dataset's), read by the meta-token rule; None: the class names."""
        return cls(config=config, class_names=class_names, device=device, components=components,
                   class_synonyms=class_synonyms)

    # ---- concept tokens ----------------------------------------------------------------------------
    def _setup_concepts(self) -> None:
        p = self.config["prompts"]
        n = len(self.class_names)
        self.concept_tokens = [p["concept_token"].format(i) for i in range(n)]
        self.token_offset = len(self.tokenizer)
        if n:
            added = self.tokenizer.add_tokens(self.concept_tokens)
            ids = self.tokenizer.convert_tokens_to_ids(self.concept_tokens)
            if added != n or ids != list(range(self.token_offset, self.token_offset + n)):
                raise ValueError(f"concept tokens {self.concept_tokens[:3]}... did not get consecutive new ids "
                                 f"from {self.token_offset} (the tokenizer already had some of them?)")
        self.meta_tokens = self._meta_tokens()
        emb = self.text_encoder.get_input_embeddings()
        base = emb.base if isinstance(emb, ConceptTokenEmbedding) else emb
        if self.token_offset > base.num_embeddings:
            raise ValueError(f"the tokenizer has {self.token_offset} tokens but the text encoder only "
                             f"{base.num_embeddings} embeddings")
        init = torch.stack([base.weight[self.tokenizer.encode(m, add_special_tokens=False)[0]]
                            for m in self.meta_tokens]) if n else base.weight[:0]
        self.concepts = ConceptTokenEmbedding(base, init, self.token_offset)
        self.text_encoder.set_input_embeddings(self.concepts)

    def _meta_tokens(self) -> list[str]:
        """``prompts.meta_token`` for every class when set (CUB: "bird"), else the official rule on each
        class's full synonym string."""
        fixed = self.config["prompts"]["meta_token"]
        names = [", ".join(s) for s in self.class_synonyms] if self.class_synonyms else self.class_names
        return [fixed if fixed else select_meta_token(n, self.tokenizer) for n in names]

    @property
    def concept_token_ids(self) -> list[int]:
        return list(range(self.token_offset, self.token_offset + len(self.concept_tokens)))

    def save_official_tokens(self, directory: str | Path, classes: Sequence[int] | None = None) -> Path:
        """``tokens/{token_id}.bin`` files, each ``{concept token: tensor[D]}`` (the official layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from wsolbench.io import atomic_path

        for c in range(len(self.concept_tokens)) if classes is None else classes:
            with atomic_path(directory / f"{self.token_offset + c}.bin") as tmp:
                torch.save({self.concept_tokens[c]: self.concepts.rows[c].detach().float().cpu().clone()}, tmp)
        return directory

    def load_official_tokens(self, directory: str | Path, strict: bool = False) -> list[int]:
        """Read ``{token_id}.bin`` files (torch.load with weights_only=True); returns the classes loaded.
        A missing file leaves that class at its meta-token initialisation (a warning, as in the official
        code) unless ``strict``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise missing_weights(f"GenPromp token folder not found: {directory} (expected files "
                                      f"{self.token_offset}.bin ... with {{'<token>': tensor}})")
        loaded, missing = [], []
        for c, token in enumerate(self.concept_tokens):
            f = directory / f"{self.token_offset + c}.bin"
            if not f.exists():
                missing.append(c)
                continue
            obj = torch.load(f, map_location="cpu", weights_only=True)
            if token not in obj:
                raise ValueError(f"{f} holds {list(obj)}, not the concept token {token!r}")
            with torch.no_grad():
                self.concepts.rows[c].copy_(obj[token].to(self.concepts.rows[c]))
            loaded.append(c)
        if missing:
            if strict:
                raise FileNotFoundError(f"{directory}: no token file for classes {missing[:10]}...")
            log.warning("GenPromp: %d concept tokens missing in %s (kept at their meta-token init)",
                        len(missing), directory)
        self._cache.clear()
        return loaded

    def load_unet(self, directory: str | Path) -> None:
        from diffusers import UNet2DConditionModel

        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise missing_weights(f"finetuned U-Net not found: {directory} (a diffusers save_pretrained "
                                      f"folder with config.json and the weights)")
        self.unet = UNet2DConditionModel.from_pretrained(str(directory), **diffusers_load_kwargs()).eval()
        self.unet.requires_grad_(False)
        self.unet_finetuned = True
        if hasattr(self, "cross_layers"):
            _cast(self.unet, self.device, self.infer_dtype)

    # ---- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"concept_embeddings": self.concepts.table().detach().float().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        table = state["concept_embeddings"]
        if table.shape[0] != len(self.concepts.rows):
            raise ValueError(f"checkpoint has {table.shape[0]} concept rows, this method {len(self.concepts.rows)}")
        with torch.no_grad():
            for r, v in zip(self.concepts.rows, table):
                r.copy_(v.to(r))
        self._cache.clear()

    def save(self, path: str | Path) -> Path:
        """config.yaml + model.safetensors (concept rows), plus the official ``tokens/`` and, when the U-Net
        was finetuned, ``unet/``."""
        from wsolbench.checkpoint import save_localizer

        path = Path(path)
        save_localizer(self, path)
        self.save_official_tokens(path / "tokens")
        if self.class_synonyms is not None:
            from wsolbench.io import write_json

            write_json(path / SYNONYMS_FILE, [list(s) for s in self.class_synonyms])
        if self.unet_finetuned:
            self.unet.save_pretrained(str(path / "unet"))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", config: dict | None = None):
        """Rebuild a method saved with ``save``. ``config``: use this resolved config instead of the saved
        one (same classes), e.g. to evaluate one trained checkpoint under the paper's ablation switches."""
        from wsolbench.checkpoint import load_localizer

        path = Path(path)
        method = load_localizer(cls, path, device=device, config=config)
        if (path / SYNONYMS_FILE).exists():  # f_d's meta tokens (the concept rows came with the state)
            method.class_synonyms = _check_synonyms(json.loads((path / SYNONYMS_FILE).read_text(encoding="utf-8")),
                                                    method.class_names)
            method.meta_tokens = method._meta_tokens()
            method._cache.clear()
        if (path / "unet" / "config.json").exists() and method.config["inference"]["finetuned"]:
            method.load_unet(path / "unet")
        return method

    # ---- prompts -----------------------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").input_ids

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """last_hidden_state (N×L×D, float32) of each text."""
        ids = self._tokenize(texts).to(self.device)
        return self.text_encoder(ids)[0].float()

    def template_embedding(self, word: str) -> torch.Tensor:
        """L×D: the mean over the templates of "template.format(word)"."""
        return self.encode_texts([t.format(word) for t in self.templates]).mean(0)

    @torch.no_grad()
    def class_embedding(self, c: int, mode: str | None = None) -> torch.Tensor:
        """The conditioning of class ``c`` (f_c by default; ``mode`` per ``prompts.embedding``)."""
        p = self.config["prompts"]
        mode = mode or p["embedding"]
        key = ("class", int(c), mode)
        if key not in self._cache:
            f_d = self.template_embedding(self.meta_tokens[c]) if mode != "representative" else None
            f_r = self.template_embedding(self.concept_tokens[c]) if mode != "discriminative" else None
            self._put(key, combine_embeddings(f_r, f_d, float(p["combine_ratio"]), mode))
        self._cache.move_to_end(key)
        return self._cache[key]

    @torch.no_grad()
    def phrase_embedding(self, text: str) -> tuple[torch.Tensor, list[int]]:
        key = ("text", text)
        if key not in self._cache:
            self._put(key, self.template_embedding(text))
        prefix = len(self.tokenizer.encode(self.templates[0].format("").strip(), add_special_tokens=False))
        n = max(1, len(self.tokenizer.encode(text, add_special_tokens=False)))
        pos = [i for i in range(1 + prefix, 1 + prefix + n) if i < self.max_length - 1] or [self.max_length - 2]
        return self._cache[key], pos

    def _put(self, key, value) -> None:
        self._cache[key] = value
        while len(self._cache) > int(self.config["inference"]["cache_size"]):
            self._cache.popitem(last=False)

    def _class_positions(self, c: int) -> list[int]:
        idx = self.config["prompts"]["token_index"]
        if idx != "auto":
            return [int(idx)]
        prefix = len(self.tokenizer.encode(self.templates[0].format("").strip(), add_special_tokens=False))
        word = self.meta_tokens[c] if self.config["prompts"]["embedding"] == "discriminative" \
            else self.concept_tokens[c]
        n = len(self.tokenizer.encode(word, add_special_tokens=False))
        return list(range(1 + prefix, 1 + prefix + n))

    # ---- pixels / latents --------------------------------------------------------------------------
    def pixels(self, images: Any) -> torch.Tensor:
        """B×3×S×S in [-1, 1]: ``official_pixels`` of each image (the official test pipeline)."""
        return torch.stack([official_pixels(img, self.image_size, i) for i, img in enumerate(as_image_list(images))])

    def encode_latents(self, pixels: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
        """z_0 = one posterior sample (``inference.latent: sample``) or the mean, x the VAE scaling factor.
        The sample's N(0, 1) draw: ``eps`` (B×C×h×w) when given, else one per image from ``generators`` (its
        draw then does not depend on the batch it came in), else torch's global generator."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
        if self.config["inference"]["latent"] == "mode":
            z = dist.mode()
        else:
            if eps is None:
                eps = (torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
                       if generators is not None else torch.randn(dist.mean.shape))
            if tuple(eps.shape) != tuple(dist.mean.shape):
                raise InputError(f"VAE sample draw has shape {tuple(eps.shape)}, the posterior {tuple(dist.mean.shape)}")
            z = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)
        return z * float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_0, noise) of each image of ``pixels``: the method's own per-image draws, or ``self.draws``'."""
        bs = int(self.config["inference"]["batch_size"])
        given = self.draws(pixels) if self.draws is not None else None
        gens = self._image_generators(pixels) if given is None else None
        if given is not None and given.z0 is not None:
            z0 = given.z0.to(self.device, next(self.vae.parameters()).dtype)
        else:
            eps = given.vae_eps if given is not None else None
            z0 = torch.cat([self.encode_latents(pixels[s:s + bs], None if gens is None else gens[s:s + bs],
                                                None if eps is None else eps[s:s + bs])
                            for s in range(0, len(pixels), bs)])
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]) if given is None else given.noise
        if tuple(noise.shape) != tuple(z0.shape):
            raise InputError(f"diffusion noise has shape {tuple(noise.shape)}, the latents {tuple(z0.shape)}")
        return z0, noise.to(z0)

    def _image_generators(self, pixels: torch.Tensor) -> list[torch.Generator]:
        """One generator per image, seeded by ``noise_seed`` and the image's content: the same image gets
        the same VAE sample and noise in any batch, order or run (the official code draws once per batch)."""
        import hashlib

        seed = int(self.config["inference"]["noise_seed"])
        q = ((pixels.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        return [torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(im.tobytes(), digest_size=8, key=str(seed).encode()).digest(), "little")
            % (2**63)) for im in q]

    # ---- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def attention_cams(self, pixels: torch.Tensor, query_image: Sequence[int], cond: torch.Tensor,
                       token_weights: torch.Tensor) -> torch.Tensor:
        """Maps (Q×S×S, max-normalised) for Q queries: query q reads image ``query_image[q]`` of
        ``pixels`` (B×3×H×W in [-1, 1]), is conditioned on ``cond[q]`` (L×D) and records the attention
        mixture ``token_weights[q]`` (L)."""
        z0, noise = self.latents(pixels)
        return aggregate_maps(self.layer_attention(z0, noise, query_image, cond, token_weights), self.groups,
                              int(self.config["inference"]["map_size"]))

    @torch.no_grad()
    def layer_attention(self, z0: torch.Tensor, noise: torch.Tensor, query_image: Sequence[int], cond: torch.Tensor,
                        token_weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer name: Q×T×h×w}: the cross-attention probability of each recorded layer at each timestep,
        averaged over heads, for Q queries (query q: latents ``z0``/``noise`` of image ``query_image[q]``,
        conditioning ``cond[q]``, token mixture ``token_weights[q]``)."""
        inf = self.config["inference"]
        ts = [int(t) for t in inf["timesteps"]]
        if not ts or min(ts) < 0 or max(ts) >= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"inference.timesteps must be 0-based scheduler indices in "
                             f"[0, {self.scheduler.config.num_train_timesteps - 1}], got {ts}")
        q_img = torch.as_tensor(list(query_image), dtype=torch.long, device=z0.device)
        n_q, n_t = len(q_img), len(ts)
        # item i = (query i // T, timestep i % T)
        item_q = torch.arange(n_q, device=z0.device).repeat_interleave(n_t)
        item_t = torch.tensor(ts, device=z0.device).repeat(n_q)
        cond = cond.to(self.device, self.infer_dtype)
        token_weights = token_weights.to(self.device, torch.float32)
        collected: dict[str, list[torch.Tensor]] = {l.name: [] for l in self._record_layers}
        softmax = {"model": None, "float32": torch.float32}.get(inf["softmax_dtype"], "bad")
        if softmax == "bad":
            raise ValueError(f"inference.softmax_dtype must be 'model' or 'float32', got {inf['softmax_dtype']!r}")
        rec = AttentionRecorder(self.unet, self._record_layers, stop_after_last=bool(inf["early_exit"]),
                                softmax_dtype=softmax)
        with rec:
            for chunk in torch.arange(n_q * n_t, device=z0.device).split(int(inf["unet_batch"])):
                q, t = item_q[chunk], item_t[chunk]
                zt = self.scheduler.add_noise(z0[q_img[q]], noise[q_img[q]], t).to(self.infer_dtype)
                rec.set_token_weights(token_weights[q][:, None, :])
                rec.reset()
                rec.run(zt, t, encoder_hidden_states=cond[q])
                for name, m in rec.maps().items():
                    collected[name].append(m[:, 0])
        return {name: torch.cat(v).view(n_q, n_t, *v[0].shape[-2:]) for name, v in collected.items()}

    def predict_logits(self, images: Any, image_ids: Sequence[str] | None = None) -> torch.Tensor | None:
        if self.classifier is None:
            return None
        return self.classifier(images, image_ids)

    def localize(self, images: Any, classes: Sequence[Any] | None = None, texts: Sequence[Any] | None = None,
                 meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        imgs = as_image_list(images)
        b = len(imgs)
        checked = self.image_meta(meta, b)
        image_ids = [m.image_id for m in checked] if checked else None
        if texts is not None:
            self.require(Capability.PHRASE)
            queries = self.text_queries(texts, b)
            embs, weights, q_img = [], [], []
            for i, qs in enumerate(queries):
                for text in qs:
                    e, pos = self.phrase_embedding(text)
                    embs.append(e)
                    weights.append(self._weights(pos))
                    q_img.append(i)
            cams = self.attention_cams(self.pixels(imgs), q_img, torch.stack(embs), torch.stack(weights))
            return LocalizerOutput(maps=cams.view(b, -1, *cams.shape[-2:]).float().cpu())
        logits = self.predict_logits(imgs, image_ids)
        if classes is None:  # the method's own prediction: the classifier's top-1 class
            if logits is None:
                raise InputError("GenPromp needs classes=[...] (GT-known) or a classifier (classifier.kind, and "
                                 "image_ids for a predictions JSON) to localize its own prediction")
            per_image = [[int(c)] for c in logits.argmax(dim=1).tolist()]
        else:
            per_image = self.class_queries(classes, b)
        bad = [c for qs in per_image for c in qs if not 0 <= c < len(self.class_names)]
        if bad:
            raise InputError(f"class index {bad[0]} out of range for {len(self.class_names)} classes")
        maps = self._class_maps(imgs, per_image)
        return LocalizerOutput(maps=maps, logits=logits, classes=per_image)

    def inference_modules(self) -> list[nn.Module]:
        """What runs at test time (for parameter counts): text encoder, VAE, U-Net, classifier."""
        mods = [self.text_encoder, self.vae, self.unet]
        if isinstance(self.classifier, ModelClassifier):
            mods.append(self.classifier.model)
        return mods

    def localize_predicted(self, images: Any, k: int = 1, image_ids: Sequence[str] | None = None
                           ) -> LocalizerOutput:
        """Maps for the classifier's top-k classes (the official top1/top5 evaluation modes)."""
        imgs = as_image_list(images)
        logits = self.predict_logits(imgs, image_ids)
        if logits is None:
            raise InputError("localize_predicted needs a classifier (classifier.kind) and, for a predictions "
                             "JSON, image_ids")
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices.tolist()
        return LocalizerOutput(maps=self._class_maps(imgs, top), logits=logits, classes=top)

    def _weights(self, positions: Sequence[int]) -> torch.Tensor:
        w = torch.zeros(self.max_length)
        w[list(positions)] = 1.0 / len(positions)
        return w

    def class_conditioning(self, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Q×L×D U-Net conditioning (``prompts.embedding``: f_c by default) and Q×L token weights (where the
        attention is read, ``prompts.token_index``) of each class."""
        return (torch.stack([self.class_embedding(c) for c in classes]),
                torch.stack([self._weights(self._class_positions(c)) for c in classes]))

    def _class_maps(self, imgs: list, per_image: list[list[int]]) -> torch.Tensor:
        q_img = [i for i, qs in enumerate(per_image) for _ in qs]
        flat = [c for qs in per_image for c in qs]
        z0, noise = self.latents(self.pixels(imgs))
        step = max(1, int(self.config["inference"]["query_chunk"]))
        size = int(self.config["inference"]["map_size"])
        cams = [aggregate_maps(self.layer_attention(z0, noise, q_img[s:s + step], *self.class_conditioning(flat[s:s + step])),
                               self.groups, size) for s in range(0, len(flat), step)]
        cams = torch.cat(cams)
        return cams.view(len(imgs), len(per_image[0]), *cams.shape[-2:]).float().cpu()

    # ---- training ----------------------------------------------------------------------------------
    def _train_transform(self):
        """PIL image -> 3×S×S in [-1, 1], the official train pipeline: Resize (torchvision's default, bilinear
        on the PIL image), RandomCrop, RandomHorizontalFlip, ColorJitter, then ``official_pixels``."""
        from torchvision.transforms import v2

        aug = self.config["train"]["augment"]
        ops = [v2.Resize((aug["resize"], aug["resize"]), interpolation=v2.InterpolationMode.BILINEAR),
               v2.RandomCrop(aug["crop"])]
        if aug["hflip"]:
            ops.append(v2.RandomHorizontalFlip())
        if aug["color_jitter"]:
            ops.append(v2.ColorJitter(*aug["color_jitter"]))
        augment = v2.Compose(ops)
        return lambda img: official_pixels(augment(img.convert("RGB")), self.image_size)

    def _load_batch(self, dataset, indices: Sequence[int], transform) -> torch.Tensor:
        return torch.stack([transform(dataset[i].load_image()) for i in indices])

    def _noisy(self, pixels: torch.Tensor):
        with torch.no_grad():
            z0 = self.encode_latents(pixels.to(self.device))
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        return self.scheduler.add_noise(z0, noise, t), noise, t

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        """Stage 1 (concept rows) then stage 2 (U-Net finetuning); each skipped when its official
        checkpoint is configured (model.token_path / model.unet_path) or disabled."""
        from wsolbench.training import seed_everything

        tr = self.config["train"]
        out_dir = Path(out_dir) if out_dir is not None else None
        seed_everything(int(tr["seed"]))
        _cast(self.vae, self.device, torch.float32)
        _cast(self.unet, self.device, torch.float32)
        self.infer_dtype_saved, self.infer_dtype = self.infer_dtype, torch.float32
        report: dict[str, Any] = {}
        try:
            if self.config["model"]["token_path"]:
                report["stage1"] = "skipped (model.token_path given)"
            else:
                report["stage1"] = self._fit_stage1(train_data, out_dir, resume, progress)
            s2 = tr["stage2"]
            if not self.config["inference"]["finetuned"] or not s2["enabled"]:
                report["stage2"] = "skipped (disabled)"
            elif self.config["model"]["unet_path"]:
                report["stage2"] = "skipped (model.unet_path given)"
            else:
                report["stage2"] = self._fit_stage2(train_data, out_dir, resume, progress)
        finally:
            self.infer_dtype = self.infer_dtype_saved
            _cast(self.vae, self.device, self.infer_dtype).eval()
            _cast(self.unet, self.device, self.infer_dtype).eval().requires_grad_(False)
            self.text_encoder.eval()
            self._cache.clear()
        return report

    def _stage1_plan(self, c: int, indices: list[int], cfg: dict) -> list[tuple[list[int], bool]]:
        """Micro-batches of class ``c`` over all epochs, each flagged when an optimizer step follows it
        (every ``grad_accum`` micro-batches and at each epoch end, as accelerate does)."""
        plan = []
        bs, acc = int(cfg["batch_size"]), int(cfg["grad_accum"])
        for e in range(int(cfg["epochs"])):
            rng = np.random.default_rng([int(self.config["train"]["seed"]), c, e])
            order = [indices[i] for i in rng.permutation(len(indices))]
            micro = [order[s:s + bs] for s in range(0, len(order), bs)]
            for j, mb in enumerate(micro):
                plan.append((mb, (j + 1) % acc == 0 or j == len(micro) - 1))
        return plan

    def _fit_stage1(self, train_data, out_dir: Path | None, resume: bool, progress: bool) -> dict:
        cfg = self.config["train"]["stage1"]
        n_cls = len(self.class_names)
        by_class: list[list[int]] = [[] for _ in range(n_cls)]
        for i, s in enumerate(train_data):
            by_class[s.label].append(i)
        classes = [c for c in range(n_cls) if by_class[c]]
        if cfg["max_classes"]:
            classes = classes[: int(cfg["max_classes"])]
        tok_dir = out_dir / "tokens" if out_dir is not None else None
        done = []
        if resume and tok_dir is not None and tok_dir.is_dir():
            have = {int(p.stem) - self.token_offset for p in tok_dir.glob("*.bin") if p.stem.isdigit()}
            done = [c for c in classes if c in have]
            if done:
                self.load_official_tokens(tok_dir)
        todo = [c for c in classes if c not in done]
        lr = scaled_lr(cfg)
        if cfg["weight_decay_scope"] not in DECAY_SCOPES:
            raise ValueError(f"train.stage1.weight_decay_scope must be one of {DECAY_SCOPES}, got "
                             f"{cfg['weight_decay_scope']!r}")
        # official: one AdamW over the whole token-embedding matrix per class, classes in turn on one text
        # encoder, so every row not trained shrinks by (1 - lr*wd) per optimizer step of every class before
        steps_before, n = {}, 0
        for c in classes:
            steps_before[c] = n
            n += sum(flag for _, flag in self._stage1_plan(c, by_class[c], cfg))
        transform = self._train_transform()
        group_size = max(1, int(cfg["parallel_classes"]))
        t0, losses = time.time(), []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="genpromp stage 1 (classes)", leave=False, dynamic_ncols=True)
        for g in range(0, len(todo), group_size):
            group = todo[g:g + group_size]
            losses.append(self._stage1_group(train_data, group, by_class, cfg, lr, transform, steps_before))
            if tok_dir is not None:
                self.save_official_tokens(tok_dir, group)
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        return {"classes_trained": len(todo), "classes_resumed": len(done), "lr": lr,
                "weight_decay_scope": cfg["weight_decay_scope"],
                "mean_loss": float(np.mean(losses)) if losses else None, "time_s": round(time.time() - t0, 2)}

    def _stage1_group(self, train_data, group: list[int], by_class, cfg: dict, lr: float, transform,
                      steps_before: dict[int, int]) -> float:
        torch.manual_seed(int(self.config["train"]["seed"]) * 7919 + group[0])
        plans = {c: self._stage1_plan(c, by_class[c], cfg) for c in group}
        wd = float(cfg["weight_decay"])
        keep = 1.0 - lr * wd  # what AdamW's decay leaves of an untrained row per step
        vocabulary = cfg["weight_decay_scope"] == "vocabulary"
        done = {c: steps_before[c] if vocabulary else 0 for c in group}  # decay steps each class's table has seen
        opts = {}
        for c in group:
            row = self.concepts.rows[c]
            with torch.no_grad():
                row.mul_(keep ** done[c])  # decayed with the table while the classes before trained
            row.requires_grad_(True)
            opts[c] = torch.optim.AdamW([row], lr=lr, betas=tuple(cfg["betas"]), weight_decay=wd, eps=float(cfg["eps"]))
        acc = int(cfg["grad_accum"])
        total, count = 0.0, 0
        try:
            for m in range(max(len(p) for p in plans.values())):
                active = [c for c in group if m < len(plans[c])]
                idx = [i for c in active for i in plans[c][m][0]]
                owner = torch.tensor([c for c in active for _ in plans[c][m][0]], device=self.device)
                zt, noise, t = self._noisy(self._load_batch(train_data, idx, transform))
                choice = torch.randint(len(self.templates), (len(idx),)).tolist()
                ids = self._tokenize([self.templates[k].format(self.concept_tokens[int(c)])
                                      for k, c in zip(choice, owner.tolist())]).to(self.device)
                if vocabulary:
                    self.concepts.base_scale = torch.tensor([keep ** done[int(c)] for c in owner.tolist()])
                pred = self.unet(zt, t, encoder_hidden_states=self.text_encoder(ids)[0]).sample
                per = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                class_losses = [per[owner == c].mean() for c in active]
                (torch.stack(class_losses).sum() / acc).backward()
                total += float(sum(l.item() for l in class_losses))
                count += len(active)
                for c in active:
                    if plans[c][m][1]:
                        opts[c].step()
                        opts[c].zero_grad(set_to_none=True)
                        done[c] += vocabulary
        finally:
            self.concepts.base_scale = None
            for c in group:
                self.concepts.rows[c].requires_grad_(False)
                self.concepts.rows[c].grad = None
        return total / max(count, 1)

    def _fit_stage2(self, train_data, out_dir: Path | None, resume: bool, progress: bool) -> dict:
        from wsolbench.training import get_rng_state, set_rng_state

        cfg = self.config["train"]["stage2"]
        bs, acc = int(cfg["batch_size"]), int(cfg["grad_accum"])
        steps = int(cfg["checkpoint_step"] or cfg["steps"])  # the official run trains on but never saves past it
        if not 0 < steps <= int(cfg["steps"]):
            raise ValueError(f"train.stage2.checkpoint_step must be in [1, steps={cfg['steps']}], got {steps}")
        lr = scaled_lr(cfg)
        self.unet.train().requires_grad_(True)
        opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, betas=tuple(cfg["betas"]),
                                weight_decay=float(cfg["weight_decay"]), eps=float(cfg["eps"]))
        state_path = out_dir / STAGE2_STATE if out_dir is not None else None
        step = 0
        if resume and state_path is not None and state_path.exists():
            from diffusers import UNet2DConditionModel

            st = torch.load(state_path, map_location="cpu", weights_only=True)
            fresh = UNet2DConditionModel.from_pretrained(str(out_dir / "unet"), **diffusers_load_kwargs())
            self.unet.load_state_dict(fresh.state_dict())
            if st.get("optimizer") is not None:
                opt.load_state_dict(st["optimizer"])
            set_rng_state(st["rng"])
            step = int(st["step"])
        n = len(train_data)
        transform = self._train_transform()
        ratio = float(cfg["representative_ratio"])
        seed = int(self.config["train"]["seed"])
        t0, losses = time.time(), []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=step, desc="genpromp stage 2 (U-Net)", leave=False, dynamic_ncols=True)
        while step < steps:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for a in range(acc):
                micro = step * acc + a  # a global micro-batch index: the data order needs no state
                epoch, pos = divmod(micro * bs, n)
                order = np.random.default_rng([seed, 2, epoch]).permutation(n)
                idx = [int(order[(pos + j) % n]) for j in range(min(bs, n))]
                zt, noise, t = self._noisy(self._load_batch(train_data, idx, transform))
                labels = [train_data[i].label for i in idx]
                choice = torch.randint(len(self.templates), (len(idx),)).tolist()
                with torch.no_grad():
                    f_r = self.encode_texts([self.templates[k].format(self.concept_tokens[c])
                                             for k, c in zip(choice, labels)])
                    f_d = self.encode_texts([self.templates[k].format(self.meta_tokens[c])
                                             for k, c in zip(choice, labels)])
                cond = ratio * f_r + (1 - ratio) * f_d
                pred = self.unet(zt, t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
                (loss / acc).backward()
                step_loss += loss.item() / acc
            opt.step()
            step += 1
            losses.append(step_loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if out_dir is not None and (step % int(cfg["save_steps"]) == 0 or step == steps):
                # the final state drops the optimizer (2x the U-Net): nothing is left to resume
                self._save_stage2(out_dir, opt if step < steps else None, step, get_rng_state())
        if bar is not None:
            bar.close()
        self.unet.eval().requires_grad_(False)
        self.unet_finetuned = True
        return {"steps": steps, "max_steps": int(cfg["steps"]), "lr": lr,
                "mean_loss": float(np.mean(losses)) if losses else None,
                "time_s": round(time.time() - t0, 2)}

    def _save_stage2(self, out_dir: Path, opt, step: int, rng: dict) -> None:
        import shutil

        from wsolbench.io import atomic_path

        tmp = out_dir / "unet.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.unet.save_pretrained(str(tmp))
        final = out_dir / "unet"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        with atomic_path(out_dir / STAGE2_STATE) as p:
            torch.save({"step": step, "optimizer": None if opt is None else opt.state_dict(), "rng": rng}, p)
