"""CAM — Class Activation Mapping (Zhou et al., CVPR 2016), the WSOL baseline, plus an optional Grad-CAM variant.

A classifier whose last conv features ``f`` (B×D×h×w) go through global average pooling into a linear layer
``W`` (C×D); the CAM of class c is the classifier-weighted sum ``Σ_d W[c, d] · f[d]`` (raw, bias-free, at the
feature resolution — the harness normalises and resizes maps the one documented way).

Backbones (the WSOL-standard variants of wsolevaluation, Choe et al. CVPR 2020, ``wsol/{vgg,resnet,inception}.py``):

* ``vgg16``: conv1–conv5 with the last max-pool removed (14×14 at 224 px; 28×28 with ``large_feature_map``,
  which also drops pool4) + an extra 3×3 conv (512→1024, "conv6") + ReLU.
* ``resnet50``: layer4 with stride 1 (14×14); ``large_feature_map`` also sets layer3 to stride 1 (28×28).
  Same parameter names as torchvision, so ImageNet checkpoints load unchanged.
* ``inceptionv3``: Mixed_6a with stride 1 and the first conv padded (28×28 with ``large_feature_map``, else an
  extra max-pool → 14×14) + two 3×3 convs (768→1024→1024) with dropout 0.5, as in wsolevaluation, which feeds
  the ImageNet-normalised tensor straight to the first conv (``inception_input: imagenet``; ``pm1`` rescales to
  the [-1, 1] range the Google weights were trained with, torchvision's ``transform_input``).
* ``tiny``: a small BN-ReLU CNN trained from scratch (stride 8) for CPU demos and tests.

ImageNet weights (profile ``paper``) are loaded in ``fit`` (not when only rebuilding a trained model) through
``wsolbench.weights`` (a local path, WSOLBENCH_WEIGHTS or the torch hub cache; never downloaded); missing weights
raise ``MissingWeightsError`` naming the file, the places searched and the command that fetches it.
``pretrained_classifier: true`` also keeps the ImageNet ``fc`` (wsolevaluation does so for ResNet50 on ILSVRC);
``finetune_from: DIR`` starts instead from a saved wsolbench CAM's backbone and head.

Trained wsolevaluation checkpoints (``best_checkpoint.pth.tar``: ``architecture``, ``state_dict``) load through
``CAM.load_foreign`` (``wsolbench run --checkpoint FILE``): names are mapped to ``CAMNet``'s
(``wsolevaluation_to_camnet``) and loaded with ``wsolbench.checkpoint.load_exact`` (every tensor used and
present unless ``load.partial`` names it; the run records the ``LoadReport``). The checkpoint does not store
``large_feature_map``: the config must name it (the ``cam_<backbone>*.yaml`` recipes do).

Training: cross-entropy (single-label) or multi-label soft margin (VOC/COCO) — decided from
``train_data.multi_label`` unless ``train.loss`` says otherwise; SGD with a higher learning rate on the new
layers (``lr_classifier_mult``), step or poly schedule; through ``wsolbench.training.TrainLoop`` (checkpoint
each epoch, resume, progress bar).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsolbench.config import ConfigError
from wsolbench.localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput
from wsolbench.registry import register_method
from wsolbench.weights import MissingWeightsError  # noqa: F401  (re-exported: what fit() raises)

log = logging.getLogger(__name__)

BACKBONES = ("vgg16", "resnet50", "inceptionv3", "tiny")
VARIANTS = ("cam", "gradcam")
INCEPTION_INPUTS = ("imagenet", "pm1")  # what InceptionV3's first conv sees: wsolevaluation's | torchvision's
# names of the ImageNet checkpoints in the weights catalogue (wsolbench.weights: torchvision files
# vgg16-397923af.pth, resnet50-0676ba61.pth, inception_v3_google-0cc3c7bd.pth)
WEIGHT_NAMES = {"vgg16": "vgg16", "resnet50": "resnet50", "inceptionv3": "inception-v3"}
# parameter-name prefixes trained with lr × lr_classifier_mult (wsolevaluation main.py: for ResNet50 layer4
# counts as "classifier"; for VGG16/InceptionV3 every non-pretrained layer does)
DEFAULT_CLASSIFIER_PREFIXES = {
    "vgg16": ("head.", "fc."),
    "resnet50": ("backbone.layer4.", "head.", "fc."),
    "inceptionv3": ("head.", "fc."),
    "tiny": ("head.", "fc."),
}


# ----------------------------------------------------------------------------------------------- network
class CAMNet(nn.Module):
    """backbone → head (extra convs) → ``cam_layer`` (identity, the hook point) → GAP → ``fc``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feat_dim: int, num_classes: int,
                 fc_bias: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cam_layer = nn.Identity()
        self.fc = nn.Linear(feat_dim, num_classes, bias=fc_bias)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)
        self.freeze_bn = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.head(self.backbone(x)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.fc(f.mean(dim=(2, 3))), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def cams(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """B×K×h×w CAMs: ``Σ_d fc.weight[classes[b, k], d] · feats[b, d]`` for a B×K index tensor."""
        w = self.fc.weight[classes]  # B×K×D
        return torch.einsum("bkd,bdhw->bkhw", w.to(feats.dtype), feats)

    def train(self, mode: bool = True) -> "CAMNet":
        super().train(mode)
        if mode and self.freeze_bn:  # keep ImageNet BN statistics (IRN practice for VOC)
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def _init_conv(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


def _vgg16_trunk(large_feature_map: bool) -> nn.Sequential:
    """torchvision VGG16 ``features`` with pool5 (and pool4 for 28×28) replaced by Identity (indices kept)."""
    from torchvision.models.vgg import cfgs, make_layers

    feats = make_layers(cfgs["D"], batch_norm=False)  # == vgg16().features, without building the classifier
    for idx in ((23, 30) if large_feature_map else (30,)):
        assert isinstance(feats[idx], nn.MaxPool2d)
        feats[idx] = nn.Identity()
    return feats


class ResNet50Trunk(nn.Module):
    """torchvision ResNet50 up to layer4 (same parameter names), layer4 (and layer3 if large) at stride 1."""

    def __init__(self, large_feature_map: bool) -> None:
        super().__init__()
        from torchvision.models import resnet50

        tv = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(tv, name))
        for layer in ([self.layer3, self.layer4] if large_feature_map else [self.layer4]):
            block = layer[0]
            block.conv2.stride = (1, 1)
            block.downsample[0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class InceptionV3Trunk(nn.Module):
    """torchvision InceptionV3 up to Mixed_6e with wsolevaluation's changes (first conv padded, Mixed_6a at
    stride 1, an extra max-pool before Mixed_6a unless ``large_feature_map``). ``transform_input`` maps
    ImageNet-normalised inputs to [-1, 1] (torchvision's convention); wsolevaluation does not."""

    _NAMES = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b",
              "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")

    def __init__(self, large_feature_map: bool, transform_input: bool = False) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        tv = inception_v3(weights=None, aux_logits=False, init_weights=False)
        for name in self._NAMES:
            setattr(self, name, getattr(tv, name))
        self.Conv2d_1a_3x3.conv.padding = (1, 1)
        for conv in (self.Mixed_6a.branch3x3.conv, self.Mixed_6a.branch3x3dbl_3.conv):
            conv.stride, conv.padding = (1, 1), (1, 1)
        self.large_feature_map = large_feature_map
        self.transform_input = transform_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            x = (x * std + mean - 0.5) / 0.5
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        if not self.large_feature_map:
            x = F.max_pool2d(x, kernel_size=3, stride=2, ceil_mode=True)
        m = self.Mixed_6a  # stride-1 InceptionB: torchvision's forward hard-codes a stride-2 pool branch
        b3 = m.branch3x3(x)
        bd = m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))
        x = torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=1, padding=1)], 1)
        return self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))


