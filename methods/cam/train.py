"""CAM training: the loss (cross-entropy, or multi-label soft margin for VOC/COCO), SGD/AdamW with a higher
learning rate on the new layers (wsolevaluation's ``lr_classifier_ratio``), step or poly schedule, run by
``wsolbench.training.TrainLoop`` (checkpoint each epoch, resume, progress bar). Reads the ``train`` section
of a resolved config (``configs/cam.yaml``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .model import CAMNet

LOSSES = ("ce", "mlsm")
# parameter-name prefixes trained with lr × lr_classifier_mult where train.classifier_prefixes is null
# (wsolevaluation main.py: for ResNet50 layer4 counts as "classifier"; for VGG16/InceptionV3 every
# non-pretrained layer does)
CLASSIFIER_PREFIXES = {
    "vgg16": ("head.", "fc."),
    "resnet50": ("backbone.layer4.", "head.", "fc."),
    "inceptionv3": ("head.", "fc."),
    "tiny": ("head.", "fc."),
}


def training_loss(t: dict, data: Any) -> str:
    """``ce`` or ``mlsm``: ``train.loss``, where ``auto`` follows the data (multi-label → soft margin)."""
    multi_label_data = bool(getattr(data, "multi_label", False))
    name = str(t["loss"]).lower()
    if name == "auto":
        name = "mlsm" if multi_label_data else "ce"
    if name not in LOSSES:
        raise ValueError(f"train.loss must be auto, ce or mlsm, got {name!r}")
    if name == "ce" and multi_label_data:
        raise ValueError(f"{data!r} is multi-label; cross-entropy needs one label per image "
                         "(use train.loss: mlsm or auto)")
    return name


def make_optimizer(net: CAMNet, t: dict, backbone: str) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters, the new layers at ``lr × lr_classifier_mult``."""
    prefixes = tuple(t["classifier_prefixes"] or CLASSIFIER_PREFIXES[backbone])
    lr = float(t["lr"])
    mult = float(t["lr_classifier_mult"])
    feats, cls = [], []
    for n, p in net.named_parameters():
        if p.requires_grad:
            (cls if n.startswith(prefixes) else feats).append(p)
    groups = [g for g in ({"params": feats, "lr": lr}, {"params": cls, "lr": lr * mult}) if g["params"]]
    momentum = float(t["momentum"])
    opt_name = str(t["optimizer"]).lower()
    if opt_name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=float(t["weight_decay"]),
                               nesterov=bool(t["nesterov"]) and momentum > 0)
    if opt_name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=float(t["weight_decay"]))
    raise ValueError(f"train.optimizer must be sgd or adamw, got {opt_name!r}")


def make_scheduler(t: dict, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    """(scheduler or None, ``"epoch"`` | ``"step"``: when it steps) for ``train.lr_schedule``."""
    kind = str(t["lr_schedule"]).lower()
    if kind == "step":
        every = max(1, int(t["lr_decay_every"]))
        gamma = float(t["lr_decay_gamma"])
        # wsolevaluation decays before epoch e (1-based) when e % every == 0; LambdaLR gets the 0-based index
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: gamma ** ((e + 1) // every)), "epoch"
    if kind == "poly":
        total = max(1, epochs * steps_per_epoch)
        power = float(t["poly_power"])
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: max(0.0, 1.0 - min(s, total) / total) ** power), "step"
    if kind in ("constant", "none"):
        return None, "epoch"
    raise ValueError(f"train.lr_schedule must be step, poly or constant, got {kind!r}")


def train_cam(net: CAMNet, train_data: Any, t: dict, *, loss_name: str, backbone: str, num_classes: int,
              mean, std, device: str, out: Path | None, resume: bool, progress: bool) -> list[dict]:
    """Train ``net`` in place with the ``train`` settings ``t``; returns the per-epoch history."""
    from wsolbench.training import TrainLoop, make_loader, seed_everything, train_transform

    net.freeze_bn = bool(t["freeze_bn"])
    frozen = tuple(t["frozen_prefixes"] or ())
    for n, p in net.named_parameters():
        p.requires_grad_(not n.startswith(frozen) if frozen else True)
    optimizer = make_optimizer(net, t, backbone)
    epochs = int(t["epochs"])
    batch_size = int(t["batch_size"])
    steps_per_epoch = len(train_data) // batch_size if t["drop_last"] else -(-len(train_data) // batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_data)} training images are fewer than one batch of {batch_size}")
    if t["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, int(t["max_steps_per_epoch"]))
    scheduler, interval = make_scheduler(t, optimizer, epochs, steps_per_epoch)

    seed = int(t["seed"])
    seed_everything(seed)
    tf = train_transform(int(t["resize_size"]), int(t["crop_size"]), mean, std, flip=bool(t["flip"]),
                         scale=t["scale"], color_jitter=t["color_jitter"], hue=t["hue"],
                         grayscale_p=t["grayscale_p"])
    target = "multi" if loss_name == "mlsm" else "single"
    dev = torch.device(device)

    def loaders(epoch: int):
        return make_loader(train_data, tf, batch_size=batch_size, shuffle=True, seed=seed, target=target,
                           drop_last=bool(t["drop_last"]), epoch=epoch, num_workers=int(t["num_workers"]),
                           num_classes=num_classes, pin_memory=dev.type == "cuda")

    def step(batch):
        x = batch["image"].to(dev, non_blocking=True)
        y = batch["label"].to(dev, non_blocking=True)
        logits = net(x)
        if loss_name == "mlsm":
            loss = F.multilabel_soft_margin_loss(logits, y)
            acc = ((logits > 0).float() == y).float().mean()
        else:
            loss = F.cross_entropy(logits, y)
            acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    loop = TrainLoop(out, epochs=epochs, modules={"model": net}, optimizer=optimizer, scheduler=scheduler,
                     progress=progress, desc=f"cam-{backbone}", grad_clip=t["grad_clip"],
                     scheduler_interval=interval, max_steps_per_epoch=t["max_steps_per_epoch"])
    history = loop.run(loaders, step, resume=resume)
    net.eval()
    return history
