"""The evaluation data pipeline: images decoded ahead in DataLoader worker processes, and a batch's scoring
overlapped with the next batch's model call.

``scored_batches`` runs ``evaluator.process`` on ``IN_FLIGHT`` = 3 batches at once in threads: the model calls
take turns (one lock; under ``torch.autocast`` when ``amp`` is set) while the other threads score the
previous batches and write their records and map PNGs — the MaxBoxAcc kernel (with its own image threads),
OpenCV and the PNG encoder release the GIL, so threads are enough; a GPU call waits without the CPU, so the
scoring runs beside it. Each batch is scored into fresh metric objects and handed back in batch order, so
the merged numbers are those of the sequential loop. Decoding happens in
``workers`` processes (0: in the main thread, still ahead of the model), whose images cross in reused
shared-memory blocks (``Slots``). Images reach ``localize`` as PIL images, as before: each method resizes
and converts them its own way (moving that into the workers would change the Localizer contract).
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
# batches inside evaluator.process at once: one in the model call, two being scored. With two, a batch's
# scoring (longer than a 5 ms/image model call on 2 cores) made the next-but-one model call wait: behind a
# 5 ms/image method the harness took +34% over the model's time, +17% with three (384 images, 0 workers,
# mean of five runs each on the 2-core CI machine; bench/harness_bench.py's fixed-cost method)
IN_FLIGHT = 3
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
    (model calls, scoring), at most ``MAX_WORKERS``. On 2 cores that is 0: there, decoding in the main thread,
    ahead of the scoring threads, beat 2 worker processes, which cost ~2 ms of CPU per image more (forked
    copies of a large process page-fault; bench/harness_bench.py)."""
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
    the run's ``on_error`` policy with the loader's own one-line message. In a worker process the images
    travel as one ``PackedImages`` (see ``Slots``) instead of a pickle each."""

    def __init__(self, dataset: Any, spans: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.spans = dataset, list(spans)
        self.slots: Slots | None = None  # made in each worker (``_worker_init``)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, j: int) -> tuple[list[int], Any, list[tuple[int, str]]]:
        from wsolbench.datasets.base import DatasetError

        start, stop = self.spans[j]
        keep, images, errors = [], [], []
        for i in range(start, stop):
            try:
                images.append(self.dataset[i].load_image())  # decoded here (the loader calls load())
                keep.append(i)
            except DatasetError as exc:
                errors.append((i, str(exc)))
        return keep, self.slots.pack(j, images) if self.slots is not None else images, errors


@dataclass(frozen=True)
class PackedImages:
    """A batch's RGB images written one after the other into shared block ``slot`` of worker ``worker``
    (its H×W×3 pixels after an 8-byte header holding the batch index); ``block`` is the shared tensor
    itself the first time that block is used (or when it had to grow), None after."""

    worker: int
    slot: int
    batch: int
    shapes: tuple[tuple[int, int, int], ...]
    block: Any = None


HEADER = 8  # bytes: the batch index (int64) a block holds, checked after reading


class Slots:
    """A worker's ring of shared-memory blocks, reused batch after batch.

    Fresh shared memory for every batch (torch's default for a returned tensor) costs a page fault per 4 kB
    on first touch, on this project's VMs about as much CPU as decoding the JPEG; a block is sent to the main
    process once and reused after. Block ``n % SLOTS`` of a worker holds its n-th batch; the main
    process copies a batch out as soon as it arrives and ``unpack`` then checks the header still names that
    batch, so a block reused too early is an error, never wrong pixels. ``SLOTS`` = the loader's prefetch
    + 1: the DataLoader asks for batch i only once batch i − prefetch × workers has arrived, and hands the
    workers their batches in turn, so a worker's block last held batch i − SLOTS × workers, already read."""

    def __init__(self, worker: int) -> None:
        self.worker, self.blocks, self.n = worker, [None] * SLOTS, 0

    def pack(self, j: int, images: Sequence[Any]) -> PackedImages:
        import numpy as np
        import torch

        arrays = [np.asarray(im, dtype=np.uint8) for im in images]
        need = HEADER + sum(a.size for a in arrays)
        slot, self.n = self.n % SLOTS, self.n + 1
        block, sent = self.blocks[slot], None
        if block is None or block.numel() < need:
            block = sent = self.blocks[slot] = torch.empty(need + need // 4, dtype=torch.uint8).share_memory_()
        flat = block.numpy()
        flat[:HEADER] = np.frombuffer(np.int64(j).tobytes(), np.uint8)
        at = HEADER
        for a in arrays:
            flat[at:at + a.size] = a.reshape(-1)
            at += a.size
        return PackedImages(self.worker, slot, j, tuple(a.shape for a in arrays), sent)


class Unpacker:
    """The main process's side of ``Slots``: the blocks received so far, and the PIL images of a batch."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, int], Any] = {}

    def __call__(self, packed: Any) -> list:
        import numpy as np
        from PIL import Image

        if not isinstance(packed, PackedImages):
            return packed  # decoded in this process
        if packed.block is not None:
            self.blocks[packed.worker, packed.slot] = packed.block
        flat = self.blocks[packed.worker, packed.slot].numpy()
        at, images = HEADER, []
        for shape in packed.shapes:
            size = int(np.prod(shape))
            images.append(Image.fromarray(flat[at:at + size].reshape(shape)))  # H×W×3 uint8: RGB; a copy
            at += size
        if int(flat[:HEADER].view(np.int64)[0]) != packed.batch:
            raise RuntimeError(f"decoding worker {packed.worker} reused block {packed.slot} before batch "
                               f"{packed.batch} was read (a wsolbench bug: raise SLOTS)")
        return images


PREFETCH = 2  # batches each worker decodes ahead (DataLoader's prefetch_factor)
SLOTS = PREFETCH + 1


def _as_is(item: Any) -> Any:
    return item


def _worker_init(worker: int) -> None:
    import torch
    from torch.utils.data import get_worker_info

    torch.set_num_threads(1)  # decoding needs no intra-op threads; the model's process keeps its own
    get_worker_info().dataset.slots = Slots(worker)


def decoded_batches(dataset: Any, spans: Sequence[tuple[int, int]], workers: int) -> Iterator:
    """Decoded batches of ``spans`` in order, ``workers`` processes ahead (0: in this thread), as
    ``(kept positions, PIL images, load errors)``."""
    from torch.utils.data import DataLoader

    loader = DataLoader(SpanImages(dataset, spans), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_as_is, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=PREFETCH if workers else None, persistent_workers=False)
    unpack = Unpacker()
    for keep, images, errors in loader:
        yield keep, unpack(images), errors  # copied out at once: the worker may reuse its block


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
    pool = ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="wsolbench-score")
    try:
        with serialized_model(evaluator.method, opts.amp, opts.device):
            for k, (keep, imgs, errors) in enumerate(images):
                skip = _skips(dataset, errors, on_error)
                pending.append((k, pool.submit(_process, evaluator, dataset, keep, imgs, skip)))
                if len(pending) == IN_FLIGHT:
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
    batch_metrics, records = evaluator.process(samples, images) if samples else ({}, [])
    return batch_metrics, records, skip


def _skips(dataset: Any, errors: list[tuple[int, str]], on_error: str) -> list[dict]:
    """The skipped-image entries of a batch, or the run's one-line error when it does not skip."""
    if errors and on_error != "skip":
        from .harness import HarnessError

        raise HarnessError(f"{errors[0][1]} (use --on-error skip to count and skip such images)")
    return [{"image_id": dataset[i].image_id, "path": str(dataset[i].image_path), "reason": reason}
            for i, reason in errors]
