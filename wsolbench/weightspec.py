"""``WeightSpec``: one pretrained model of the catalogue (no imports beyond the standard library).

The catalogue (``wsolbench.weights.CATALOGUE``) holds the models more than one method uses; a method's own
models are declared in its package (``wsolbench/methods/<name>/weights.py``, ``SPECS``), and a method class
names the models its paper profile loads in ``Localizer.pretrained``. This module is separate so that those
package files can import it without importing the loaders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class WeightSpec:
    """One pretrained model.

    kind: ``diffusers`` | ``transformers`` (HF repo folders), ``open_clip`` (model + pretrained tag),
    ``timm`` (model name with tag), ``torchvision`` (a torch hub checkpoint file).
    source: the id the library knows it by (HF repo id, open_clip ``"ViT-B-16/openai"``, timm name,
    torchvision ``"vgg16/IMAGENET1K_V1"``).
    files: relative paths that must exist (folders) or acceptable file names (single-file kinds).
    """

    name: str
    kind: str
    source: str
    files: tuple[str, ...]
    licence: str
    description: str
    hf_repo: str | None = None          # where the files live on the Hugging Face hub
    url: str | None = None              # direct URL (torch hub / open_clip URL cache)
    size_gb: float | None = None
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return self.kind in ("diffusers", "transformers")
