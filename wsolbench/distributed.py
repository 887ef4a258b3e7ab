"""Several processes for one run: the launcher's environment, the process group, each rank's share, and
data-parallel training.

``torchrun``, ``accelerate launch`` and ``srun torchrun`` start one process per device and set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init`` reads them
and joins the process group (NCCL for CUDA devices, gloo on CPU). Without them everything here is the
single-process no-op, so the same code path serves one process and many.

Evaluation: rank r scores the fixed batches j with ``j % world == r`` and writes their shards; after a
barrier every rank merges all shards in batch order, which is the single-process sum in the same order.

Training: inside ``data_parallel()`` the loaders of ``wsolbench.training`` give rank r its slice of every
global batch (the single-process batches, split evenly), and ``TrainLoop`` averages the gradients across
ranks after each backward pass and broadcasts rank 0's buffers before each step — what
``DistributedDataParallel`` does, done in the loop so that the methods' step functions, which call their bare
modules, need no change. The effective batch is the config's batch size whatever the number of processes,
so the learning rate is not rescaled.
"""
from __future__ import annotations

import atexit
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

TIMEOUT_ENV = "WSOLBENCH_DIST_TIMEOUT_MIN"  # collective timeout in minutes (torch's default is 30)


class DistributedError(RuntimeError):
    """A launch this module cannot serve; the message names the variable or flag and the fix."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> list[int]:
        """This rank's items of ``range(n)``: round robin, so ranks stay balanced whatever is already cached."""
        return list(range(self.rank, n, self.size))


SINGLE = World()


def launched() -> World:
    """The world the launcher describes in the environment (``SINGLE`` when not launched by one)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as exc:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); launch with torchrun, "
                               "accelerate launch or srun torchrun") from None
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}; launch with torchrun or accelerate")
    return World(rank, size, local_rank, local_size)


def current() -> World:
    """The world of the initialised process group (``SINGLE`` when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    env = launched()
    return World(dist.get_rank(), dist.get_world_size(), env.local_rank, env.local_size, dist.get_backend())


def rank_device(device: str, world: World) -> str:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>`` when several processes run."""
    if world.parallel and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def init(device: str = "cpu") -> World:
    """Join the process group the launcher set up (once per process); return this process's world."""
    import torch
    import torch.distributed as dist

    world = launched()
    if not world.parallel:
        return SINGLE
    if dist.is_initialized():
        return current()
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {device} under {world.size} processes, but CUDA is not available; "
                                   "use --device cpu (gloo)")
        torch.cuda.set_device(torch.device(rank_device(device, world)))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DistributedError(f"WORLD_SIZE={world.size} is set but {var} is not; launch with torchrun, "
                                   "accelerate launch or srun torchrun (they set it)")
    minutes = float(os.environ.get(TIMEOUT_ENV, "30"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    atexit.register(_shutdown)
    return current()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wait_for(path: Path, poll_s: float = 2.0) -> None:
    """Wait until ``path`` exists: for work of unbounded length on rank 0 (a collective would time out).
    If rank 0 fails, the launcher ends this process."""
    while not Path(path).exists():
        time.sleep(poll_s)


# ---- data-parallel training ---------------------------------------------------------------------------
_DATA_PARALLEL: World | None = None


@contextmanager
def data_parallel(world: World | None = None) -> Iterator[World]:
    """Within this block ``training.make_loader`` and ``TrainLoop`` train data-parallel over ``world``."""
    global _DATA_PARALLEL
    before, _DATA_PARALLEL = _DATA_PARALLEL, world or current()
    try:
        yield _DATA_PARALLEL
    finally:
        _DATA_PARALLEL = before


def training_world() -> World:
    """The world training runs over now: ``SINGLE`` outside ``data_parallel()``."""
    return _DATA_PARALLEL if _DATA_PARALLEL is not None and _DATA_PARALLEL.parallel else SINGLE


class RankBatches:
    """Rank ``rank``'s slice of every batch of ``batches`` (a batch sampler): the global batches stay those of
    one process, split evenly (``numpy.array_split``); a batch with fewer items than ranks is dropped by all."""

    def __init__(self, batches: Iterable[list[int]], rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) >= self.size:
                yield list(batch[self._bounds(len(batch))])

    def _bounds(self, n: int) -> slice:
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def __len__(self) -> int:
        sampler = getattr(self.batches, "sampler", None)
        bs = getattr(self.batches, "batch_size", None)
        if sampler is None or bs is None:
            return sum(1 for _ in self)
        full, rest = divmod(len(sampler), bs)
        return full + int(not self.batches.drop_last and rest >= self.size)


def _flat_all_reduce(tensors: Sequence[Any], average: bool) -> None:
    import torch
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params: Iterable[Any]) -> None:
    """Replace each gradient by its mean over the ranks (the reduction DDP does; same on every rank).
    Parameters without a gradient are left out (the same ones on every rank: same model, same code)."""
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[Any, list] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        _flat_all_reduce(group, average=True)


def broadcast_from_main(tensors: Iterable[Any]) -> None:
    """Give every rank rank 0's values of ``tensors`` (parameters at the start, buffers before each step)."""
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data if hasattr(t, "data") else t, src=0)


