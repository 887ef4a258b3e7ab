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


class _SlowScoring:
    """An evaluator whose first batch's scoring lasts until the model has been called on the third batch."""

    def __init__(self) -> None:
        import threading

        self.calls: list[int] = []
        self.third_call = threading.Event()
        self.method = self

    def localize(self, images: list) -> int:
        self.calls.append(len(self.calls))
        if len(self.calls) == 3:
            self.third_call.set()
        return len(self.calls) - 1

    def process(self, samples: list, images: list) -> tuple[dict, list]:
        k = self.method.localize(images)  # the serialised model call, as the evaluators make it
        if k == 0 and not self.third_call.wait(timeout=20):
            raise AssertionError("the third model call waited for the first batch's scoring")
        return {"batch": k}, []


def test_a_slow_scoring_does_not_hold_back_the_next_two_model_calls():
    """Issue #23: behind a GPU call a batch's scoring can take longer than the next model call; the next two
    batches still reach the model (IN_FLIGHT = 3: one in the model call, two being scored), in order."""
    from wsolbench.pipeline import EvalOptions, scored_batches

    evaluator = _SlowScoring()
    dataset = [_Sample(im) for im in _images(2, [(8, 8)] * 8)]
    spans = [(s, s + 2) for s in range(0, 8, 2)]
    out = list(scored_batches(evaluator, dataset, spans, "fail", EvalOptions(progress=False), "t"))
    assert [k for k, _ in out] == [0, 1, 2, 3] and [r[0]["batch"] for _, r in out] == [0, 1, 2, 3]
    assert evaluator.calls == [0, 1, 2, 3]
