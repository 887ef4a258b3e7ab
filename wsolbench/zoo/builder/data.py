"""Training and test data for the zoo, rendered on the fly from the synthetic world (deterministic by seed).

One :class:`WorldPool` of 64 px (tiny) / 32 px (micro) scenes is rendered per build and shared by all
models: mostly single-object scenes (labels for the classifiers, captions for CLIP and diffusion), a
quarter with 2-3 objects (multi-phrase captions), and square crops around every object with its phrase
(region captions for the captioner). Train and test scenes come from disjoint seed ranges.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TEST_SEED_OFFSET = 10_000_000
PROMPT = "a photo of a {}"


def world():
    from wsolbench.datasets import synthetic

    return synthetic


@dataclass
class WorldPool:
    images: np.ndarray            # N×S×S×3 uint8
    labels: np.ndarray            # N int64: class of the (first) object; -1 for none
    single: np.ndarray            # N bool: exactly one object
    captions: list[str]           # the scene caption
    phrases: list[list[str]]      # per scene, each object's phrase
    names: list[list[str]]        # per scene, each object's class name
    boxes: np.ndarray             # N×4 float32 x0 y0 x1 y1 (inclusive pixels) of the first object; -1 if none
    masks: np.ndarray             # N×S×S bool: the first object's visible pixels
    crops: np.ndarray             # M×S×S×3 uint8 square crops around objects
    crop_phrases: list[str] = field(default_factory=list)
    crop_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.images)


def _square_crop(image: np.ndarray, box, size: int, rng: np.random.Generator) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    x0, y0, x1, y1 = [float(v) for v in box]
    side = max(x1 - x0 + 1, y1 - y0 + 1) * float(rng.uniform(1.1, 1.4))
    cx, cy = (x0 + x1 + 1) / 2 + rng.uniform(-0.1, 0.1) * side, (y0 + y1 + 1) / 2 + rng.uniform(-0.1, 0.1) * side
    a0, b0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    a1, b1 = int(round(cx + side / 2)), int(round(cy + side / 2))
    pad = max(0, -a0, -b0, a1 - w, b1 - h)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        a0, b0, a1, b1 = a0 + pad, b0 + pad, a1 + pad, b1 + pad
    crop = image[b0:b1, a0:a1]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def make_pool(n: int, size: int, seed: int, *, multi_fraction: float = 0.25, test: bool = False,
              progress=None) -> WorldPool:
    """Render ``n`` scenes of ``size``×``size`` px with seeds derived from ``seed`` (disjoint for test)."""
    syn = world()
    base = (TEST_SEED_OFFSET if test else 0) + seed * 1_000_003
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1 if test else 0, 77]))
    n_multi = int(round(n * multi_fraction))
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = np.full(n, -1, np.int64)
    single = np.zeros(n, bool)
    boxes = np.full((n, 4), -1, np.float32)
    masks = np.zeros((n, size, size), bool)
    captions, phrases, names = [], [], []
    crops, crop_phrases, crop_labels = [], [], []
    for i in range(n):
        n_obj = (2, 3) if i >= n - n_multi else 1
        scene = syn.render_scene(base + i, size=(size, size), n_objects=n_obj)
        images[i] = scene.image
        if scene.objects:
            labels[i] = scene.objects[0].class_index
            boxes[i] = scene.objects[0].box
            masks[i] = scene.objects[0].mask
        single[i] = len(scene.objects) == 1
        captions.append(scene.caption)
        phrases.append([o.phrase for o in scene.objects])
        names.append([o.name for o in scene.objects])
        for o in scene.objects:
            crops.append(_square_crop(scene.image, o.box, size, rng))
            crop_phrases.append(o.phrase)
            crop_labels.append(o.class_index)
        if progress is not None:
            progress(1)
    # shuffle the multi-object scenes in among the single ones (deterministically)
    order = rng.permutation(n)
    return WorldPool(images=images[order], labels=labels[order], single=single[order],
                     captions=[captions[j] for j in order], phrases=[phrases[j] for j in order],
                     names=[names[j] for j in order], boxes=boxes[order], masks=masks[order],
                     crops=np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8),
                     crop_phrases=crop_phrases, crop_labels=np.asarray(crop_labels, np.int64))


def random_flips(rng: np.random.Generator, n: int) -> np.ndarray:
    """Which of ``n`` training images to flip horizontally (each with probability ½)."""
    return rng.random(n) < 0.5


def flip_where(x, flip: np.ndarray | None):
    """Flip the images (N×C×H×W tensor, in place) where ``flip`` is True horizontally; returns x."""
    import torch

    if flip is not None:
        f = torch.from_numpy(np.asarray(flip, dtype=bool))
        x[f] = x[f].flip(-1)
    return x


def to_tensor(images: np.ndarray, mean, std, flip: np.ndarray | None = None):
    """uint8 N×H×W×3 → float N×3×H×W normalised; the images where ``flip`` is True flipped horizontally."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    x = flip_where(x, flip)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def clip_text_for(pool: WorldPool, i: int, rng: np.random.Generator) -> str:
    """A training caption for scene ``i``: the scene caption, a phrase, or a class prompt."""
    r = rng.random()
    if r < 0.35 or not pool.phrases[i]:
        return pool.captions[i]
    if r < 0.7:
        return pool.phrases[i][int(rng.integers(len(pool.phrases[i])))]
    return PROMPT.format(pool.names[i][int(rng.integers(len(pool.names[i])))])
