"""The evaluation data pipeline: images decoded ahead in DataLoader worker processes, and a batch's scoring
overlapped with the next batch's model call.

``scored_batches`` feeds the harness's fixed batches to ``evaluator.process`` in two threads: the model calls
take turns (one lock; under ``torch.autocast`` when ``amp`` is set) while the other thread scores the
previous batch's maps — the MaxBoxAcc kernel and OpenCV release the GIL, so a thread is enough. Each batch is
scored into fresh metric objects and handed back in batch order, so the merged numbers are those of the
sequential loop. Decoding happens in ``workers`` processes (0: in the main thread, still ahead of the model).
Images reach ``localize`` as PIL images, as before: each method resizes and converts them its own way.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .distributed import World

AMP_DTYPES = ("bf16", "fp16")
MAX_WORKERS = 8  # past this, decoding outruns any single model on one device


@dataclass(frozen=True)
class EvalOptions:
    """How the harness loads and runs batches (none of it changes the numbers, except ``amp``)."""

    workers: int = 0
    amp: str | None = None
    device: str = "cpu"
    progress: bool = True


def default_workers(world: World) -> int:
    """Decoding processes per rank: the rank's share of the CPU cores less the two its own threads keep busy
    (model calls, scoring), at most ``MAX_WORKERS``. On 2 cores that is 0: decoding in the main thread, ahead
    of the scoring threads, was faster there than worker processes (bench/harness_bench.py)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cores // max(1, world.local_size) - 2))


def check_amp(amp: str | None) -> str | None:
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)} (or absent for float32), got {amp!r}")
    return amp


class SpanImages:
    """A torch map-style dataset whose item j is the decoded images of batch ``spans[j]`` of ``dataset``:
    ``(kept positions, images, load errors)``; errors are returned, not raised, so the main process applies
    the run's ``on_error`` policy with the loader's own one-line message. ``as_tensors``: images as H×W×3
    uint8 tensors, which cross from a worker process through shared memory instead of a pickle."""

    def __init__(self, dataset: Any, spans: Sequence[tuple[int, int]], as_tensors: bool = False) -> None:
        self.dataset, self.spans, self.as_tensors = dataset, list(spans), as_tensors

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, j: int) -> tuple[list[int], list, list[tuple[int, str]]]:
        from wsolbench.datasets.base import DatasetError

        start, stop = self.spans[j]
        keep, images, errors = [], [], []
        for i in range(start, stop):
            try:
                image = self.dataset[i].load_image()  # decoded here (the loader calls load())
                images.append(_to_tensor(image) if self.as_tensors else image)
                keep.append(i)
            except DatasetError as exc:
                errors.append((i, str(exc)))
        return keep, images, errors


def _to_tensor(image: Any) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image, dtype=np.uint8))


def _to_pil(image: Any) -> Any:
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(image.numpy(), "RGB")


def _as_is(item: Any) -> Any:
    return item


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding needs no intra-op threads; the model's process keeps its own


def decoded_batches(dataset: Any, spans: Sequence[tuple[int, int]], workers: int) -> Iterator:
    """Decoded batches of ``spans`` in order, ``workers`` processes ahead (0: in this thread)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(SpanImages(dataset, spans, as_tensors=workers > 0), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    return iter(loader)


@contextmanager
def serialized_model(method: Any, amp: str | None, device: str) -> Iterator[None]:
    """Within the block, ``method.localize`` runs one call at a time (the scoring threads share the model)
    and under ``torch.autocast`` when ``amp`` is set; the method is restored afterwards."""
    import torch

    lock = threading.Lock()
    original = method.localize
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"

    @functools.wraps(original)
    def localize(*args: Any, **kwargs: Any) -> Any:
        with lock:
            if dtype is None:
                return original(*args, **kwargs)
            with torch.autocast(device_type=device_type, dtype=dtype):
                return original(*args, **kwargs)

    method.localize = localize
    try:
        yield
    finally:
        del method.localize  # the instance attribute; the class's method shows again


def scored_batches(evaluator: Any, dataset: Any, spans: Sequence[tuple[int, int]], on_error: str,
                   opts: EvalOptions, desc: str) -> Iterator[tuple[int, tuple[dict, list, list]]]:
    """``(k, (batch metrics, records, skipped))`` for each ``spans[k]``, in order; see the module docstring."""
    from tqdm.auto import tqdm

    if not spans:
        return
    bar = tqdm(total=len(spans), desc=desc, unit="batch", disable=not opts.progress, leave=False)
    images = decoded_batches(dataset, spans, opts.workers)
    pending: deque[tuple[int, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wsolbench-score")
    try:
        with serialized_model(evaluator.method, opts.amp, opts.device):
            for k, (keep, imgs, errors) in enumerate(images):
                skip = _skips(dataset, errors, on_error)
                pending.append((k, pool.submit(_process, evaluator, dataset, keep, imgs, skip)))
                if len(pending) == 2:  # batch k's model call overlaps batch k-1's scoring; not further
                    yield _finish(pending.popleft(), bar)
            while pending:
                yield _finish(pending.popleft(), bar)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _finish(item: tuple[int, Future], bar: Any) -> tuple[int, tuple[dict, list, list]]:
    k, future = item
    result = future.result()
    bar.update(1)
    return k, result


def _process(evaluator: Any, dataset: Any, keep: list[int], images: list, skip: list) -> tuple[dict, list, list]:
    samples = [dataset[i] for i in keep]
    images = [_to_pil(im) for im in images]  # the PIL images localize() has always received
    batch_metrics, records = evaluator.process(samples, images) if samples else ({}, [])
    return batch_metrics, records, skip


def _skips(dataset: Any, errors: list[tuple[int, str]], on_error: str) -> list[dict]:
    """The skipped-image entries of a batch, or the run's one-line error when it does not skip."""
    if errors and on_error != "skip":
        from .harness import HarnessError

        raise HarnessError(f"{errors[0][1]} (use --on-error skip to count and skip such images)")
    return [{"image_id": dataset[i].image_id, "path": str(dataset[i].image_path), "reason": reason}
            for i, reason in errors]
