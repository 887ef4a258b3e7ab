"""The decoding pipeline: images cross from worker processes in reused shared blocks, pixel for pixel."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from wsolbench import pipeline
from wsolbench.pipeline import SLOTS, Slots, Unpacker


def _images(seed: int, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _same(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(x.mode == y.mode == "RGB" and np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(a, b))


def test_a_block_is_sent_once_reused_and_grown():
    slots, unpack = Slots(worker=0), Unpacker()
    batches = [_images(j, [(7 + j, 5), (3, 9)]) for j in range(SLOTS + 1)]
    sent, received = [], []
    for j, images in enumerate(batches):
        packed = slots.pack(j, images)
        sent.append(packed.block is not None)
        received.append(unpack(packed))
    assert sent == [True] * SLOTS + [False]  # each block crosses once; the next batch reuses block 0
    assert all(_same(r, b) for r, b in zip(received, batches))  # copies: batch 0 survives its block's reuse
    bigger = _images(9, [(40, 30)] * 3)  # does not fit block 1: a larger one is made and sent
    packed = slots.pack(SLOTS + 1, bigger)
    assert packed.slot == 1 and packed.block is not None and _same(unpack(packed), bigger)


def test_a_block_reused_before_it_was_read_is_an_error():
    slots, unpack = Slots(worker=3), Unpacker()
    first = slots.pack(0, _images(0, [(6, 6)]))
    for j in range(1, SLOTS + 1):  # the worker runs SLOTS batches ahead: block 0 now holds batch SLOTS
        later = slots.pack(j, _images(j, [(6, 6)]))
        if j < SLOTS:
            unpack(later)
    with pytest.raises(RuntimeError, match="worker 3 reused block 0 before batch 0 was read"):
        unpack(first)


@dataclass
class _Sample:
    image: Image.Image

    def load_image(self) -> Image.Image:
        return self.image


def test_worker_processes_hand_over_the_pixels_decoded_in_process():
    images = _images(1, [(13 + i % 5, 11 + i % 3) for i in range(22)])
    dataset = [_Sample(im) for im in images]
    spans = [(s, min(22, s + 4)) for s in range(0, 22, 4)]  # 6 batches: each worker reuses its blocks
    here = list(pipeline.decoded_batches(dataset, spans, workers=0))
    there = list(pipeline.decoded_batches(dataset, spans, workers=2))
    assert [k for k, _, _ in there] == [k for k, _, _ in here] == [list(range(*s)) for s in spans]
    assert all(_same(a, b) for (_, a, _), (_, b, _) in zip(here, there))
