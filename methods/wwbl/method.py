"""The registered WWbL method: its config (the YAML completed, then the named training ``recipe``), inference
for the three capabilities and persistence. The paper facts and the official code's differences are in the
package docstring (``wsolbench.methods.wwbl``); g in ``model``, CLIP in ``clip_teacher``, training in
``training``, the no-text pipeline in ``open_world``.

Capabilities: ``single`` (CUB-style GT-known maps; in grounding mode the class text is fed to g), ``phrase``
(Flickr30k phrases; named extras ``open`` = the open-world map matched to the phrase in CLIP space, and
``clip`` = the CLIP relevancy teacher) and ``open`` (no text: one map, box and caption per caption cluster).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from wsolbench.classnames import class_text
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method

from .clip_teacher import ClipTeacher, build_clip
from .losses import LOSS_VARIANTS
from .model import build_g, load_official_into
from .open_world import OpenWorldMixin
from .train import TrainingMixin

MODES = ("grounding", "wsol")


def apply_recipe(cfg: dict) -> dict:
    """``cfg`` with the null keys that ``recipes[recipe]`` names (dotted, e.g. ``train.lr``) set to the recipe's
    values; keys set in a config file or with --set keep their value."""
    name, recipes = cfg["recipe"], cfg["recipes"]
    if name not in recipes:
        raise ValueError(f"recipe {name!r} is not one of {sorted(recipes)} (config key recipe)")
    out = copy.deepcopy(cfg)
    for dotted, value in recipes[name].items():
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = node[part]
        if node[leaf] is None:
            node[leaf] = copy.deepcopy(value)
    return out


@register_method("wwbl")
class WWbL(OpenWorldMixin, TrainingMixin, Localizer):
    """WWbL (see the package docstring). ``mode`` grounding: single/phrase/open; mode wsol: single."""

    capabilities = frozenset({Capability.SINGLE, Capability.PHRASE, Capability.OPEN})
    needs_training = True
    data_parallel_fit = True  # fit goes through wsolbench.training.TrainLoop + make_loader
    tiny_zoo = ("vgg", "clip", "captioner")
    pretrained = ("vgg16", "resnet50", "inception-v3", "clip-vit-b32-openai", "blip-caption-base")

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu", *, components: dict | None = None) -> None:
        super().__init__(config, class_names, device)
        cfg = self.config
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
        self._init_open_world(components.get("captioner"))
        if cfg["official_checkpoint"]:
            self.load_official_checkpoint(cfg["official_checkpoint"])

    @classmethod
    def complete_config(cls, config: dict | None) -> dict:
        """The YAML-completed config (``Localizer.complete_config``) with the ``recipe``'s values in its null keys."""
        return apply_recipe(super().complete_config(config))

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
        extras_wanted = set(self.config["eval"]["extras"] or ())  # null: none
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
        return cls({**config, "official_checkpoint": str(path)}, class_names, device)
