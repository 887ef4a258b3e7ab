"""CAMNet and its trunks, built from a resolved CAM config (``configs/cam.yaml``).

Backbones (the WSOL variants of wsolevaluation, Choe et al. CVPR 2020, ``wsol/{vgg,resnet,inception}.py``):

* ``vgg16``: conv1–conv5 with the last max-pool removed (14×14 at 224 px; 28×28 with ``large_feature_map``,
  which also drops pool4) + an extra 3×3 conv (512→1024, "conv6") + ReLU.
* ``resnet50``: layer4 with stride 1 (14×14); ``large_feature_map`` also sets layer3 to stride 1 (28×28).
  Same parameter names as torchvision, so ImageNet checkpoints load unchanged.
* ``inceptionv3``: Mixed_6a with stride 1 and the first conv padded (28×28 with ``large_feature_map``, else an
  extra max-pool → 14×14) + two 3×3 convs (768→1024→1024) with dropout 0.5, as in wsolevaluation, which feeds
  the ImageNet-normalised tensor straight to the first conv (``inception_input: imagenet``; ``pm1`` rescales to
  the [-1, 1] range the Google weights were trained with, torchvision's ``transform_input``).
* ``tiny``: a small BN-ReLU CNN trained from scratch (stride 8) for CPU demos and tests.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsolbench.config import ConfigError

BACKBONES = ("vgg16", "resnet50", "inceptionv3", "tiny")
INCEPTION_INPUTS = ("imagenet", "pm1")  # what InceptionV3's first conv sees: wsolevaluation's | torchvision's
# the head's width where the config's head_channels is null: wsolevaluation's conv6 (VGG16) and SPG_A3 convs
# (InceptionV3) have 1024 channels, its ResNet50 has no extra conv; the tiny CNN's 256 is ours
HEAD_CHANNELS = {"vgg16": 1024, "resnet50": 0, "inceptionv3": 1024, "tiny": 256}


class CAMNet(nn.Module):
    """backbone → head (extra convs) → ``cam_layer`` (identity, the hook point) → GAP → ``fc``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feat_dim: int, num_classes: int,
                 fc_bias: bool) -> None:
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

    def __init__(self, large_feature_map: bool, transform_input: bool) -> None:
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

    def __init__(self, widths: Sequence[int], strides: Sequence[int], convs: int,
                 dilations: Sequence[int] | None) -> None:
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
    """The CAMNet described by the resolved config ``cfg`` (random init; ImageNet weights are loaded by
    ``loading.load_imagenet``)."""
    name = str(cfg["backbone"]).lower()
    if name not in BACKBONES:
        raise ValueError(f"unknown CAM backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    large = bool(cfg["large_feature_map"])
    head_channels = HEAD_CHANNELS[name] if cfg["head_channels"] is None else int(cfg["head_channels"])
    if name == "vgg16":
        backbone, dim = _vgg16_trunk(large), 512
        _init_conv(backbone)
        head = nn.Sequential(nn.Conv2d(dim, head_channels, 3, padding=1), nn.ReLU(inplace=False)) \
            if head_channels else nn.Sequential()
    elif name == "resnet50":
        backbone, dim = ResNet50Trunk(large), 2048
        head = nn.Sequential(nn.Conv2d(dim, head_channels, 3, padding=1), nn.ReLU(inplace=False)) \
            if head_channels else nn.Sequential()
    elif name == "inceptionv3":
        inception_input = str(cfg["inception_input"]).lower()
        if inception_input not in INCEPTION_INPUTS:
            raise ConfigError(f"inception_input must be one of {', '.join(INCEPTION_INPUTS)}, got {inception_input!r}")
        backbone, dim = InceptionV3Trunk(large, transform_input=inception_input == "pm1"), 768
        head = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(dim, head_channels, 3, padding=1), nn.ReLU(inplace=False),
                             nn.Dropout(0.5), nn.Conv2d(head_channels, head_channels, 3, padding=1),
                             nn.ReLU(inplace=False), nn.Dropout(0.5)) if head_channels else nn.Sequential()
    else:  # tiny
        t = cfg["tiny"]
        backbone = TinyTrunk(t["widths"], t["strides"], t["convs_per_stage"], t["dilations"])
        dim = backbone.out_channels
        norm = [nn.BatchNorm2d(head_channels)] if t["head_bn"] else []
        head = nn.Sequential(nn.Conv2d(dim, head_channels, 3, padding=1, bias=not norm), *norm,
                             nn.ReLU(inplace=False)) if head_channels else nn.Sequential()
        _init_conv(backbone)
    _init_conv(head)
    feat_dim = head_channels or dim
    return CAMNet(backbone, head, feat_dim, num_classes, fc_bias=bool(cfg["fc_bias"]))
