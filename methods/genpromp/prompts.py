"""GenPromp's prompts: the meta-token rule, f_d / f_r / f_c, and the text conditioning of class and phrase
queries (``PromptsMixin``, mixed into :class:`~wsolbench.methods.genpromp.method.GenPromp`)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from wsolbench.classnames import class_text

EMBEDDINGS = ("combined", "discriminative", "representative")


def select_meta_token(class_name: str, tokenizer) -> str:
    """The official meta-token rule (see the package docstring) on one class's full name: all its
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


def check_synonyms(synonyms: Sequence[Sequence[str]] | None, class_names: Sequence[str]) -> list[tuple[str, ...]] | None:
    """One non-empty tuple of names per class, or None."""
    if synonyms is None:
        return None
    out = [tuple(str(n) for n in ([s] if isinstance(s, str) else s)) for s in synonyms]
    if len(out) != len(class_names) or not all(out):
        raise ValueError(f"class_synonyms must hold one non-empty list of names per class ({len(class_names)}), "
                         f"got {len(out)}")
    return out


def combine_embeddings(f_r: torch.Tensor, f_d: torch.Tensor, ratio: float, mode: str):
    """f_c = ratio * f_r + (1 - ratio) * f_d; ``mode`` discriminative/representative returns f_d / f_r."""
    if mode == "discriminative":
        return f_d
    if mode == "representative":
        return f_r
    if mode != "combined":
        raise ValueError(f"prompts.embedding must be one of {EMBEDDINGS}, got {mode!r}")
    return ratio * f_r + (1.0 - ratio) * f_d


class PromptsMixin:
    """Text conditioning for GenPromp: reads ``config["prompts"]``, ``tokenizer``, ``text_encoder``,
    ``templates``, ``meta_tokens``, ``concept_tokens``, ``max_length`` and keeps an LRU ``_cache``
    (``inference.cache_size`` embeddings)."""

    _cache: "OrderedDict[tuple, torch.Tensor]"

    def _meta_tokens(self) -> list[str]:
        """``prompts.meta_token`` for every class when set (CUB: "bird"), else the official rule on each
        class's full synonym string."""
        fixed = self.config["prompts"]["meta_token"]
        names = [", ".join(s) for s in self.class_synonyms] if self.class_synonyms else self.class_names
        return [fixed if fixed else select_meta_token(n, self.tokenizer) for n in names]

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
        """The conditioning of class ``c``: ``mode`` (f_c / f_d / f_r), or ``prompts.embedding`` when None."""
        p = self.config["prompts"]
        mode = p["embedding"] if mode is None else mode
        key = ("class", int(c), mode)
        if key not in self._cache:
            f_d = self.template_embedding(self.meta_tokens[c]) if mode != "representative" else None
            f_r = self.template_embedding(self.concept_tokens[c]) if mode != "discriminative" else None
            self._put(key, combine_embeddings(f_r, f_d, float(p["combine_ratio"]), mode))
        self._cache.move_to_end(key)
        return self._cache[key]

    @torch.no_grad()
    def phrase_embedding(self, text: str) -> tuple[torch.Tensor, list[int]]:
        """The template-averaged embedding of "a photo of a {text}" and the positions of the phrase's tokens."""
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

    def _weights(self, positions: Sequence[int]) -> torch.Tensor:
        w = torch.zeros(self.max_length)
        w[list(positions)] = 1.0 / len(positions)
        return w

    def class_conditioning(self, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Q×L×D U-Net conditioning (``prompts.embedding``: f_c by default) and Q×L token weights (where the
        attention is read, ``prompts.token_index``) of each class."""
        return (torch.stack([self.class_embedding(c) for c in classes]),
                torch.stack([self._weights(self._class_positions(c)) for c in classes]))
