"""Tokenizers that work with no network.

* CLIP BPE (used by the zoo CLIP, the diffusion text encoder, and every real CLIP/Stable Diffusion model):
  open_clip ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``. Its first line is a header; the next
  48,894 lines (49152 - 256 - 2) are the BPE merges in rank order. The vocabulary is, in id order,
  the 256 byte-level symbols of ``bytes_to_unicode()``, the same 256 with ``</w>`` appended, one entry
  per merge (the two halves concatenated), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407):
  49,408 ids, identical to ``openai/clip-vit-*`` and ``CompVis/stable-diffusion-v1-4/tokenizer``.
  :func:`clip_bpe_vocab_and_merges` rebuilds ``vocab.json`` / ``merges.txt`` from it, and
  :func:`make_clip_tokenizer` turns them into a ``transformers.CLIPTokenizer`` (pad = ``<|endoftext|>``,
  as in Stable Diffusion).
* The tiny zoo's CLIP BPE (``SPECS["tiny"]["tokenizer"]``): the same file format, byte-level rules and special
  tokens, but only the OpenAI merges that the synthetic world's words and the methods' prompt templates use
  (``WORLD_BPE``, written by :mod:`wsolbench.zoo.builder.vocab`), in their OpenAI rank order: those words
  split into exactly the OpenAI pieces, any other text into smaller byte-level pieces, and the vocabulary
  shrinks from 49,408 to ``SPECS["tiny"]["clip"]["text_cfg"]["vocab_size"]`` ids (``<|endoftext|>`` is still
  the largest id, which open_clip's text pooling relies on). open_clip's ``SimpleTokenizer(bpe_path=...)``
  and ``transformers.CLIPTokenizer`` read it as they read OpenAI's file.
* BLIP captioner: a BERT WordPiece ``vocab.txt`` made of the special tokens BLIP uses
  (``[PAD] [UNK] [CLS] [SEP] [MASK] [DEC]``) plus the whole words of the synthetic world's captions, so
  ``BertTokenizer`` / ``BlipProcessor`` load from a local directory.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
N_CLIP_MERGES = 49152 - 256 - 2  # as in OpenAI CLIP / open_clip SimpleTokenizer
# the tiny zoo's reduced merges file, shipped beside this module (regenerate: python -m wsolbench.zoo.builder.vocab)
WORLD_BPE = Path(__file__).with_name("bpe_synthetic_world.txt.gz")
BPE_FILES = {"openai": None, "synthetic-world": WORLD_BPE}  # SPECS[scale]["tokenizer"]["bpe"] -> file


def clip_bpe_path(scale: str | None = None) -> Path:
    """The BPE merges file of a zoo scale's CLIP (``None``: OpenAI's, bundled with open_clip; no download)."""
    from open_clip.tokenizer import default_bpe

    from .specs import spec

    path = BPE_FILES[spec(scale, "tokenizer")["bpe"]] if scale is not None else None
    return Path(default_bpe()) if path is None else path


def _bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


@lru_cache(maxsize=4)
def clip_bpe_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as "a b" strings) rebuilt from a BPE merges file (default: OpenAI's)."""
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:N_CLIP_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_bpe_files(directory: str | Path, bpe_path: Path | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the layout of an HF CLIP tokenizer folder)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab_and_merges(bpe_path)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def make_clip_tokenizer(model_max_length: int = 77, bpe_path: Path | None = None):
    """A ``transformers.CLIPTokenizer`` over a BPE merges file (default: OpenAI CLIP's, from open_clip), offline."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab_and_merges(bpe_path)
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], unk_token=CLIP_EOS, bos_token=CLIP_BOS,
                        eos_token=CLIP_EOS, pad_token=CLIP_EOS, model_max_length=model_max_length)
    return tok


# --------------------------------------------------------------------------- BLIP / BERT word vocabulary
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
# words BLIP-style captions and prompts use besides the synthetic world's own attribute/class words
BASE_WORDS = ("a", "an", "the", "of", "and", "with", "on", "in", "photo", "picture", "image", "object",
              "shape", "thing", "left", "right", "above", "below", "next", "to", "near", "small", "large",
              "big", "one", "two", "three", "background", ",", ".")


def write_bert_vocab(directory: str | Path, words: Iterable[str]) -> Path:
    """Write a WordPiece ``vocab.txt``: BLIP's special tokens, base words, then ``words`` (sorted, unique)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: dict[str, None] = dict.fromkeys(BERT_SPECIALS)
    for w in list(BASE_WORDS) + sorted({w.lower() for w in words}):
        seen.setdefault(w, None)
    # single characters let WordPiece spell unseen words instead of mapping them to [UNK]
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        seen.setdefault(ch, None)
        seen.setdefault("##" + ch, None)
    path = directory / "vocab.txt"
    path.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return path


def make_bert_tokenizer(directory: str | Path):
    """``BertTokenizer`` over a ``vocab.txt`` written by :func:`write_bert_vocab`, with BLIP's [DEC] bos."""
    from transformers import BertTokenizer

    lines = (Path(directory) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {tok: i for i, tok in enumerate(t for t in lines if t)}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=32)
    return tok


def clear_call_state(tokenizer) -> None:
    """Clear the padding and truncation a fast tokenizer keeps from its last call: ``save_pretrained`` writes
    them into tokenizer.json, so a zoo model's files (and fingerprint) would depend on what was tokenized last."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
