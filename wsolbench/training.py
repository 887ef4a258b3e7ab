"""Shared training infrastructure: seeding, a Sample→tensor dataset, deterministic loaders and a resumable loop.

The trainable methods CAM, MMCST, TeD-Loc and WWbL train through ``TrainLoop``:

    loop = TrainLoop(out_dir, epochs=10, modules={"model": net}, optimizer=opt, scheduler=sched)
    history = loop.run(lambda epoch: make_loader(ds, tf, batch_size=32, shuffle=True, seed=0, epoch=epoch),
                       step=lambda batch: {"loss": F.cross_entropy(net(batch["image"]), batch["label"])},
                       resume=True)

The loop owns zero_grad/backward/(clip)/step/scheduler, a tqdm bar with the running loss, and an atomic
checkpoint at each epoch end (modules + optimizer + scheduler + finished epochs + RNG states + history,
written with ``torch.save`` and read back with ``torch.load(weights_only=True)``). ``resume=True`` continues
after the last finished epoch and ends with the same weights as an uninterrupted run (same device, same
data order: use ``make_loader``, whose order depends only on ``seed + epoch``).

Modules passed in ``modules`` are checkpointed and put in train mode each epoch; keep frozen encoders out of
it (and in eval mode) yourself.

Several processes (``torchrun``): inside ``wsolbench.distributed.data_parallel()`` each rank loads its slice
of every global batch and the loop averages gradients over the ranks after ``backward`` (see
``wsolbench/distributed.py``); rank 0 writes the checkpoints. GenPromp trains outside ``TrainLoop``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .io import atomic_path, write_json

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
HISTORY_NAME = "history.json"
_FORMAT = "wsolbench-trainloop-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- seeding ------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_rng_state() -> dict:
    """All RNG states as plain tensors/ints (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [int(py_version), [int(x) for x in py_internal], py_gauss],
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---- transforms: the protocol ones of datasets/transforms.py, plus optional extra augmentation ---------
def train_transform(resize_size: int = 256, crop_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    flip: bool = True, scale: Sequence[float] | None = None, color_jitter: float = 0.0,
                    hue: float = 0.0, grayscale_p: float = 0.0):
    """The WSOL training augmentation: resize to resize_size², random crop crop_size, horizontal flip.

    Options beyond the protocol (off by default): ``scale=(lo, hi)`` → RandomResizedCrop(crop_size, scale)
    instead of resize + crop; ``color_jitter`` (brightness/contrast/saturation strength), ``hue`` (≤ 0.5),
    ``grayscale_p``.
    """
    if scale is None and not color_jitter and not hue and not grayscale_p:
        from wsolbench.datasets.transforms import train_transform as protocol_train_transform

        return protocol_train_transform(resize_size, crop_size, flip=flip, mean=mean, std=std)
    from torchvision.transforms import v2

    ops: list = [v2.ToImage()]
    if scale is not None:
        ops.append(v2.RandomResizedCrop(crop_size, scale=tuple(scale), antialias=True))
    else:
        ops += [v2.Resize((resize_size, resize_size), antialias=True), v2.RandomCrop(crop_size)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if color_jitter or hue:
        ops.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                  hue=min(0.5, hue)))
    if grayscale_p:
        ops.append(v2.RandomGrayscale(p=grayscale_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def eval_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The WSOL evaluation transform: resize to size² (no crop), normalise (datasets/transforms.py)."""
    from wsolbench.datasets.transforms import eval_transform as protocol_eval_transform

    return protocol_eval_transform(size, mean=mean, std=std)


# ---- data ---------------------------------------------------------------------------------------------
class SampleImageDataset(Dataset):
    """A ``WSOLDataset`` as a torch dataset of ``dict(image=3×H×W tensor, label=..., index=int)``.

    ``target``: ``"single"`` → int label (``sample.label``); ``"multi"`` → multi-hot float tensor of length C
    (the dataset's classes); ``"none"`` → label -1. ``transform`` maps a PIL image to a tensor.
    """

    TARGETS = ("single", "multi", "none")

    def __init__(self, dataset, transform, target: str = "single", num_classes: int | None = None) -> None:
        if target not in self.TARGETS:
            raise ValueError(f"target must be one of {self.TARGETS}, got {target!r}")
        self.dataset = dataset
        self.transform = transform
        self.target = target
        self.num_classes = int(num_classes if num_classes is not None else getattr(dataset, "num_classes", 0))
        if target == "multi" and self.num_classes <= 0:
            raise ValueError("target='multi' needs the number of classes (dataset.num_classes or num_classes=)")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        image = sample.load_image()
        x = self.transform(image) if self.transform is not None else image
        if self.target == "single":
            label: Any = int(sample.label)
        elif self.target == "multi":
            label = torch.zeros(self.num_classes, dtype=torch.float32)
            if len(sample.labels):
                label[list(sample.labels)] = 1.0
        else:
            label = -1
        return {"image": x, "label": label, "index": int(index)}


class EpochDataLoader(DataLoader):
    """A DataLoader whose shuffling (and worker seeds) depend only on ``seed + epoch`` (see ``set_epoch``).

    Under ``distributed.data_parallel()`` with several ranks, rank r gets its slice of each of the batches one
    process would see (same order: the same sampler draws from the same generator), so the global batch and
    its samples do not depend on the number of processes.
    """

    def __init__(self, dataset, *, batch_size: int = 1, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, **kwargs) -> None:
        from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

        from .distributed import RankBatches, training_world

        generator = torch.Generator()
        world = training_world()
        if world.parallel:
            if batch_size < world.size:
                raise ValueError(f"a batch of {batch_size} cannot be split over {world.size} processes; raise "
                                 f"the training batch size to at least {world.size}")
            order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            batches = RankBatches(BatchSampler(order, batch_size, drop_last), world.rank, world.size)
            super().__init__(dataset, batch_sampler=batches, generator=generator, **kwargs)
        else:
            super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                             generator=generator, **kwargs)
        self.seed = int(seed)
        self.epoch = 0
        self.global_batch_size = int(batch_size)
        self.world_size = world.size

    def set_epoch(self, epoch: int) -> None:
        """Iterate in ``epoch``'s order from now on (idempotent: the same epoch always gives the same order)."""
        self.epoch = int(epoch)

    def __iter__(self):
        # seeded per iterator, not per set_epoch: every iterator draws its base seed from the generator, so an
        # iterator made and dropped first (tqdm.auto's bar does that) must not shift the one that is used
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def make_loader(dataset, transform, *, batch_size: int, shuffle: bool, seed: int = 0, target: str = "single",
                drop_last: bool = False, epoch: int = 0, num_workers: int = 0,
                num_classes: int | None = None, pin_memory: bool = False) -> EpochDataLoader:
    """A deterministic loader over a ``WSOLDataset`` (or an already-wrapped torch Dataset).

    The sample order of epoch e depends only on ``seed + e``; build one per epoch (``epoch=e``) or call
    ``loader.set_epoch(e)`` (``TrainLoop`` does so when the loader has it). ``batch_size`` is the global batch:
    under ``distributed.data_parallel()`` each rank loads its share of it.
    """
    ds = dataset if isinstance(dataset, Dataset) else SampleImageDataset(dataset, transform, target, num_classes)
    loader = EpochDataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                             num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                             persistent_workers=False)
    loader.set_epoch(epoch)
    return loader


# ---- the loop -----------------------------------------------------------------------------------------
@dataclass
class TrainLoop:
    """Epoch loop with checkpoint/resume; see the module docstring.

    ``scheduler_interval``: ``"epoch"`` (scheduler.step() after each epoch) or ``"step"`` (after each
    optimizer step). ``max_steps_per_epoch`` caps the batches per epoch (smoke tests).
    ``on_epoch_end(epoch, record)`` may add entries (e.g. validation numbers) to the epoch's record; the
    random draws it makes do not reach the training's (the RNG state is restored after it).
    """

    out_dir: Path | None
    epochs: int
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    progress: bool = True
    desc: str = "train"
    grad_clip: float | None = None
    scheduler_interval: str = "epoch"
    max_steps_per_epoch: int | None = None
    on_epoch_end: Callable[[int, dict], None] | None = None
    history: list[dict] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {self.scheduler_interval!r}")
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_NAME

    # -- persistence --
    def state(self, epochs_done: int) -> dict:
        return {
            "format": _FORMAT,
            "epoch": int(epochs_done),
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": get_rng_state(),
            "history": json.loads(json.dumps(self.history)),  # plain Python numbers only
        }

    def save_checkpoint(self, epochs_done: int) -> Path | None:
        """Write the checkpoint atomically (rank 0 only when data-parallel; every rank waits until it is on disk)."""
        path = self.checkpoint_path
        if path is None:
            return None
        from .distributed import barrier, gather_from_ranks, training_world

        world = training_world()
        rank_rng = gather_from_ranks(get_rng_state()) if world.parallel else None  # a collective: every rank
        if world.is_main:
            state = self.state(epochs_done)
            if rank_rng is not None:  # each rank's augmentation stream, for an exact resume
                state["rng_ranks"] = rank_rng
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            write_json(self.out_dir / HISTORY_NAME, self.history)
        if world.parallel:
            barrier()
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> int:
        """Restore everything from ``path`` (default: out_dir/last.pt); returns the finished epoch count."""
        path = Path(path) if path is not None else self.checkpoint_path
        ckpt = load_checkpoint(path)
        missing = set(self.modules) - set(ckpt["modules"])
        if missing:
            raise ValueError(f"{path}: checkpoint has no state for module(s) {sorted(missing)} "
                             f"(it has {sorted(ckpt['modules'])})")
        for name, module in self.modules.items():
            module.load_state_dict(ckpt["modules"][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        world = self._world
        ranks = ckpt.get("rng_ranks")
        set_rng_state(ranks[world.rank] if world.parallel and ranks and len(ranks) == world.size else ckpt["rng"])
        self.history = list(ckpt.get("history", []))
        return int(ckpt["epoch"])

    # -- training --
    def run(self, make_epoch_loader: Callable[[int], Iterable], step: Callable[[Any], dict],
            resume: bool = False) -> list[dict]:
        """Train epochs [start, epochs); returns the per-epoch records (mean of each named loss, lr, time)."""
        start = 0
        self.history = []
        path = self.checkpoint_path
        if resume and path is not None and path.exists():
            start = self.load_checkpoint(path)
            log.info("resuming %s from %s after epoch %d", self.desc, path, start)
        elif resume:
            log.info("resume requested but no checkpoint at %s; training from scratch", path)
        if self._world.parallel:  # every rank starts from rank 0's weights, as DDP does at construction
            from .distributed import broadcast_from_main

            broadcast_from_main(t for m in self.modules.values() for t in (*m.parameters(), *m.buffers()))
        for epoch in range(start, self.epochs):
            record = self._run_epoch(epoch, make_epoch_loader(epoch), step)
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            if self.on_epoch_end is not None:  # validation and diagnostics: never a shift of the training's
                rng = get_rng_state()             # random streams (a lazily built model draws its init from them)
                self.on_epoch_end(epoch, record)
                set_rng_state(rng)
            self.history.append(record)
            self.save_checkpoint(epoch + 1)
        return list(self.history)

    def _run_epoch(self, epoch: int, loader: Iterable, step: Callable[[Any], dict]) -> dict:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for m in self.modules.values():
            m.train()
        sums: dict[str, float] = {}
        count = 0
        t0 = time.time()
        total = None
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        if self.max_steps_per_epoch is not None and total is not None:
            total = min(total, self.max_steps_per_epoch)
        world = self._world
        bar = _progress(loader, total=total, desc=f"{self.desc} {epoch + 1}/{self.epochs}",
                        enabled=self.progress and world.is_main)
        if world.parallel:
            from .distributed import average_gradients, broadcast_from_main, sum_over_ranks
        try:
            for i, batch in enumerate(bar):
                if self.max_steps_per_epoch is not None and i >= self.max_steps_per_epoch:
                    break
                self.optimizer.zero_grad(set_to_none=True)
                if world.parallel:  # rank 0's buffers (BN statistics) before each forward, as DDP does
                    broadcast_from_main(b for m in self.modules.values() for b in m.buffers())
                losses = step(batch)
                if "loss" not in losses:
                    raise KeyError(f"the step function must return a dict with a 'loss' entry, got {list(losses)}")
                loss = losses["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise FloatingPointError(f"{self.desc}: non-finite loss {loss.item()} at epoch {epoch + 1}, "
                                             f"step {i + 1}; lower the learning rate or check the inputs")
                loss.backward()
                if world.parallel:
                    average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
                if self.grad_clip is not None:
                    params = [p for group in self.optimizer.param_groups for p in group["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                self.optimizer.step()
                if self.scheduler is not None and self.scheduler_interval == "step":
                    self.scheduler.step()
                count += 1
                for k, v in losses.items():
                    value = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
                    sums[k] = sums.get(k, 0.0) + value
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
        finally:
            if hasattr(bar, "close"):
                bar.close()
        if count == 0:
            raise ValueError(f"{self.desc}: epoch {epoch + 1} saw no batches (empty dataset or drop_last with "
                             "fewer samples than one batch)")
        terms = count
        if world.parallel:  # the epoch's means over the global batches (the mean of the ranks' means)
            sums, terms = sum_over_ranks(sums, count)
        record = {"epoch": epoch + 1, **{k: v / terms for k, v in sums.items()}, "steps": count,
                  "lr": float(self.optimizer.param_groups[0]["lr"]), "time_s": round(time.time() - t0, 3)}
        if world.parallel:
            record.update(world_size=world.size, global_batch=getattr(loader, "global_batch_size", None))
        return record

    @property
    def _world(self):
        from .distributed import training_world

        return training_world()


def load_checkpoint(path: str | Path) -> dict:
    """Read a ``TrainLoop`` checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a wsolbench training checkpoint (format {_FORMAT})")
    return ckpt


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    # hand tqdm an iterator: given an iterable, tqdm.auto's bar makes an extra iterator up front (for a
    # DataLoader with workers, a second set of worker processes)
    return tqdm(iter(iterable), total=total, desc=desc, leave=False, dynamic_ncols=True)


def mean_losses(history: Sequence[dict], key: str = "loss") -> list[float]:
    """The per-epoch mean of ``key`` from a history list (convenience for tests and reports)."""
    return [float(r[key]) for r in history if key in r and not math.isnan(float(r[key]))]
