"""WWbL's training: the losses of a batch through the frozen CLIP, ``fit`` (SGD, optional precise BN, model
selection by validation pointing accuracy, resumable) and the best-epoch keeper."""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import TextImageDataset
from .losses import wwbl_losses
from .model import load_backbone_weights

log = logging.getLogger(__name__)


class TrainingMixin:
    """Training of a ``WWbL`` (the host provides ``config``, ``mode``, ``device``, ``model`` = g, ``clip``,
    ``class_text``, ``g_maps``, ``_g_input`` and ``_images01``)."""

    def losses(self, images01: torch.Tensor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The WWbL losses for a batch of [0, 1] images and their (already prefixed) texts."""
        cfg = self.config
        z_t = self.clip.encode_text(list(texts))
        size = tuple(images01.shape[-2:])
        x = self._g_input(images01)
        m = self.model(x, None, size) if self.mode == "wsol" else self.model(x, z_t, size)
        r = self.clip.relevancy(images01, z_t, cfg["relevancy"]["mode"], size).to(m.dtype)
        mc = F.interpolate(m, size=self.clip.size, mode="bilinear", align_corners=True)
        cin = self.clip.prepare(images01)  # masked in CLIP's normalised space (0 = the mean colour), as the code
        z_fg = self.clip.encode_image(cin * mc)
        z_bg = self.clip.encode_image(cin * (1.0 - mc))
        variant = cfg["loss"]["variant"]
        out = wwbl_losses(m, r, z_fg, z_bg, z_t, variant, cfg["loss"]["weights"][variant])
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}

    def _texts_fn(self) -> Callable[[Any], list[str]]:
        """A sample's training texts (``text.train_source``): its captions, else its phrases, else its class text."""
        t = self.config["text"]

        def texts_of(s) -> list[str]:
            if self.mode == "grounding" and t["train_source"] in ("captions", "auto"):
                if getattr(s, "captions", ()):
                    return list(s.captions)
                if getattr(s, "phrases", ()):
                    return [p.text for p in s.phrases]
                if t["train_source"] == "captions":
                    raise ValueError(f"{s.image_id}: no captions to train on (text.train_source: captions)")
            label = int(s.labels[0]) if len(getattr(s, "labels", ())) else -1
            return [self.class_text(label)]

        return texts_of

    def load_pretrained(self) -> list[str]:
        """Copy the pretrained backbone weights into g's encoder (``model.load_backbone_weights``)."""
        return load_backbone_weights(self.model, self.config)

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        """Train g on ``train_data`` with the ``train`` group's recipe; keep the best epoch by validation pointing."""
        from wsolbench.training import TrainLoop, make_loader, seed_everything

        cfg = self.config
        t = cfg["train"]
        if cfg["official_checkpoint"]:
            log.info("WWbL: official checkpoint loaded; skipping training")
            return {"skipped": "official_checkpoint"}
        seed_everything(int(t["seed"]))
        if not (resume and out_dir is not None and (Path(out_dir) / "last.pt").exists()):
            self.load_pretrained()
        size = int(t["size"])
        ds = TextImageDataset(list(train_data), self._texts_fn(), resize=int(t["resize"] or size),
                              crop=t["crop"], hflip=bool(t["hflip"]), word_keep_prob=float(t["word_keep_prob"]),
                              prefix=cfg["text"]["prefix_train"], seed=int(t["seed"]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=float(t["lr"]), momentum=float(t["momentum"]),
                              weight_decay=float(t["weight_decay"]))
        out = Path(out_dir) if out_dir is not None else None
        best = _BestKeeper(out, self.model)
        if resume:
            best.restore()
        val_samples = list(val_data)[: t["val_limit"]] if (val_data is not None and t["val_limit"] != 0) else []

        calib = t["bn_recalibration_batches"]  # 0 or null: off

        def on_epoch_end(epoch: int, record: dict) -> None:
            if calib:
                self.recalibrate_bn(ds, calib, int(t["batch_size"]))
            if val_samples and t["select_by"] == "pointing":
                score = self.val_pointing(val_samples)
                record["val_pointing"] = score
                best.offer(score, epoch + 1)
            self.model.train()

        def loader(epoch: int):
            ds.set_epoch(epoch)
            return make_loader(ds, None, batch_size=int(t["batch_size"]), shuffle=True, seed=int(t["seed"]),
                               drop_last=len(ds) > int(t["batch_size"]), epoch=epoch,
                               num_workers=int(t["num_workers"]))

        def step(batch: dict) -> dict:
            return self.losses(batch["image"].to(self.device), batch["text"])

        loop = TrainLoop(out, epochs=int(t["epochs"]), modules={"g": self.model}, optimizer=opt,
                         progress=progress, desc="wwbl", max_steps_per_epoch=t["max_steps_per_epoch"],
                         on_epoch_end=on_epoch_end)
        history = loop.run(loader, step, resume=resume)
        self.model.eval()
        if best.best_state is not None:
            self.model.load_state_dict(best.best_state)
        return {"history": history, "best_epoch": best.best_epoch, "best_val_pointing": best.best_score}

    def recalibrate_bn(self, ds: TextImageDataset, num_batches: int, batch_size: int) -> None:
        """Re-estimate g's BatchNorm running statistics with the current weights ("precise BN"): a cumulative
        average over the first ``num_batches`` batches of a fixed, deterministic pass over the training data.
        Short trainings otherwise leave running statistics that lag the weights, and the 1-channel BN of the
        official head then zeroes the whole map in eval mode."""
        bns = [mod for mod in self.model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        fixed = copy.copy(ds)
        fixed.set_epoch(2**31 - 1)  # its own crops/captions, the same at every call
        momenta = [b.momentum for b in bns]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
        self.model.train()
        n = len(fixed)
        with torch.no_grad():
            for k in range(min(num_batches, math.ceil(n / batch_size))):
                items = [fixed[i] for i in range(k * batch_size, min(n, (k + 1) * batch_size))]
                x01 = torch.stack([it["image"] for it in items]).to(self.device)
                x = self._g_input(x01)
                if self.mode == "wsol":
                    self.model(x, None, tuple(x.shape[-2:]))
                else:
                    self.model(x, self.clip.encode_text([it["text"] for it in items]), tuple(x.shape[-2:]))
        for b, mom in zip(bns, momenta):
            b.momentum = mom

    def val_pointing(self, samples: Sequence[Any]) -> float:
        """Pointing accuracy (``wsolbench.metrics.PhrasePointing``: argmax of the map resized to the image,
        inside the union of the GT boxes, as the official ``inference_bbox``) on ``samples``: per (image, phrase with boxes) for phrase data, per image with its
        class text for box data. The model-selection criterion of the official code."""
        from wsolbench.metrics import PhrasePointing
        from wsolbench.metrics.pointing import union_box

        metric = PhrasePointing()
        self.model.eval()
        for s in samples:
            img = s.load_image()
            if getattr(s, "phrases", ()):
                queries = [(p.text, p.boxes) for p in s.phrases if len(p.boxes)]
            else:
                queries = [(self.class_text(int(s.labels[0]) if len(s.labels) else -1), s.boxes)]
            queries = [q for q in queries if len(q[1])]
            if not queries:
                continue
            x01 = self._images01([img])
            with torch.no_grad():
                maps = self.g_maps(x01.expand(len(queries), -1, -1, -1), [q[0] for q in queries])[:, 0]
            metric.update(list(maps.float().cpu().numpy()), [union_box(q[1]) for q in queries],
                          [img.size] * len(queries))
        return float(metric.compute()["pointing_acc"]) if metric.count else 0.0


class _BestKeeper:
    """Keeps the g weights of the best validation epoch (in memory and, with an out_dir, on disk, so a
    resumed run knows the best so far)."""

    def __init__(self, out_dir: Path | None, model: nn.Module) -> None:
        self.out_dir, self.model = out_dir, model
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def restore(self) -> None:
        if self.out_dir is None or not (self.out_dir / "best.json").exists():
            return
        from safetensors.torch import load_file

        meta = json.loads((self.out_dir / "best.json").read_text(encoding="utf-8"))
        self.best_score, self.best_epoch = float(meta["score"]), int(meta["epoch"])
        self.best_state = load_file(str(self.out_dir / "best.safetensors"))

    def offer(self, score: float, epoch: int) -> None:
        if self.best_score is not None and score <= self.best_score:
            return
        self.best_score, self.best_epoch = float(score), int(epoch)
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.out_dir is not None:
            from wsolbench.checkpoint import save_tensors
            from wsolbench.io import write_json

            save_tensors(self.best_state, self.out_dir / "best.safetensors")
            write_json(self.out_dir / "best.json", {"score": self.best_score, "epoch": self.best_epoch})
