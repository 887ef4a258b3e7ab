"""WWbL's training set: (image in [0, 1], text) pairs with the official augmentations (a caption picked per
epoch, each word kept with probability p, random crop, horizontal flip), reproducible per (seed, epoch, index)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch


def drop_words(text: str, keep_prob: float, rng: np.random.Generator) -> str:
    """Keep each word with probability ``keep_prob`` (the official COCO augmentation); never empty."""
    words = text.split()
    if keep_prob >= 1.0 or not words:
        return text
    kept = [w for w in words if rng.random() < keep_prob]
    return " ".join(kept) if kept else words[int(rng.integers(len(words)))]


class TextImageDataset(torch.utils.data.Dataset):
    """(image in [0, 1], text) pairs for g's training; every random choice (caption, word dropout, crop,
    flip) comes from a generator seeded by (seed, epoch, index), so the data of an epoch is reproducible."""

    def __init__(self, samples: Sequence[Any], texts_of: Callable[[Any], list[str]], *, resize: int, crop: int | None, hflip: bool,
                 word_keep_prob: float, prefix: str, seed: int) -> None:
        self.samples = list(samples)
        self.texts_of = texts_of
        self.resize, self.crop, self.hflip = int(resize), (int(crop) if crop else None), bool(hflip)
        self.word_keep_prob, self.prefix, self.seed = float(word_keep_prob), prefix, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        texts = self.texts_of(s)
        text = texts[int(rng.integers(len(texts)))]
        text = self.prefix + drop_words(text, self.word_keep_prob, rng)
        img = s.load_image().resize((self.resize, self.resize), resample=2)  # bilinear
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if self.crop and self.crop < self.resize:
            y = int(rng.integers(self.resize - self.crop + 1))
            x = int(rng.integers(self.resize - self.crop + 1))
            arr = arr[y:y + self.crop, x:x + self.crop]
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        label = int(s.labels[0]) if len(getattr(s, "labels", ())) else -1
        return {"image": torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), "text": text,
                "label": label, "index": int(index)}
