"""The shared training infrastructure: datasets, deterministic loaders, checkpoint/resume of TrainLoop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wsolbench.datasets.base import Sample, WSOLDataset
from wsolbench.training import (SampleImageDataset, TrainLoop, eval_transform, load_checkpoint, make_loader,
                                seed_everything, train_transform)


class _TinyDataset(WSOLDataset):
    """Solid-colour images whose class is the colour; written once into a tmp dir."""

    def __init__(self, root: Path, n: int = 12, multi: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.split = root, "train"
        self.class_names = ["red", "green", "blue"]
        self.multi_label = multi
        self.samples = []
        for i in range(n):
            c = i % 3
            arr = np.full((20, 24, 3), 30, np.uint8)
            arr[..., c] = 220
            path = root / f"{i}.png"
            Image.fromarray(arr).save(path)
            labels = (c, (c + 1) % 3) if multi else (c,)
            self.samples.append(Sample(image_id=str(i), image_path=path, size=(24, 20), labels=labels))


def test_sample_dataset_targets(tmp_path):
    ds = _TinyDataset(tmp_path / "a", n=3, multi=True)
    single = SampleImageDataset(_TinyDataset(tmp_path / "b", n=3), eval_transform(16), target="single")
    item = single[1]
    assert item["image"].shape == (3, 16, 16) and item["label"] == 1 and item["index"] == 1
    multi = SampleImageDataset(ds, eval_transform(16), target="multi")
    assert multi[2]["label"].tolist() == [1.0, 0.0, 1.0]
    assert SampleImageDataset(ds, eval_transform(16), target="none")[0]["label"] == -1
    x = train_transform(20, 16)(ds[0].load_image())
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_loader_order_depends_only_on_seed_and_epoch(tmp_path):
    ds = _TinyDataset(tmp_path, n=12)
    tf = eval_transform(8)

    def order(epoch, seed=0):
        return [int(i) for b in make_loader(ds, tf, batch_size=4, shuffle=True, seed=seed, epoch=epoch)
                for i in b["index"]]

    torch.manual_seed(123)
    a = order(1)
    torch.manual_seed(999)  # the global RNG must not matter
    assert order(1) == a
    assert order(2) != a and sorted(order(2)) == list(range(12))
    loader = make_loader(ds, tf, batch_size=4, shuffle=True, seed=0)
    loader.set_epoch(1)
    assert [int(i) for b in loader for i in b["index"]] == a


def _setup(tmp_path, out):
    seed_everything(0)
    ds = _TinyDataset(tmp_path / "data", n=12)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loop = TrainLoop(out, epochs=4, modules={"net": net}, optimizer=opt, scheduler=sched, progress=False)
    tf = train_transform(12, 10)  # random crops + flips draw from the global RNG

    def loaders(epoch):
        return make_loader(ds, tf, batch_size=4, shuffle=True, seed=7, epoch=epoch)

    def step(batch):
        logits = net(batch["image"])
        loss = nn.functional.cross_entropy(logits, batch["label"])
        return {"loss": loss, "acc": (logits.argmax(1) == batch["label"]).float().mean()}

    return net, loop, loaders, step


def test_loop_trains_checkpoints_and_resumes_identically(tmp_path):
    net, loop, loaders, step = _setup(tmp_path, tmp_path / "full")
    before = [p.detach().clone() for p in net.parameters()]
    hist = loop.run(loaders, step)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert json.loads((tmp_path / "full" / "history.json").read_text())[-1]["epoch"] == 4
    ckpt = load_checkpoint(tmp_path / "full" / "last.pt")  # weights_only=True
    assert ckpt["epoch"] == 4 and set(ckpt) >= {"modules", "optimizer", "scheduler", "rng"}
    full = {k: v.clone() for k, v in net.state_dict().items()}

    # interrupted after 2 epochs, then resumed with fresh objects
    net2, loop2, loaders2, step2 = _setup(tmp_path, tmp_path / "part")
    loop2.epochs = 2
    loop2.run(loaders2, step2)
    net3, loop3, loaders3, step3 = _setup(tmp_path, tmp_path / "part")
    torch.manual_seed(4242)  # resumed process starts from another RNG state: the checkpoint restores it
    hist3 = loop3.run(loaders3, step3, resume=True)
    assert [r["epoch"] for r in hist3] == [1, 2, 3, 4]
    for k, v in net3.state_dict().items():
        assert torch.equal(v, full[k]), k
    assert hist3[-1]["loss"] == pytest.approx(hist[-1]["loss"])
    # resuming a finished run trains nothing and returns the history
    assert len(loop3.run(loaders3, step3, resume=True)) == 4


def test_what_an_epoch_end_hook_draws_does_not_change_the_training(tmp_path):
    """Validation runs between epochs (TeD-Loc's built CLIP there, its init drawing from the global RNG, and
    changed what was trained): a hook's random draws leave the weights as a quiet hook does."""
    import random

    weights = []
    for draws in (False, True):
        net, loop, loaders, step = _setup(tmp_path, tmp_path / f"hook-{draws}")

        def hook(epoch, record, draws=draws):
            if draws:
                torch.rand(5), np.random.rand(5), random.random()
                nn.Linear(8, 8)  # a model built lazily inside the hook
            record["val"] = float(epoch)

        loop.on_epoch_end = hook
        hist = loop.run(loaders, step)
        assert [r["val"] for r in hist] == [0.0, 1.0, 2.0, 3.0]
        weights.append({k: v.clone() for k, v in net.state_dict().items()})
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_loop_errors_are_explicit(tmp_path):
    net, loop, loaders, _ = _setup(tmp_path, None)
    loop.epochs = 1
    with pytest.raises(KeyError, match="'loss'"):
        loop.run(loaders, lambda b: {"total": net(b["image"]).sum()})
    with pytest.raises(FloatingPointError, match="non-finite"):
        loop.run(loaders, lambda b: {"loss": net(b["image"]).sum() * float("nan")})


def test_progress_bar_does_not_change_the_training_data(tmp_path):
    """tqdm.auto makes an extra iterator up front; that used to shift the sample order and the augmentation
    draws, so a run with progress bars trained other weights than the same run with --quiet."""
    from wsolbench.training import _progress

    ds = _TinyDataset(tmp_path, n=12)
    tf = train_transform(12, 8, flip=True, scale=(0.5, 1.0))

    def batches(progress):
        torch.manual_seed(0)
        loader = make_loader(ds, tf, batch_size=4, shuffle=True, seed=3)
        return [(b["index"].tolist(), float(b["image"].sum())) for b in _progress(loader, 3, "t", progress)]

    assert batches(True) == batches(False)
    loader = make_loader(ds, tf, batch_size=4, shuffle=True, seed=3)
    iter(loader)  # an iterator made and dropped
    assert [b["index"].tolist() for b in loader] == [b[0] for b in batches(False)]
