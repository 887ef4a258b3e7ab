"""GenPromp's test-time classifier (``classifier.*``): the official predictions JSON, a timm model (the paper's
EfficientNet-B7, found offline by ``wsolbench.weights``) or the zoo classifier."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from wsolbench import weights
from wsolbench.localizer import InputError
from wsolbench.weights import MissingWeightsError, local_path


def _stem(name: str) -> str:
    return re.sub(r"\.(jpe?g|png|bmp|JPE?G|PNG)$", "", name)


class PredictionsClassifier:
    """Class scores from an official-format JSON ``{image name: {"pred_scores": [C floats]}}``.

    Keys are matched to ``image_ids`` exactly, then without extension, then by basename without extension."""

    def __init__(self, path: Path) -> None:
        if not Path(path).exists():
            raise MissingWeightsError(f"GenPromp classifier predictions not found: {path}. Put the official "
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


def preprocessing(c: dict, model: nn.Module) -> tuple[int, tuple, tuple]:
    """(input side, mean, std): ``classifier.input_size/mean/std``, each null one from the model's timm
    ``pretrained_cfg`` (the only other source; a model without one needs them set)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    out = []
    for key in ("input_size", "mean", "std"):
        if c[key] is not None:
            out.append(c[key])
        elif cfg.get(key) is not None:
            out.append(cfg[key][-1] if key == "input_size" else cfg[key])
        else:
            raise ValueError(f"classifier.{key} is null and the {type(model).__name__} classifier has no "
                             f"pretrained_cfg[{key!r}]: set classifier.{key} in the GenPromp config")
    return out[0], tuple(out[1]), tuple(out[2])


def build_classifier(cfg: dict, device: str):
    """The classifier ``classifier.kind`` names, or None (``none``: GT-known maps only)."""
    c = cfg["classifier"]
    kind = c["kind"]
    if kind in (None, "none"):
        return None
    if kind == "json":
        if not c["predictions"]:
            raise ValueError("classifier.kind=json needs classifier.predictions (the official predictions JSON)")
        return PredictionsClassifier(local_path(c["predictions"]))
    if kind == "zoo":
        from wsolbench import zoo

        model = zoo.load_backbone("classifier", c["zoo_scale"])
    elif kind == "timm":
        import timm

        path = local_path(c["checkpoint"]) if c["checkpoint"] else weights.resolve(c["name"])
        if not Path(path).exists():
            raise MissingWeightsError(f"GenPromp classifier checkpoint not found: {path} (timm model {c['name']})")
        model = timm.create_model(c["name"], pretrained=False, num_classes=int(c["num_classes"]))
        model.load_state_dict(weights.load_state_dict(path))
    else:
        raise ValueError(f"classifier.kind must be none, json, timm or zoo, got {kind!r}")
    return ModelClassifier(model, *preprocessing(c, model), device)
