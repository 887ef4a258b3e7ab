"""The registered CAM localizer: builds a ``CAMNet`` (model.py) from the resolved config, trains it
(train.py), loads ImageNet / saved / wsolevaluation weights (loading.py) and returns raw CAMs (or Grad-CAMs).

A CAM of class c is the classifier-weighted sum ``Σ_d W[c, d] · f[d]`` of the last conv features ``f``
(raw, bias-free, at the feature resolution — the harness normalises and resizes maps the one documented way).
``variant: gradcam`` takes Grad-CAM at ``gradcam_layer`` instead (on the CAM layer it equals ReLU(CAM)/hw).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from wsolbench.config import ConfigError
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method

from .loading import (imagenet_weights_file, load_imagenet, load_saved_backbone, read_wsolevaluation_checkpoint,
                      wsolevaluation_to_camnet)
from .model import CAMNet, build_cam_net

VARIANTS = ("cam", "gradcam")


@register_method("cam")
class CAM(Localizer):
    """CAM / Grad-CAM localizer; see the package docstring. Config: ``configs/cam*.yaml``."""

    capabilities = frozenset({Capability.SINGLE, Capability.MULTI})
    pretrained = ("vgg16", "resnet50", "inception-v3")  # loading.IMAGENET_WEIGHTS: one per paper backbone
    needs_training = True
    data_parallel_fit = True  # fit goes through wsolbench.training.TrainLoop + make_loader

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        super().__init__(config, class_names, device)
        cfg = self.config
        self.backbone_name = str(cfg["backbone"]).lower()  # checked by build_cam_net
        self.variant = str(cfg["variant"]).lower()
        if self.variant not in VARIANTS:
            raise ValueError(f"cam variant must be one of {VARIANTS}, got {self.variant!r}")
        self.input_size = int(cfg["input_size"])
        self.model = self._build(self._num_classes())
        self._set_capabilities()

    def _set_capabilities(self) -> None:
        """A single-label classifier (trained with CE, or a wsolevaluation checkpoint) answers ``classes=None``
        with its top-1 class, so this instance cannot serve ``multi`` (a map for every class present)."""
        self.capabilities = type(self).capabilities if self.multi_label else frozenset({Capability.SINGLE})

    # -- construction --
    def _num_classes(self) -> int:
        """The class count known so far (class names, else config key ``num_classes``); 1 until fit() knows."""
        n = len(self.class_names) or self.config["num_classes"]
        return int(n) if n else 1

    def _build(self, num_classes: int) -> CAMNet:
        with torch.random.fork_rng(devices=[]):  # deterministic init that leaves the global RNG alone
            torch.manual_seed(int(self.config["train"]["seed"]))
            net = build_cam_net(self.config, num_classes)
        return net.to(self.device).eval()

    @property
    def num_classes(self) -> int:
        return int(self.model.fc.out_features)

    @property
    def multi_label(self) -> bool:
        return bool(self.config["multi_label"])  # null (never trained) reads as single-label

    @classmethod
    def load_foreign(cls, path: str | Path, config: dict | None = None, class_names: Sequence[str] | None = None,
                     device: str = "cpu") -> "CAM":
        """A CAM from a trained wsolevaluation checkpoint (``wsolbench run --checkpoint FILE``): the config
        gives what the file does not store (``large_feature_map``), its ``backbone`` must be the file's."""
        from wsolbench.checkpoint import CheckpointError, load_exact, partial_names

        cfg = cls.complete_config(config)
        backbone, state = read_wsolevaluation_checkpoint(path)
        if str(cfg["backbone"]).lower() != backbone:
            raise CheckpointError(f"{path} holds a wsolevaluation {backbone} but the config's backbone is "
                                  f"{cfg['backbone']!r}; use --set backbone={backbone} (and the "
                                  f"large_feature_map it was trained with)")
        large = bool(cfg["large_feature_map"])
        mapped = wsolevaluation_to_camnet(state, backbone, large)
        sizes = [int(mapped[k].shape[0]) for k in ("fc.weight", "fc.bias") if k in mapped]
        num_classes = sizes[0] if sizes else len(class_names or [])
        if class_names and len(class_names) != num_classes:
            raise CheckpointError(f"{path} classifies {num_classes} classes but the dataset has {len(class_names)}")
        cfg.update(num_classes=num_classes, multi_label=False)  # wsolevaluation trains single-label CE
        method = cls(cfg, class_names=class_names, device=device)
        method.load_report = load_exact(method.model, {k: v.to(device) for k, v in mapped.items()},
                                        partial=partial_names(cfg), layout=f"wsolevaluation-{backbone}",
                                        where=f"{path} (read as a wsolevaluation {backbone} CAM with "
                                              f"large_feature_map={str(large).lower()})")
        method.model.eval()
        return method

    # -- training --
    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        from .train import train_cam, training_loss

        t = self.config["train"]
        loss_name = training_loss(t, train_data)
        names = list(getattr(train_data, "class_names", []) or [])
        if self.class_names and names and names != self.class_names:
            raise ValueError("the training data's class names differ from the method's class names")
        if not self.class_names:
            self.class_names = names
        self.config["multi_label"] = loss_name == "mlsm"
        self._set_capabilities()
        self.config["num_classes"] = len(self.class_names)
        if self.num_classes != len(self.class_names):
            self.model = self._build(len(self.class_names))

        out = Path(out_dir) if out_dir is not None else None
        ckpt_exists = out is not None and (out / "last.pt").exists()
        loaded_from = None if resume and ckpt_exists else self._load_start_weights()
        history = train_cam(self.model, train_data, t, loss_name=loss_name, backbone=self.backbone_name,
                            num_classes=len(self.class_names), mean=self.mean, std=self.std, device=self.device,
                            out=out, resume=resume, progress=progress)
        result = {"history": history, "epochs": int(t["epochs"]), "loss": loss_name, "pretrained": loaded_from,
                  "final_loss": history[-1]["loss"] if history else None}
        if out is not None:
            result["out_dir"] = str(out)
        return result

    def _load_start_weights(self) -> str | None:
        """Load what training starts from: ``finetune_from`` (a saved wsolbench CAM directory: backbone and
        head) or ``pretrained`` (ImageNet weights); returns the file read, or None."""
        pretrained, finetune = self.config["pretrained"], self.config["finetune_from"]
        if finetune:
            if pretrained:
                raise ConfigError(f"config keys 'pretrained' ({pretrained}) and 'finetune_from' ({finetune}) both set: "
                                  "finetune_from replaces the ImageNet start; set pretrained=null")
            saved = Path(str(finetune)).expanduser() / "model.safetensors"
            if not saved.is_file():
                raise FileNotFoundError(f"config key 'finetune_from': {saved} not found; it must be a directory "
                                        "written by Localizer.save (a wsolbench run's checkpoint/ folder)")
            load_saved_backbone(self.model, saved)
            return str(saved)
        if not pretrained:
            return None
        path = imagenet_weights_file(self.backbone_name, pretrained)
        load_imagenet(self.model, self.backbone_name, path, classifier=bool(self.config["pretrained_classifier"]))
        return str(path)

    # -- inference --
    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        if texts is not None:
            self.require(Capability.PHRASE)
        x = self.preprocess(images)
        b = x.shape[0]
        queries = self.class_queries(classes, b)
        c = self.num_classes
        if queries is not None:
            bad = sorted({q for qs in queries for q in qs if not 0 <= q < c})
            if bad:
                raise InputError(f"class indices {bad} out of range for a CAM model with {c} classes")
        self.model.eval()
        chunk = max(1, int(self.config["eval"]["batch_size"]))
        maps, logits, out_classes = [], [], []
        for s in range(0, b, chunk):
            q = None if queries is None else queries[s:s + chunk]
            m, lg, qq = self._localize_batch(x[s:s + chunk], q)
            maps.append(m)
            logits.append(lg)
            out_classes += qq
        return LocalizerOutput(maps=torch.cat(maps).float().cpu(), logits=torch.cat(logits).float().cpu(),
                               classes=out_classes)

    def _localize_batch(self, x: torch.Tensor, queries: list[list[int]] | None):
        net = self.model
        if self.variant == "cam":
            with torch.no_grad():
                logits, feats = net.forward_with_features(x)
        else:
            with torch.no_grad():
                logits = net(x)
        if queries is None:
            if self.multi_label:
                queries = [list(range(self.num_classes))] * x.shape[0]
            else:
                queries = [[int(i)] for i in logits.argmax(1).tolist()]
        idx = torch.as_tensor(queries, dtype=torch.long, device=logits.device)
        if self.variant == "cam":
            maps = net.cams(feats, idx)
        else:
            from wsolbench.maps.gradcam import grad_cam

            layer = self.config["gradcam_layer"] or "cam_layer"  # null: the CAM layer
            maps, _ = grad_cam(net, layer, x, targets=queries)
        return maps.detach(), logits.detach(), [list(q) for q in queries]

    def __repr__(self) -> str:
        return (f"CAM(backbone={self.backbone_name!r}, variant={self.variant!r}, classes={self.num_classes}, "
                f"multi_label={self.multi_label})")