class TinyTrunk(nn.Sequential):
    """Conv-BN-ReLU stages (``convs`` per stage, the first with the stage's stride)."""

    def __init__(self, widths: Sequence[int], strides: Sequence[int], convs: int = 1,
                 dilations: Sequence[int] | None = None) -> None:
        dilations = list(dilations) if dilations else [1] * len(widths)
        if not len(widths) == len(strides) == len(dilations):
            raise ValueError(f"tiny.widths {list(widths)}, tiny.strides {list(strides)} and tiny.dilations "
                             f"{dilations} must have the same length")
        layers: list[nn.Module] = []
        cin = 3
        for w, s, d in zip(widths, strides, dilations):
            for j in range(max(1, int(convs))):
                layers += [nn.Conv2d(cin, int(w), 3, stride=int(s) if j == 0 else 1, padding=int(d),
                                     dilation=int(d), bias=False),
                           nn.BatchNorm2d(int(w)), nn.ReLU(inplace=True)]
                cin = int(w)
        super().__init__(*layers)
        self.out_channels = cin


def build_cam_net(cfg: dict, num_classes: int) -> CAMNet:
    """The CAMNet described by ``cfg`` (random init; ImageNet weights are loaded by ``load_imagenet``)."""
    name = str(cfg.get("backbone", "vgg16")).lower()
    large = bool(cfg.get("large_feature_map", False))
    head_channels = cfg.get("head_channels")
    if name == "vgg16":
        backbone, dim = _vgg16_trunk(large), 512
        _init_conv(backbone)
        head_channels = 1024 if head_channels is None else int(head_channels)
        head = nn.Sequential(nn.Conv2d(dim, head_channels, 3, padding=1), nn.ReLU(inplace=False)) \
            if head_channels else nn.Sequential()
    elif name == "resnet50":
        backbone, dim = ResNet50Trunk(large), 2048
        head_channels = 0 if head_channels is None else int(head_channels)
        head = nn.Sequential(nn.Conv2d(dim, head_channels, 3, padding=1), nn.ReLU(inplace=False)) \
            if head_channels else nn.Sequential()
    elif name == "inceptionv3":
        inception_input = str(cfg.get("inception_input") or "imagenet").lower()
        if inception_input not in INCEPTION_INPUTS:
            raise ConfigError(f"inception_input must be one of {', '.join(INCEPTION_INPUTS)}, got {inception_input!r}")
        backbone, dim = InceptionV3Trunk(large, transform_input=inception_input == "pm1"), 768
        head_channels = 1024 if head_channels is None else int(head_channels)
        head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(dim, head_channels, 3, padding=1), nn.ReLU(inplace=False),
                             nn.Dropout(0.5), nn.Conv2d(head_channels, head_channels, 3, padding=1),
                             nn.ReLU(inplace=False), nn.Dropout(0.5)) if head_channels else nn.Sequential()
    elif name == "tiny":
        t = cfg.get("tiny") or {}
        backbone = TinyTrunk(t.get("widths", (32, 64, 128, 128)), t.get("strides", (2, 2, 2, 1)),
                             t.get("convs_per_stage", 1), t.get("dilations"))
        dim = backbone.out_channels
        head_channels = 256 if head_channels is None else int(head_channels)
        norm = [nn.BatchNorm2d(head_channels)] if t.get("head_bn") else []
        head = nn.Sequential(nn.Conv2d(dim, head_channels, 3, padding=1, bias=not norm), *norm,
                             nn.ReLU(inplace=False)) if head_channels else nn.Sequential()
        _init_conv(backbone)
    else:
        raise ValueError(f"unknown CAM backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    _init_conv(head)
    feat_dim = head_channels or dim
    return CAMNet(backbone, head, feat_dim, num_classes, fc_bias=bool(cfg.get("fc_bias", True)))


# ------------------------------------------------------------------------------------------ ImageNet weights
def resolve_imagenet_weights(backbone: str, spec: Any) -> Path:
    """The ImageNet checkpoint for ``backbone`` via ``wsolbench.weights`` (offline; WSOLBENCH_WEIGHTS, then the
    torch hub cache). ``spec``: ``imagenet`` (or ``torchvision``/``true``) to search, or a file/folder path.
    Missing weights raise ``MissingWeightsError`` naming the expected file, the places searched and the
    command that fetches it."""
    from wsolbench import weights

    if spec in (None, False, "", "none"):
        raise ValueError("no pretrained weights requested")
    if backbone not in WEIGHT_NAMES:
        raise ValueError(f"backbone {backbone!r} has no ImageNet weights; set pretrained: null")
    text = str(spec)
    if text.lower() in ("imagenet", "torchvision", "true"):
        return weights.resolve(WEIGHT_NAMES[backbone])
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        raise ConfigError(f"config key 'pretrained': {path} is a saved wsolbench model, not ImageNet weights; "
                          f"to start from a saved CAM set finetune_from={path} (and pretrained=null)")
    if not path.exists():
        raise MissingWeightsError(f"CAM pretrained weights {path} do not exist (config key 'pretrained'); "
                                  f"use 'imagenet' to search the weights dir and the torch cache")
    return weights.resolve(WEIGHT_NAMES[backbone], path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from wsolbench.weights import load_state_dict

    return load_state_dict(path, strip_prefix="module.")


def _copy_checked(module: nn.Module, mapped: dict[str, torch.Tensor], required: list[str], path: Path,
                  what: str) -> list[str]:
    """Load ``mapped`` into ``module`` (non-strict) after checking that every key in ``required`` is there
    and no shape differs; ``what`` says what ``path`` should have been. Returns the loaded keys."""
    own = module.state_dict()
    missing = [k for k in required if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path} is not {what}: {len(missing)} backbone tensors missing, "
                         f"e.g. {missing[:3]}")
    bad = [k for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path} is not {what}: shape mismatch for {bad[:3]}")
    module.load_state_dict(mapped, strict=False)
    return sorted(mapped)


def load_imagenet(net: CAMNet, backbone: str, path: Path, classifier: bool = False) -> list[str]:
    """Copy the backbone tensors of a torchvision checkpoint into ``net.backbone`` and, with ``classifier``
    (ResNet50 only, as wsolevaluation on ILSVRC), its ``fc`` into ``net.fc``; returns the loaded keys."""
    state = _read_state(path)
    own = list(net.backbone.state_dict())
    if backbone == "vgg16":
        mapped = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    elif backbone in ("resnet50", "inceptionv3"):
        keys = set(own)
        mapped = {k: v for k, v in state.items() if k in keys}
    else:
        raise ValueError(f"backbone {backbone!r} has no ImageNet weights")
    loaded = _copy_checked(net.backbone, mapped, own, path, f"torchvision {backbone} weights")
    if not classifier:
        return loaded
    if backbone != "resnet50":
        raise ConfigError(f"pretrained_classifier: only resnet50's ImageNet fc fits the CAM classifier "
                          f"(GAP of the last features); {backbone}'s does not (set pretrained_classifier: false)")
    fc = {k.removeprefix("fc."): v for k, v in state.items() if k.startswith("fc.")}
    if sorted(fc) != sorted(net.fc.state_dict()) or fc["weight"].shape != net.fc.weight.shape:
        raise ConfigError(f"pretrained_classifier: {path} has fc {({k: tuple(v.shape) for k, v in fc.items()})} but "
                          f"the CAM classifier is {tuple(net.fc.weight.shape)} (the ImageNet fc needs the 1000 "
                          "ILSVRC classes; set pretrained_classifier: false for other label sets)")
    net.fc.load_state_dict(fc)
    return loaded + [f"fc.{k}" for k in sorted(fc)]


def load_saved_backbone(net: CAMNet, path: Path) -> list[str]:
    """Copy the backbone and head tensors of a saved wsolbench CAM (``model.safetensors``) into ``net``; the
    classifier is left as initialised, so a model trained on one label set can start another."""
    state = _read_state(path)
    own = net.state_dict()
    mapped = {k: v for k, v in state.items() if k.startswith(("backbone.", "head.")) and k in own}
    return _copy_checked(net, mapped, [k for k in own if k.startswith("backbone.")], path,
                         "a CAM with this backbone (config key 'finetune_from': use the same backbone/tiny "
                         "settings as the saved model)")


# ------------------------------------------------------------------------------ wsolevaluation checkpoints
# wsolevaluation's ``architecture`` field -> our backbone name
WSOLEVALUATION_ARCHS = {"vgg16": "vgg16", "resnet50": "resnet50", "inception_v3": "inceptionv3"}
# wsolevaluation's extra layers -> CAMNet's (VGG ``conv6``; Inception ``SPG_A3_*`` around dropouts, ``SPG_A4``
# is a 1×1 conv classifier, i.e. ``fc`` applied per position)
_WSOLEVALUATION_HEADS = {"conv6.": "head.0.", "SPG_A3_1b.0.": "head.1.", "SPG_A3_2b.0.": "head.4.",
                         "SPG_A4.": "fc.", "fc.": "fc."}
# wsolevaluation's VGG16 with large_feature_map has no pool4 entry: its features from index 23 on sit one
# index lower than torchvision's (which CAMNet keeps, with Identity in place of the removed pools)
_VGG_POOL4 = 23


def wsolevaluation_to_camnet(state: dict[str, torch.Tensor], backbone: str,
                             large_feature_map: bool) -> dict[str, torch.Tensor]:
    """A wsolevaluation CAM ``state_dict`` (``wsol/{vgg,resnet,inception}.py``) under CAMNet's names."""
    out = {}
    for key, value in state.items():
        head = next((p for p in _WSOLEVALUATION_HEADS if key.startswith(p)), None)
        if head is not None:
            name = _WSOLEVALUATION_HEADS[head] + key[len(head):]
            if head == "SPG_A4." and value.dim() == 4:
                value = value.flatten(1)  # C×D×1×1 conv → C×D linear
        elif backbone == "vgg16" and key.startswith("features."):
            index, rest = key[len("features."):].split(".", 1)
            index = int(index) + (1 if large_feature_map and int(index) >= _VGG_POOL4 else 0)
            name = f"backbone.{index}.{rest}"
        else:
            name = f"backbone.{key}"
        out[name] = value
    return out


def read_wsolevaluation_checkpoint(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(our backbone name, state_dict) of a wsolevaluation ``torch.save`` checkpoint (read with
    ``weights_only``: no pickled code runs)."""
    from wsolbench.checkpoint import CheckpointError, load_tensors

    path = Path(path)
    obj = load_tensors(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        keys = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a wsolevaluation checkpoint (expected a dict with 'architecture' and "
                              f"'state_dict', as main.py's _torch_save_model writes; got {keys})")
    arch = str(obj.get("architecture", ""))
    if arch not in WSOLEVALUATION_ARCHS:
        raise CheckpointError(f"{path}: field 'architecture' is {arch!r}; wsolevaluation CAMs are "
                              f"{', '.join(WSOLEVALUATION_ARCHS)}")
    state = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    return WSOLEVALUATION_ARCHS[arch], state


# ----------------------------------------------------------------------------------------------- method
def _default_config() -> dict:
    from wsolbench.config import method_schema

    return method_schema("cam")


@register_method("cam")
class CAM(Localizer):
    """CAM / Grad-CAM localizer; see the module docstring. Config: ``configs/cam*.yaml``."""

    capabilities = frozenset({Capability.SINGLE, Capability.MULTI})
    pretrained = ("vgg16", "resnet50", "inception-v3")  # backbone.name: vgg16 | resnet50 | inceptionv3
    needs_training = True

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        from wsolbench.config import merge

        cfg = merge(_default_config(), dict(config or {}), schema=None)
        super().__init__(cfg, class_names, device)
        self.backbone_name = str(cfg["backbone"]).lower()
        if self.backbone_name not in BACKBONES:
            raise ValueError(f"unknown CAM backbone {self.backbone_name!r}; choose one of {', '.join(BACKBONES)}")
        self.variant = str(cfg.get("variant", "cam")).lower()
        if self.variant not in VARIANTS:
            raise ValueError(f"cam variant must be one of {VARIANTS}, got {self.variant!r}")
        self.input_size = int(cfg.get("input_size", 224))
        self.model = self._build(self._num_classes())

    # -- construction --
    def _num_classes(self) -> int:
        n = len(self.class_names) or int(self.config.get("num_classes") or 0)
        return n if n > 0 else 1  # rebuilt in fit() once the classes are known

    def _build(self, num_classes: int) -> CAMNet:
        seed = int((self.config.get("train") or {}).get("seed", 0))
        with torch.random.fork_rng(devices=[]):  # deterministic init that leaves the global RNG alone
            torch.manual_seed(seed)
            net = build_cam_net(self.config, num_classes)
        return net.to(self.device).eval()

    @property
    def num_classes(self) -> int:
        return int(self.model.fc.out_features)

    @property
    def multi_label(self) -> bool:
        return bool(self.config.get("multi_label") or False)

    @classmethod
    def load_foreign(cls, path: str | Path, config: dict | None = None, class_names: Sequence[str] | None = None,
                     device: str = "cpu") -> "CAM":
        """A CAM from a trained wsolevaluation checkpoint (``wsolbench run --checkpoint FILE``): the config
        gives what the file does not store (``large_feature_map``), its ``backbone`` must be the file's."""
        from wsolbench.checkpoint import CheckpointError, load_exact, partial_names
        from wsolbench.config import merge

        cfg = merge(_default_config(), dict(config or {}), schema=None)
        backbone, state = read_wsolevaluation_checkpoint(path)
        if str(cfg.get("backbone")).lower() != backbone:
            raise CheckpointError(f"{path} holds a wsolevaluation {backbone} but the config's backbone is "
                                  f"{cfg.get('backbone')!r}; use --set backbone={backbone} (and the "
                                  f"large_feature_map it was trained with)")
        large = bool(cfg.get("large_feature_map", False))
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
        from wsolbench.training import TrainLoop, make_loader, seed_everything, train_transform

        t = dict(self.config.get("train") or {})
        multi = bool(getattr(train_data, "multi_label", False))
        loss_name = str(t.get("loss", "auto")).lower()
        if loss_name == "auto":
            loss_name = "mlsm" if multi else "ce"
        if loss_name not in ("ce", "mlsm"):
            raise ValueError(f"train.loss must be auto, ce or mlsm, got {loss_name!r}")
        if loss_name == "ce" and multi:
            raise ValueError(f"{train_data!r} is multi-label; cross-entropy needs one label per image "
                             "(use train.loss: mlsm or auto)")
        names = list(getattr(train_data, "class_names", []) or [])
        if self.class_names and names and names != self.class_names:
            raise ValueError("the training data's class names differ from the method's class names")
        if not self.class_names:
            self.class_names = names
        self.config["multi_label"] = loss_name == "mlsm"
        self.config["num_classes"] = len(self.class_names)
        if self.num_classes != len(self.class_names):
            self.model = self._build(len(self.class_names))

        out = Path(out_dir) if out_dir is not None else None
        ckpt_exists = out is not None and (out / "last.pt").exists()
        loaded_from = None if resume and ckpt_exists else self._load_start_weights()

        net = self.model
        net.freeze_bn = bool(t.get("freeze_bn", False))
        frozen = tuple(t.get("frozen_prefixes") or ())
        for n, p in net.named_parameters():
            p.requires_grad_(not n.startswith(frozen) if frozen else True)
        optimizer = self._optimizer(t)
        epochs = int(t.get("epochs", 1))
        batch_size = int(t.get("batch_size", 32))
        steps_per_epoch = len(train_data) // batch_size if t.get("drop_last", True) else \
            -(-len(train_data) // batch_size)
        if steps_per_epoch < 1:
            raise ValueError(f"{len(train_data)} training images are fewer than one batch of {batch_size}")
        if t.get("max_steps_per_epoch"):
            steps_per_epoch = min(steps_per_epoch, int(t["max_steps_per_epoch"]))
        scheduler, interval = self._scheduler(t, optimizer, epochs, steps_per_epoch)

        seed = int(t.get("seed", 0))
        seed_everything(seed)
        tf = train_transform(int(t.get("resize_size", 256)), int(t.get("crop_size", 224)), self.mean, self.std,
                             flip=bool(t.get("flip", True)), scale=t.get("scale"),
                             color_jitter=float(t.get("color_jitter") or 0.0), hue=float(t.get("hue") or 0.0),
                             grayscale_p=float(t.get("grayscale_p") or 0.0))
        target = "multi" if loss_name == "mlsm" else "single"
        num_workers = int(t.get("num_workers", 0))
        dev = torch.device(self.device)

        def loaders(epoch: int):
            return make_loader(train_data, tf, batch_size=batch_size, shuffle=True, seed=seed, target=target,
                               drop_last=bool(t.get("drop_last", True)), epoch=epoch, num_workers=num_workers,
                               num_classes=len(self.class_names), pin_memory=dev.type == "cuda")

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
                         progress=progress, desc=f"cam-{self.backbone_name}",
                         grad_clip=t.get("grad_clip"), scheduler_interval=interval,
                         max_steps_per_epoch=t.get("max_steps_per_epoch"))
        history = loop.run(loaders, step, resume=resume)
        net.eval()
        result = {"history": history, "epochs": epochs, "loss": loss_name, "pretrained": loaded_from,
                  "final_loss": history[-1]["loss"] if history else None}
        if out is not None:
            result["out_dir"] = str(out)
        return result

    def _load_start_weights(self) -> str | None:
        """Load what training starts from: ``finetune_from`` (a saved wsolbench CAM directory: backbone and
        head) or ``pretrained`` (ImageNet weights); returns the file read, or None."""
        pretrained, finetune = self.config.get("pretrained"), self.config.get("finetune_from")
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
        path = resolve_imagenet_weights(self.backbone_name, pretrained)
        load_imagenet(self.model, self.backbone_name, path,
                      classifier=bool(self.config.get("pretrained_classifier", False)))
        return str(path)

    def _optimizer(self, t: dict) -> torch.optim.Optimizer:
        prefixes = tuple(t.get("classifier_prefixes") or DEFAULT_CLASSIFIER_PREFIXES[self.backbone_name])
        lr = float(t.get("lr", 0.01))
        mult = float(t.get("lr_classifier_mult", 1.0))
        feats, cls = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (cls if n.startswith(prefixes) else feats).append(p)
        groups = [g for g in ({"params": feats, "lr": lr}, {"params": cls, "lr": lr * mult}) if g["params"]]
        momentum = float(t.get("momentum", 0.9))
        opt_name = str(t.get("optimizer", "sgd")).lower()
        if opt_name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=float(t.get("weight_decay", 0.0)),
                                   nesterov=bool(t.get("nesterov", False)) and momentum > 0)
        if opt_name == "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=float(t.get("weight_decay", 0.0)))
        raise ValueError(f"train.optimizer must be sgd or adamw, got {opt_name!r}")

    @staticmethod
    def _scheduler(t: dict, optimizer, epochs: int, steps_per_epoch: int):
        kind = str(t.get("lr_schedule", "step")).lower()
        if kind == "step":
            every = max(1, int(t.get("lr_decay_every", 10 ** 9)))
            gamma = float(t.get("lr_decay_gamma", 0.1))
            # wsolevaluation decays before epoch e (1-based) when e % every == 0; LambdaLR gets the 0-based index
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: gamma ** ((e + 1) // every)), "epoch"
        if kind == "poly":
            total = max(1, epochs * steps_per_epoch)
            power = float(t.get("poly_power", 0.9))
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: max(0.0, 1.0 - min(s, total) / total) ** power), "step"
        if kind in ("constant", "none"):
            return None, "epoch"
        raise ValueError(f"train.lr_schedule must be step, poly or constant, got {kind!r}")

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
        chunk = max(1, int((self.config.get("eval") or {}).get("batch_size", 64)))
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

            layer = self.config.get("gradcam_layer") or "cam_layer"
            maps, _ = grad_cam(net, layer, x, targets=queries)
        return maps.detach(), logits.detach(), [list(q) for q in queries]

    def __repr__(self) -> str:
        return (f"CAM(backbone={self.backbone_name!r}, variant={self.variant!r}, classes={self.num_classes}, "
                f"multi_label={self.multi_label})")


RECIPE_DATASETS = ("cub", "ilsvrc", "openimages")


def recipe_file(backbone: str, dataset: str) -> Path:
    """``configs/cam_<backbone>_<dataset>.yaml``: the wsolevaluation recipe of one backbone on one dataset."""
    from wsolbench.config import method_config_dir

    path = method_config_dir("cam") / f"cam_{backbone}_{dataset}.yaml"
    if not path.is_file():
        raise ValueError(f"no CAM recipe {path.name}: recipes exist for backbones {', '.join(WEIGHT_NAMES)} on "
                         f"{', '.join(RECIPE_DATASETS)}")
    return path


def recipe_config(backbone: str, dataset: str, overrides: Sequence[str] = (), profile: str = "paper") -> dict:
    """The resolved config of one recipe: cam.yaml ← cam_<dataset>.yaml ← the recipe file ← ``overrides``."""
    from wsolbench.config import load_method_config

    return load_method_config("cam", profile, dataset, list(overrides), extra_file=recipe_file(backbone, dataset))


def config_for(backbone: str, **train_overrides: Any) -> dict:
    """A CAM config for ``backbone`` on top of the defaults (handy in notebooks)."""
    cfg = copy.deepcopy(_default_config())
    cfg["backbone"] = backbone
    cfg.setdefault("train", {}).update(train_overrides)
    return cfg