def sum_over_ranks(values: dict[str, float], count: int) -> tuple[dict[str, float], int]:
    """Sums of named floats and a count over all ranks (epoch records of the global batches)."""
    import torch

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(count)], dtype=torch.float64)
    _flat_all_reduce([t], average=False)
    return {k: float(v) for k, v in zip(keys, t[:-1].tolist())}, int(round(float(t[-1])))


def gather_from_ranks(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (e.g. the RNG states a checkpoint keeps)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def describe(world: World, *, workers: int, amp: str | None, trained: str | None) -> dict:
    """What the run record says about processes, loading and training layout."""
    out: dict[str, Any] = {"world_size": world.size, "backend": world.backend, "workers_per_rank": workers,
                           "amp": amp}
    if trained == "one-process":
        out["training"] = {"mode": "one process", "effective_batch": "the config's batch size", "lr_scale": 1.0}
    elif trained == "data-parallel":
        out["training"] = {"mode": f"data-parallel over {world.size} ranks",
                           "effective_batch": "the config's batch size (each global batch split over the ranks)",
                           "lr_scale": 1.0}
    elif trained == "main-rank":
        out["training"] = {"mode": "rank 0 alone (the method's fit does not train through TrainLoop)",
                           "effective_batch": "the config's batch size", "lr_scale": 1.0}
    return out


def fit_and_save(method: Any, train: Any, val: Any, *, out_dir: Path, checkpoint: Path,
                 resume: bool, progress: bool) -> Any:
    """Train ``method`` (data-parallel when its fit goes through TrainLoop, else on rank 0 alone), save it
    to ``checkpoint`` from rank 0, and return the method every rank evaluates with: rank 0 keeps the trained
    object (as one process does), the others load rank 0's checkpoint, so every rank scores the same weights."""
    world = current()
    if not world.parallel:
        method.fit(train, val_data=val, out_dir=out_dir, resume=resume, progress=progress)
        method.save(checkpoint)
        return method
    if method.data_parallel_fit:
        with data_parallel(world):
            method.fit(train, val_data=val, out_dir=out_dir, resume=resume, progress=progress and world.is_main)
        if world.is_main:
            method.save(checkpoint)
        barrier()
    elif world.is_main:
        method.fit(train, val_data=val, out_dir=out_dir, resume=resume, progress=progress)
        method.save(checkpoint)
    else:
        wait_for(Path(checkpoint) / "config.yaml")  # Localizer.save writes it after the weights
    return method if world.is_main else type(method).load(checkpoint, device=method.device)


def training_mode(method_cls: Any, world: World) -> str:
    """How ``fit_and_save`` trains a ``method_cls`` over ``world`` (for the run record)."""
    if not world.parallel:
        return "one-process"
    return "data-parallel" if method_cls.data_parallel_fit else "main-rank"
