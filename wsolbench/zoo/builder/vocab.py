"""The tiny zoo's CLIP BPE: OpenAI's merges reduced to those the synthetic world's texts use.

Every text the tiny zoo trains on or the methods' tiny profiles prompt with is made of a few hundred words
(class names, colours, textures, caption and prompt templates). Running OpenAI's byte-level BPE on each of
those words (open_clip's own cleaning and pre-tokenisation) records the merges it applies; the kept merges,
in their OpenAI rank order, give each of those words exactly its OpenAI pieces (a lower-ranked merge
that is dropped never applied to any of them), while any other text falls back to smaller byte-level
pieces. The result is written in OpenAI's file format (a header line, then one merge per line, gzip), so
``open_clip.tokenizer.SimpleTokenizer(bpe_path=...)`` and ``transformers.CLIPTokenizer`` read it unchanged.

Regenerate the shipped file (``wsolbench/zoo/bpe_synthetic_world.txt.gz``) with
``python -m wsolbench.zoo.builder.vocab``; ``tests/test_zoo.py`` checks it equals what this module writes.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

from ..tokenizers import N_CLIP_MERGES, WORLD_BPE, clip_bpe_path

HEADER = "\"bpe_simple_vocab_16e6.txt#version: 0.2 (OpenAI CLIP merges used by wsolbench's synthetic world)\""
# Fixed prompt texts of the tiny zoo and the methods' tiny profiles ("{}" = a class, colour or phrase):
PROMPT_TEXTS = (
    "a photo of a {}",  # zoo CLIP / U-Net training and their quality checks (builder/data.py PROMPT)
    "a {} object",  # zoo CLIP's colour check (builder/train.py)
    # GenPromp's seven templates (genpromp.yaml prompts.templates)
    "a rendering of a {}", "the photo of a {}", "a photo of my {}", "a photo of the {}", "a photo of one {}",
    "a rendition of a {}",
    "a photo of a {}.",  # TeD-Loc tiny anchors / pseudo-label prompt (tedloc_tiny.yaml)
    "a clean origami {}.",  # CLIP-ES's prompt (wsolbench/maps/clip_gradcam.py CLIP_ES_PROMPT)
    "a photo of {}",  # MMCST's default prompt form
    "image of {}",  # WWbL's test text ("image of " + phrase)
    # background words: TeD-Loc tiny's and CLIP-ES's (clip_gradcam.CLIP_ES_BACKGROUND)
    "background ground texture pattern clutter land grass tree building wall sky lake water river sea railway "
    "railroad keyboard helmet cloud house mountain ocean road rock street valley bridge sign",
)


def world_texts() -> list[str]:
    """Texts holding every word the synthetic world writes (class names, colours, textures, articles, the
    caption templates and their joiners) and the fixed prompt texts (BPE works word by word, so each word
    once is enough)."""
    from wsolbench.datasets import synthetic as syn

    words = [" ".join(syn.CLASS_NAMES + syn.COLORS + syn.TEXTURES + ("a", "an"))]
    objects = [SimpleNamespace(phrase=f"a {c} {n}") for c, n in zip(syn.COLORS, syn.CLASS_NAMES)][:3]
    captions = [syn.make_caption(objects[:k], t) for k in range(len(objects) + 1) for t in range(5)]
    return list(dict.fromkeys(words + captions + [t.format("") for t in PROMPT_TEXTS]))


def _applied_merges(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges OpenAI's BPE applies to one pre-token (open_clip's ``SimpleTokenizer.bpe`` loop, recorded)."""
    used = []
    while len(word) > 1:
        pairs = set(zip(word, word[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = tuple(out)
    return used


def reduced_merges(texts: list[str]) -> list[str]:
    """The OpenAI merges (``"a b"`` lines, in rank order) that BPE-encoding ``texts`` applies."""
    from open_clip.tokenizer import SimpleTokenizer

    full = SimpleTokenizer(bpe_path=str(clip_bpe_path()))
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")[1:N_CLIP_MERGES + 1]
    ranks = {tuple(m.split()): r for r, m in enumerate(lines)}
    keep: set[int] = set()
    for text in texts:
        for token in full.pat.findall(full.clean_fn(text)):
            chars = tuple(full.byte_encoder[b] for b in token.encode("utf-8"))
            word = chars[:-1] + (chars[-1] + "</w>",)
            keep.update(ranks[m] for m in _applied_merges(word, ranks))
    return [lines[r] for r in sorted(keep)]


def bpe_file_bytes(texts: list[str] | None = None) -> bytes:
    """The gzip file (fixed header time, so the same bytes on every run) of the world's reduced merges."""
    body = "\n".join([HEADER] + reduced_merges(world_texts() if texts is None else texts))  # no trailing newline:
    return gzip.compress(body.encode("utf-8"), mtime=0)  # open_clip would read an empty last line as a merge


def write_world_bpe(path: str | Path = WORLD_BPE) -> Path:
    path = Path(path)
    path.write_bytes(bpe_file_bytes())
    return path


if __name__ == "__main__":
    print(write_world_bpe())
