"""GenPromp's model parts: the diffusers components (built from ``model.*``), the concept-token embedding,
the official checkpoint layout (``tokens/{token_id}.bin``, ``unet/``) and the config paths of its artefacts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from wsolbench import weights
from wsolbench.weights import MissingWeightsError, diffusers_load_kwargs, load_diffusers_folder

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype`` as a torch dtype (a clear error for an unknown name)."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cast(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move to device; change dtype only when it differs (diffusers warns on every dtype cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def build_components(cfg: dict) -> dict:
    """vae, unet, text_encoder, tokenizer, scheduler per ``model.source``: the zoo's (``model.zoo_scale``) or a
    diffusers folder found offline by ``wsolbench.weights`` (``model.pretrained``: a folder or the catalogue's
    ``sd-v1-4`` / its hub id)."""
    m = cfg["model"]
    if m["source"] == "zoo":
        from wsolbench import zoo

        if m["zoo_scale"] == "micro":
            return zoo.create_diffusion_components("micro")
        return load_diffusers_folder(zoo.diffusion_dir(m["zoo_scale"]))
    if m["source"] == "pretrained":
        return load_diffusers_folder(weights.resolve_diffusers(m["pretrained"]))
    raise ValueError(f"model.source must be 'pretrained' or 'zoo', got {m['source']!r}")


def load_unet(directory: str | Path) -> nn.Module:
    """A finetuned U-Net saved with diffusers ``save_pretrained`` (the official ``unet/``), eval and frozen."""
    from diffusers import UNet2DConditionModel

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise MissingWeightsError(f"finetuned U-Net not found: {directory} (a diffusers save_pretrained "
                                  f"folder with config.json and the weights)")
    unet = UNet2DConditionModel.from_pretrained(str(directory), **diffusers_load_kwargs()).eval()
    return unet.requires_grad_(False)


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


def add_concept_tokens(tokenizer, concept_tokens: Sequence[str]) -> int:
    """Add the concept tokens to the tokenizer; returns their first id (they get consecutive new ids from the
    tokenizer's size: 49408 + c for SD)."""
    n, offset = len(concept_tokens), len(tokenizer)
    if n:
        added = tokenizer.add_tokens(list(concept_tokens))
        ids = tokenizer.convert_tokens_to_ids(list(concept_tokens))
        if added != n or ids != list(range(offset, offset + n)):
            raise ValueError(f"concept tokens {list(concept_tokens[:3])}... did not get consecutive new ids "
                             f"from {offset} (the tokenizer already had some of them?)")
    return offset


def install_concept_embedding(tokenizer, text_encoder, offset: int, meta_tokens: Sequence[str]
                              ) -> ConceptTokenEmbedding:
    """Give the text encoder a ``ConceptTokenEmbedding`` whose rows (one per class) start as their meta
    tokens' embeddings."""
    emb = text_encoder.get_input_embeddings()
    base = emb.base if isinstance(emb, ConceptTokenEmbedding) else emb
    if offset > base.num_embeddings:
        raise ValueError(f"the tokenizer has {offset} tokens but the text encoder only "
                         f"{base.num_embeddings} embeddings")
    init = torch.stack([base.weight[tokenizer.encode(m, add_special_tokens=False)[0]]
                        for m in meta_tokens]) if meta_tokens else base.weight[:0]
    concepts = ConceptTokenEmbedding(base, init, offset)
    text_encoder.set_input_embeddings(concepts)
    return concepts


def save_official_tokens(concepts: ConceptTokenEmbedding, concept_tokens: Sequence[str], directory: str | Path,
                         classes: Sequence[int] | None = None) -> Path:
    """``tokens/{token_id}.bin`` files, each ``{concept token: tensor[D]}`` (the official layout)."""
    from wsolbench.io import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for c in range(len(concept_tokens)) if classes is None else classes:
        with atomic_path(directory / f"{concepts.offset + c}.bin") as tmp:
            torch.save({concept_tokens[c]: concepts.rows[c].detach().float().cpu().clone()}, tmp)
    return directory


def load_official_tokens(concepts: ConceptTokenEmbedding, concept_tokens: Sequence[str], directory: str | Path,
                         strict: bool) -> list[int]:
    """Read ``{token_id}.bin`` files (torch.load with weights_only=True) into the rows; returns the classes
    loaded. A missing file leaves that class at its meta-token initialisation (a warning, as in the official
    code) unless ``strict``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingWeightsError(f"GenPromp token folder not found: {directory} (expected files "
                                  f"{concepts.offset}.bin ... with {{'<token>': tensor}})")
    loaded, missing = [], []
    for c, token in enumerate(concept_tokens):
        f = directory / f"{concepts.offset + c}.bin"
        if not f.exists():
            missing.append(c)
            continue
        obj = torch.load(f, map_location="cpu", weights_only=True)
        if token not in obj:
            raise ValueError(f"{f} holds {list(obj)}, not the concept token {token!r}")
        with torch.no_grad():
            concepts.rows[c].copy_(obj[token].to(concepts.rows[c]))
        loaded.append(c)
    if missing:
        if strict:
            raise FileNotFoundError(f"{directory}: no token file for classes {missing[:10]}...")
        log.warning("GenPromp: %d concept tokens missing in %s (kept at their meta-token init)",
                    len(missing), directory)
    return loaded
