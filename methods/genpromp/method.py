"""The registered GenPromp localizer: builds its parts, saves/loads them, and answers ``localize``.

The paper facts and where the official code differs: the package docstring (``wsolbench.methods.genpromp``).
Its concerns live beside this module: ``components`` (diffusers parts, concept-token embedding, official
checkpoint layout), ``prompts`` (f_d / f_r / f_c), ``classifier`` (test-time classifier), ``inference``
(latents, attention maps), ``train`` (the two stages).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from wsolbench.imaging import as_image_list
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.maps.cross_attention import unet_attention_layers
from wsolbench.registry import register_method
from wsolbench.weights import local_path

from . import components as parts
from .classifier import ModelClassifier, build_classifier
from .components import build_components, cast, torch_dtype
from .inference import InferenceMixin, LatentDraws, group_layers
from .prompts import PromptsMixin, check_synonyms
from .train import TrainingMixin

SYNONYMS_FILE = "class_synonyms.json"


@register_method("genpromp")
class GenPromp(TrainingMixin, InferenceMixin, PromptsMixin, Localizer):
    """GenPromp; see the package docstring. ``components`` (dict vae/unet/text_encoder/tokenizer/scheduler)
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
        self.class_synonyms = check_synonyms(class_synonyms, self.class_names)
        self._cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        comps = components if components is not None else build_components(cfg)
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
        self.infer_dtype = (torch_dtype(cfg["model"]["dtype"]) if str(device).startswith("cuda")
                            else torch.float32)
        self.templates = tuple(cfg["prompts"]["templates"])
        self.max_length = int(self.tokenizer.model_max_length)
        self._setup_concepts()
        self.unet_finetuned = False
        if cfg["model"]["token_path"]:
            self.load_official_tokens(local_path(cfg["model"]["token_path"]))
        if cfg["model"]["unet_path"] and cfg["inference"]["finetuned"]:
            self.load_unet(local_path(cfg["model"]["unet_path"]))
        self.text_encoder.to(device)
        cast(self.vae, device, self.infer_dtype)
        cast(self.unet, device, self.infer_dtype)
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
        n = len(self.class_names)
        self.concept_tokens = [self.config["prompts"]["concept_token"].format(i) for i in range(n)]
        self.token_offset = parts.add_concept_tokens(self.tokenizer, self.concept_tokens)
        self.meta_tokens = self._meta_tokens()
        self.concepts = parts.install_concept_embedding(self.tokenizer, self.text_encoder, self.token_offset,
                                                      self.meta_tokens)

    @property
    def concept_token_ids(self) -> list[int]:
        return list(range(self.token_offset, self.token_offset + len(self.concept_tokens)))

    def save_official_tokens(self, directory: str | Path, classes: Sequence[int] | None = None) -> Path:
        """``tokens/{token_id}.bin`` files, each ``{concept token: tensor[D]}`` (the official layout)."""
        return parts.save_official_tokens(self.concepts, self.concept_tokens, directory, classes)

    def load_official_tokens(self, directory: str | Path, strict: bool = False) -> list[int]:
        """Read ``{token_id}.bin`` files into the concept rows (see ``components.load_official_tokens``)."""
        loaded = parts.load_official_tokens(self.concepts, self.concept_tokens, directory, strict)
        self._cache.clear()
        return loaded

    def load_unet(self, directory: str | Path) -> None:
        """Use the finetuned U-Net of ``directory`` (diffusers ``save_pretrained``; the official ``unet/``)."""
        self.unet = parts.load_unet(directory)
        self.unet_finetuned = True
        if hasattr(self, "cross_layers"):
            cast(self.unet, self.device, self.infer_dtype)

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
            method.class_synonyms = check_synonyms(json.loads((path / SYNONYMS_FILE).read_text(encoding="utf-8")),
                                                   method.class_names)
            method.meta_tokens = method._meta_tokens()
            method._cache.clear()
        if (path / "unet" / "config.json").exists() and method.config["inference"]["finetuned"]:
            method.load_unet(path / "unet")
        return method

    # ---- localization ------------------------------------------------------------------------------
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
