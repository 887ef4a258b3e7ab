"""Reference localizers that need no training: a centred Gaussian prior and uniform noise.

``center`` is the centre-prior baseline of Choe et al. (CVPR 2020) and TorchRay's pointing game: it knows
nothing about the image, so any method worth reporting must beat it. ``random`` is the floor.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from wsolbench.imaging import as_image_list, to_float_chw
from wsolbench.localizer import Capability, ImageMeta, Localizer, LocalizerOutput
from wsolbench.registry import register_method


def _num_queries(method: Localizer, classes, texts, batch: int) -> int:
    """K for a batch: the query count, or every class when none is given (``multi``)."""
    if texts is not None:
        return len(method.text_queries(texts, batch)[0])
    if classes is not None:
        return len(method.class_queries(classes, batch)[0])
    return max(1, len(method.class_names))


def _query_classes(method: Localizer, classes, batch: int, k: int) -> list[list[int]] | None:
    """The class of each map: the queried ones, every class when none is given, None without class names."""
    if classes is not None:
        return method.class_queries(classes, batch)
    return [list(range(k))] * batch if method.class_names else None


@register_method("center", aliases=("center-gaussian",))
class CenterPrior(Localizer):
    """An isotropic Gaussian centred in the image, sigma = ``sigma`` × side (same map for every query)."""

    capabilities = frozenset({Capability.SINGLE, Capability.MULTI, Capability.PHRASE})
    pretrained = ()  # no pretrained model

    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        batch = len(as_image_list(images))
        k = _num_queries(self, classes, texts, batch)
        res = int(self.config["resolution"])
        sigma = float(self.config["sigma"]) * res
        axis = torch.arange(res, dtype=torch.float32) - (res - 1) / 2
        g = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma**2))
        maps = g.expand(batch, k, res, res).clone()
        return LocalizerOutput(maps=maps, classes=_query_classes(self, classes, batch, k))


@register_method("random")
class RandomMap(Localizer):
    """Uniform noise at ``resolution``², seeded by the image content so a re-run gives the same maps."""

    capabilities = frozenset({Capability.SINGLE, Capability.MULTI, Capability.PHRASE})
    pretrained = ()  # no pretrained model

    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        imgs = as_image_list(images)
        k = _num_queries(self, classes, texts, len(imgs))
        res = int(self.config["resolution"])
        seed = int(self.config["seed"])
        maps = []
        for i, img in enumerate(imgs):
            pixels = (to_float_chw(img, i) * 255).to(torch.uint8).numpy().tobytes()
            digest = hashlib.sha256(pixels + seed.to_bytes(8, "little")).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            maps.append(torch.from_numpy(rng.random((k, res, res), dtype=np.float32)))
        return LocalizerOutput(maps=torch.stack(maps), classes=_query_classes(self, classes, len(imgs), k))
