"""MMCST's training pieces, as MCTformer's main.py/engine.py set them up where the paper is silent: the scaled
learning rate, optimizer and warm-up cosine schedule, the train/val transforms, and the val-mAP epoch selection."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .method import MMCST


def scaled_lr(train_cfg: Mapping) -> float:
    """``train.lr``, times batch/``lr_base_batch`` when that is set (MCTformer's main.py: lr × batch / 512)."""
    lr, base = float(train_cfg["lr"]), train_cfg["lr_base_batch"]
    return lr * int(train_cfg["batch_size"]) / float(base) if base else lr


def make_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: Mapping) -> torch.optim.Optimizer:
    """``train.optimizer`` (adam | adamw) at ``scaled_lr`` with ``train.weight_decay``."""
    lr, wd = scaled_lr(train_cfg), float(train_cfg["weight_decay"])
    name = str(train_cfg["optimizer"]).lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ValueError(f"train.optimizer must be 'adam' or 'adamw', got {name!r}")


def make_scheduler(opt: torch.optim.Optimizer, train_cfg: Mapping, steps_per_epoch: int):
    """Per-step LR schedule of ``train.scheduler``: none, or cosine from ``scaled_lr`` to ``train.min_lr`` after
    ``train.warmup_epochs`` of linear warm-up (MCTformer's timm cosine), over ``train.epochs``."""
    kind = str(train_cfg["scheduler"])
    if kind == "none":
        return None
    if kind != "cosine":
        raise ValueError(f"train.scheduler must be 'none' or 'cosine', got {kind!r}")
    total = int(train_cfg["epochs"]) * steps_per_epoch
    warmup = int(train_cfg["warmup_epochs"]) * steps_per_epoch
    lr, min_lr = scaled_lr(train_cfg), float(train_cfg["min_lr"])
    floor = min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_transform(train_cfg: Mapping, input_size: int, mean, std):
    """The training augmentation of ``train.augment``: ``mctformer`` (timm's RandAugment rand-m9-mstd0.5-inc1,
    colour jitter 0.4, random erasing 0.25, bicubic: MCTformer's build_transform) or ``simple`` (resize to
    ``train.resize_size``, random crop, flip)."""
    augment = train_cfg["augment"]
    if augment not in ("mctformer", "simple"):
        raise ValueError(f"train.augment must be 'mctformer' or 'simple', got {augment!r}")
    if augment == "mctformer":
        from timm.data import create_transform

        return zero_bit_posterize(create_transform(
            input_size=input_size, is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean=mean, std=std))
    from wsolbench.training import train_transform as simple_transform

    return simple_transform(int(train_cfg["resize_size"]), input_size, mean=mean, std=std, flip=True)


def _posterize(img, bits_to_keep, **_):
    """PIL posterize where 0 bits gives the black image Pillow < 13 gave (13 raises on it)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def zero_bit_posterize(transform):
    """``transform`` with its RandAugment posterize ops keeping 0 bits as a black image. rand-m9-mstd0.5-inc1
    draws magnitude 10 in ~2% of posterize calls, which keeps 4 - 10/10*4 = 0 bits: the black image MCTformer
    trained with (timm 0.3.2 on the Pillow of its day); with Pillow 13 those calls raise and stop training."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", ()):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def val_transform(size: int, mean, std):
    """MCTformer's val transform (datasets.build_transform): resize the shorter side to 256/224·S (bicubic),
    centre-crop S."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(256 / 224 * size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])


class ValMapSelection:
    """``train.select: val_map``: score val mAP after every epoch and keep the best epoch's weights (MCTformer's
    checkpoint_best.pth), on disk beside the training checkpoint so a resumed run still knows them."""

    FILE = "best_val_map.safetensors"

    def __init__(self, method: "MMCST", val_data: Any, out_dir: str | Path | None) -> None:
        if val_data is None:
            raise ValueError("train.select=val_map needs validation data (the dataset's val split); "
                             "use train.select=last without one")
        self.method, self.val_data = method, val_data
        self.path = Path(out_dir) / self.FILE if out_dir is not None else None
        self.best_state: dict[str, torch.Tensor] | None = None

    def epoch_end(self, epoch: int, record: dict, history: Sequence[dict]) -> None:
        from wsolbench.checkpoint import save_tensors
        from wsolbench.distributed import training_world

        record["val_map"] = self.method.val_map(self.val_data, int(self.method.tcfg["batch_size"]))
        if record["val_map"] > max((h.get("val_map", -1.0) for h in history), default=-1.0):
            self.best_state = {k: v.detach().to("cpu").clone() for k, v in self.method.model.state_dict().items()}
            if self.path is not None and training_world().is_main:
                save_tensors(self.best_state, self.path)

    def restore_best(self, history: Sequence[dict]) -> int:
        """Load the best epoch's weights; return that epoch (1-based)."""
        from wsolbench.checkpoint import load_tensors

        best = max(range(len(history)), key=lambda i: history[i].get("val_map", -1.0))
        state = load_tensors(self.path) if self.path is not None and self.path.exists() else self.best_state
        if state is None or "val_map" not in history[best]:
            raise ValueError("train.select=val_map: no epoch was scored on val (resumed from a run trained with "
                             "train.select=last?); train again without --resume, or use train.select=last")
        self.method.model.load_state_dict(state)
        return best + 1


def sample_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one image's class scores against its 0/1 labels, as scikit-learn's
    ``average_precision_score`` (Σ (R_n − R_{n−1}) P_n over the distinct scores, ties grouped), which MCTformer's
    ``compute_mAP`` applies per image."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(labels)[order] > 0
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last position of each run of equal scores
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
