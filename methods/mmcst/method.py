"""The registered MMCST ``Localizer``: builds ``MMCSTNet`` from the resolved config, trains it, loads official
checkpoints and generates its maps (the method's facts: the package docstring)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsolbench.checkpoint import CheckpointError
from wsolbench.classnames import class_text
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method

from .encoders import ClipEncoder, build_clip, build_vit, clip_dims
from .inference import mctformer_inputs, minmax, sum_passes
from .loading import adapt_vit_state_dict, mctformer_settings
from .losses import mmcst_losses
from .model import MMCSTNet
from .train import (ValMapSelection, make_optimizer, make_scheduler, sample_average_precision, train_transform,
                    val_transform)

log = logging.getLogger(__name__)

# VOC's compound class names read better to a text encoder as words (others: wsolbench.classnames.class_text)
PROMPT_NAMES = {"aeroplane": "aeroplane", "diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor", "motorbike": "motorbike"}


@register_method("mmcst")
class MMCST(Localizer):
    """MMCST (Xu et al., CVPR 2023); see the package docstring. Capabilities: ``multi`` and ``single``."""

    capabilities = frozenset({Capability.MULTI, Capability.SINGLE})
    needs_training = True
    data_parallel_fit = True  # fit goes through wsolbench.training.TrainLoop + make_loader
    tiny_zoo = ("vit", "clip")
    pretrained = ("vit-b16", "deit-s16", "deit-b16", "clip-vit-b16-openai")

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        super().__init__(config, class_names, device)
        if not self.class_names:
            raise ValueError("MMCST needs the dataset's class names (one class/text token per class)")
        cfg = self.config  # complete: the schema YAML's defaults filled in (Localizer.complete_config)
        self.mcfg, self.lcfg, self.tcfg, self.icfg = cfg["model"], cfg["loss"], cfg["train"], cfg["infer"]
        self.input_size = int(self.mcfg["input_size"])
        self._clip: ClipEncoder | None = None
        self._clip_pretrained = False
        vit = build_vit(self.mcfg["backbone"], self.input_size, pretrained=False)
        pcfg = getattr(vit, "pretrained_cfg", None) or {}  # timm's: the ViT's own normalisation
        self.mean = tuple(pcfg.get("mean", self.mean))
        self.std = tuple(pcfg.get("std", self.std))
        text_dim, clip_dim = clip_dims(self.mcfg)
        self.model = MMCSTNet(vit, len(self.class_names), text_dim, clip_dim,
                              **{k: self.mcfg[k] for k in MMCSTNet.CONFIG_KEYS}).to(device)
        available = {"mm", "attn"} | ({"t2p"} if self.model.use_text else set()) | \
            ({"c2p"} if self.model.use_c2p else set()) | ({"patchcam"} if self.model.use_patch_cam else set())
        for v in [self.icfg["map"]] + list(self.icfg["extras"]):
            if v not in available:
                raise ValueError(f"infer map {v!r} is not available with this model (model.text_tokens="
                                 f"{self.model.use_text}, model.class_patch={self.model.use_c2p}, model.patch_cam="
                                 f"{self.model.use_patch_cam}); choose from {sorted(available)}")
        if not self.icfg["scales"]:
            raise ValueError("infer.scales is empty: name at least one scale (1.0: the input size only)")
        resolution = str(self.icfg["resolution"])
        if resolution not in ("native", "square"):
            raise ValueError(f"infer.resolution must be 'native' or 'square', got {resolution!r}")
        self.maps_at_image_size = resolution == "native"
        if str(self.tcfg["select"]) not in ("last", "val_map"):
            raise ValueError(f"train.select must be 'last' or 'val_map', got {self.tcfg['select']!r}")
        ps = self.model.patch_size[0]
        if self.input_size % ps:
            raise ValueError(f"model.input_size {self.input_size} is not a multiple of the patch size {ps}")
        self._text_ready = False  # text_embed computed (fit/localize) or loaded
        self._trained = False

    # ---- CLIP text tokens ------------------------------------------------------------------------------
    def clip(self, pretrained: bool = True) -> ClipEncoder:
        """The frozen CLIP (built once; ``pretrained=False`` only to read its widths)."""
        if self._clip is not None and (self._clip_pretrained or not pretrained):
            return self._clip
        self._clip = build_clip(self.mcfg["clip"], pretrained).to(self.device)
        self._clip_pretrained = bool(pretrained)
        return self._clip

    def _prompts(self) -> list[str]:
        template = str(self.mcfg["prompt"])
        return [template.format(PROMPT_NAMES.get(n, class_text(n, synonyms="all"))) for n in self.class_names]

    def ensure_text_embeddings(self) -> None:
        """Fill ``text_embed`` with the CLIP text embeddings of the prompts (once; kept in checkpoints)."""
        if self._text_ready or not self.model.use_text:
            self._text_ready = True
            return
        emb = self.clip(pretrained=True).encode_text(self._prompts())
        if bool(self.mcfg["normalize_text"]):
            emb = F.normalize(emb, dim=-1)
        self.model.text_embed.copy_(emb.to(self.model.text_embed.device))
        self._text_ready = True

    # ---- persistence -----------------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        self._text_ready = True
        self._trained = True

    @classmethod
    def load_foreign(cls, path: str | Path, config: dict, class_names: Sequence[str] | None = None,
                     device: str = "cpu") -> "MMCST":
        """Build from ``config`` and load an MCTformer-V1 / -V2 / MCTformer+ ``{'model': state_dict}`` file, a
        plain ViT state dict or an MMCST one, exactly (``load_exact``): every model tensor must come from the
        file unless ``load.partial`` names it; ``load_report`` says what was loaded, dropped and reshaped."""
        from wsolbench.checkpoint import load_exact, load_tensors, partial_names

        method = cls.from_config(config, class_names=class_names, device=device)
        adapted = adapt_vit_state_dict(load_tensors(path, device="cpu"), method.model, where=str(path))
        try:
            method.load_report = load_exact(method.model, adapted.state, partial=partial_names(config), where=path,
                                            ignored=adapted.ignored, adapted=adapted.adapted, layout=adapted.layout)
        except CheckpointError as exc:
            hint = mctformer_settings(adapted)
            raise CheckpointError(f"{exc}. This is an {adapted.layout} file: --set {hint}" if hint else str(exc)) \
                from exc
        log.info(method.load_report.summary())
        method._text_ready = "text_embed" in method.load_report.loaded  # else computed with CLIP when needed
        method._trained = True
        method.model.eval()
        return method

    def _init_from_pretrained(self) -> None:
        """Initialise the transformer from the pretrained ViT (class token repeated C times, as MCTformer); every
        ViT tensor must load, and only the MMCST parts (``MMCSTNet.new_parts``) keep their initial values."""
        from wsolbench.checkpoint import load_exact

        backbone = self.mcfg["backbone"]
        vit = build_vit(backbone, self.input_size, pretrained=True)
        where = f"pretrained backbone {backbone['name']}"
        adapted = adapt_vit_state_dict(vit.state_dict(), self.model, where=where)
        load_exact(self.model, adapted.state, partial=self.model.new_parts(), where=where)

    # ---- training --------------------------------------------------------------------------------------
    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        from wsolbench.training import TrainLoop, make_loader, seed_everything

        t = self.tcfg
        seed_everything(int(t["seed"]))
        if not self._trained and bool(self.mcfg["backbone"]["pretrained"]):
            self._init_from_pretrained()
        self.ensure_text_embeddings()
        net = self.model
        use_contrast = net.use_text and float(self.lcfg["contrast"]) > 0
        clip = self.clip(pretrained=True) if use_contrast else None
        opt = make_optimizer([p for p in net.parameters() if p.requires_grad], t)
        epochs, bs, n = int(t["epochs"]), int(t["batch_size"]), len(train_data)
        drop_last = n >= 2 * bs  # the contrastive loss wants full batches; tiny sets keep every sample
        steps_per_epoch = max(1, (n // bs) if drop_last else math.ceil(n / bs))
        if t["max_steps_per_epoch"]:
            steps_per_epoch = min(steps_per_epoch, int(t["max_steps_per_epoch"]))
        sched = make_scheduler(opt, t, steps_per_epoch)
        transform = train_transform(t, self.input_size, self.mean, self.std)
        num_classes = len(self.class_names)
        dev = self.device

        def make_epoch_loader(epoch: int):
            return make_loader(train_data, transform, batch_size=bs, shuffle=True, seed=int(t["seed"]),
                               target="multi", drop_last=drop_last, epoch=epoch, num_workers=int(t["num_workers"]),
                               num_classes=num_classes)

        def step(batch):
            x = batch["image"].to(dev)
            y = batch["label"].to(dev)
            out = net(x)
            img = clip.encode_images(x, self.mean, self.std).to(dev) if clip is not None else None
            return mmcst_losses(net, out, y, img, self.lcfg)

        select = ValMapSelection(self, val_data, out_dir) if str(t["select"]) == "val_map" else None
        loop = TrainLoop(out_dir, epochs, {"model": net}, opt, sched, progress=progress, desc="mmcst",
                         grad_clip=t["grad_clip"], scheduler_interval="step",
                         max_steps_per_epoch=t["max_steps_per_epoch"],
                         on_epoch_end=None if select is None else lambda e, r: select.epoch_end(e, r, loop.history))
        history = loop.run(make_epoch_loader, step, resume=resume)
        result: dict[str, Any] = {"history": history}
        if select is not None:
            result["selected_epoch"] = select.restore_best(history)
        net.eval()
        self._trained = True
        return result

    @torch.no_grad()
    def val_map(self, data: Any, batch_size: int) -> float:
        """MCTformer's validation mAP (engine.evaluate): per image, the average precision of its sigmoid class
        scores against its labels (images without labels skipped), averaged, on MCTformer's val transform."""
        from wsolbench.training import make_loader

        loader = make_loader(data, val_transform(self.input_size, self.mean, self.std), batch_size=batch_size,
                             shuffle=False, target="multi", num_classes=len(self.class_names),
                             num_workers=int(self.tcfg["num_workers"]))
        was_training = self.model.training
        self.model.eval()
        aps = []
        for batch in loader:
            scores = self.model(batch["image"].to(self.device))["logits"].sigmoid().float().cpu().numpy()
            labels = batch["label"].numpy()
            aps += [sample_average_precision(y, p) for y, p in zip(labels, scores) if y.sum() > 0]
        self.model.train(was_training)
        if not aps:
            raise ValueError("val_map: no validation image has a label")
        return float(np.mean(aps))

    # ---- inference -------------------------------------------------------------------------------------
    @torch.no_grad()
    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        from wsolbench.imaging import as_image_list

        if texts is not None:
            self.require(Capability.PHRASE)
        imgs = as_image_list(images)
        b = len(imgs)
        queries = self.class_queries(classes, b)
        self.require(Capability.SINGLE if queries is not None else Capability.MULTI)
        c = len(self.class_names)
        if queries is not None and any(not 0 <= q < c for qs in queries for q in qs):
            raise InputError(f"class indices must be in [0, {c}), got {queries}")
        if not self._trained:
            log.warning("MMCST.localize on an untrained model: call fit() or load() first")
        self.ensure_text_embeddings()
        self.model.eval()
        i = self.icfg
        main = str(i["map"])
        extras = [str(e) for e in i["extras"]]
        variants = list(dict.fromkeys([main] + extras))
        scales = [float(x) for x in i["scales"]]
        flip = bool(i["flip"])
        if self.maps_at_image_size:  # each image at its own size (MCTformer)
            per_image = [sum_passes(self.model, *mctformer_inputs(im, scales, flip, self.mean, self.std), variants, i)
                         for im in imgs]
            sizes = sorted({tuple(m[main].shape[-2:]) for m, _ in per_image})
            if len(sizes) > 1:
                raise InputError(f"infer.resolution 'native' gives each image's maps at its own size; one localize "
                                 f"call got sizes {sizes}: pass images of one size (or one image) per call (in a run: "
                                 "--set harness.batch_size=1), or set infer.resolution=square")
            sums = {v: torch.cat([m[v] for m, _ in per_image]) for v in variants}
            logits = torch.cat([lg for _, lg in per_image])
        else:  # every image resized to input_size², scales at round(input_size·s) px (168, 280 for 224)
            s0 = self.input_size
            passes = []
            for scale in scales:
                x = self.preprocess(imgs, round(s0 * scale))
                passes += [(x, False)] + ([(x.flip(-1), True)] if flip else [])
            sums, logits = sum_passes(self.model, passes, (s0, s0), variants, i)
        normed = {v: minmax(m) for v, m in sums.items()}
        if queries is None:
            pick = lambda m: m  # noqa: E731
            qcls = [list(range(c))] * b
        else:
            idx = torch.tensor(queries, device=sums[main].device)
            pick = lambda m: torch.gather(m, 1, idx[:, :, None, None].expand(-1, -1, *m.shape[-2:]))  # noqa: E731
            qcls = queries
        return LocalizerOutput(maps=pick(normed[main]).float().cpu(), logits=logits.float().cpu(), classes=qcls,
                               extras={v: pick(normed[v]).float().cpu() for v in extras if v != main})
