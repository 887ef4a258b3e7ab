"""WWbL's g and its encoders: the text-conditioned grounding network (the official ``MultiModel``, whose key
names its checkpoint uses), the WSOL U-Net over a pretrained backbone, building both from the config, and
loading pretrained backbone weights or the authors' grounding checkpoint into them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_ACTIVATIONS = ("relu", "leaky_relu", "none")


class BottleneckBlock(nn.Module):
    """[conv3x3 → BN → ReLU] × 2 (official ``BottleneckBlock``; names conv1, BN1, conv2, BN2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.BN1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.BN2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.BN1(self.conv1(x)))
        return F.relu(self.BN2(self.conv2(x)))


class UpBlock(nn.Module):
    """×2 bilinear upsampling, conv → BN → ReLU → conv, then BN → ReLU (``act``) or nothing (the last block:
    the official ``func='None'`` returns conv2's output; BN2 exists but is unused, as in the checkpoint)."""

    def __init__(self, cin: int, cout: int, act: bool = True, mid_activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.BN1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.BN2 = nn.BatchNorm2d(cout)
        self.act = act
        if mid_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"activation must be one of {HEAD_ACTIVATIONS}, got {mid_activation!r}")
        self.mid_activation = mid_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.BN1(self.conv1(x))
        if self.mid_activation == "relu":
            x = F.relu(x)
        elif self.mid_activation == "leaky_relu":
            x = F.leaky_relu(x, 0.1)
        x = self.conv2(x)
        return F.relu(self.BN2(x)) if self.act else x


class TextDecoder(nn.Module):
    """The official ``MMDecoder`` with the text width as a parameter (512 for CLIP ViT-B/32)."""

    def __init__(self, in_channels: int, text_dim: int, mid_channels: int, head_activation: str) -> None:
        super().__init__()
        self.bottleneck = BottleneckBlock(in_channels, text_dim)
        self.up0 = UpBlock(text_dim, mid_channels, act=True)
        # the official head: conv 512→1, BN, ReLU, conv 1→1. A single ReLU'd channel can die for an image
        # (constant map); ``head_activation`` leaky_relu/none keeps the same parameters without that trap.
        self.up1 = UpBlock(mid_channels, 1, act=False, mid_activation=head_activation)

    def forward(self, z: torch.Tensor, z_text: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        zz = self.bottleneck(z)
        zz_norm = zz / zz.norm(dim=1, keepdim=True).clamp_min(1e-6)
        attn = (zz_norm * z_text[:, :, None, None].to(zz.dtype)).sum(dim=1, keepdim=True)
        zz = self.up1(self.up0(zz * attn))
        zz = F.interpolate(zz, size=out_size, mode="bilinear", align_corners=True)
        return torch.sigmoid(zz)


class Trunk(nn.Module):
    """E: a feature extractor giving C channels at stride s, held as ``Org_model`` (an nn.Sequential slice,
    e.g. VGG16 ``features[:23]``), so that the official key names ``E.Org_model.<i>.*`` match."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.Org_model = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Org_model(x)


class TextConditionedG(nn.Module):
    """g(I, z_t) ∈ [0, 1]^{1×H×W} (official ``MultiModel``: attributes E and D)."""

    def __init__(self, features: nn.Module, feat_channels: int, text_dim: int, mid_channels: int,
                 head_activation: str) -> None:
        super().__init__()
        self.E = Trunk(features)
        self.D = TextDecoder(feat_channels, text_dim, mid_channels, head_activation)

    def forward(self, x: torch.Tensor, z_text: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        if z_text.shape[0] != x.shape[0]:
            raise ValueError(f"one text embedding per image expected, got {z_text.shape[0]} for {x.shape[0]} images")
        return self.D(self.E(x), z_text, tuple(out_size or x.shape[-2:]))


class SequentialTaps(nn.Module):
    """Multi-scale features of an nn.Sequential CNN (VGG-like), shallow to deep: the output before every
    MaxPool, the first MaxPool's output and the last output — for VGG16 ``features`` the official WSOL taps
    3, 4, 8, 15, 22, 29 (relu1_2, pool1, relu2_2, relu3_3, relu4_3, relu5_3; ``models/vgg16.py VGG16Net``)."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        layers = list(features)
        while layers and isinstance(layers[-1], nn.MaxPool2d):  # drop trailing pools: the last tap is the top
            layers.pop()
        self.Org_model = nn.Sequential(*layers)
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        self.taps = sorted({i - 1 for i in pools if i > 0} | set(pools[:1]) | {len(layers) - 1})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.Org_model):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs


class FeatureListTaps(nn.Module):
    """Wraps a model returning a list of feature maps (timm ``features_only``), shallow to deep."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.Org_model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.Org_model(x))


class SkipUpBlock(nn.Module):
    """Upsample to the skip's size, concatenate, [conv → BN → ReLU] × 2 (the last block: conv2 raw)."""

    def __init__(self, cin: int, cskip: int, cout: int, act: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin + cskip, cout, 3, padding=1)
        self.BN1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.BN2 = nn.BatchNorm2d(cout) if act else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = F.relu(self.BN1(self.conv1(torch.cat([x, skip], dim=1))))
        x = self.conv2(x)
        return F.relu(self.BN2(x)) if self.act else x


class UNetG(nn.Module):
    """WSOL g(I) ∈ [0, 1]^{1×H×W}: U-Net decoder over the taps of a pretrained backbone (no text input).

    Over VGG16's six ``SequentialTaps`` this is the official ``base.SkipDecoder``: bottleneck on relu5_3, then
    five up blocks (512+512→512, 512+256→256, 256+128→128, 128+64→64 at the same scale, 64+64→1), each block
    upsampling to its skip's size (= the official ×2 for inputs divisible by 32), align_corners resize, sigmoid."""

    def __init__(self, encoder: nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"the U-Net needs at least two feature scales, got channels {list(channels)}")
        self.E = encoder
        deep = channels[-1]
        self.bottleneck = BottleneckBlock(deep, deep)
        ups = []
        cin = deep
        skips = list(channels[:-1])[::-1]
        for k, cskip in enumerate(skips):
            last = k == len(skips) - 1
            cout = 1 if last else cskip
            ups.append(SkipUpBlock(cin, cskip, cout, act=not last))
            cin = cout
        self.ups = nn.ModuleList(ups)

    def forward(self, x: torch.Tensor, z_text: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        feats = self.E(x)
        z = self.bottleneck(feats[-1])
        for up, skip in zip(self.ups, feats[-2::-1]):
            z = up(z, skip)
        z = F.interpolate(z, size=tuple(out_size or x.shape[-2:]), mode="bilinear", align_corners=True)
        return torch.sigmoid(z)


def feature_channels(module: nn.Module, size: int) -> list[int]:
    """Channels of each output of ``module`` on a dummy input (a tensor or a list of tensors)."""
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 3, size, size))
    module.train(was)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [int(o.shape[1]) for o in outs]


def _encoder_features(cfg: dict) -> nn.Module:
    """The (random-init) feature CNN of ``encoder`` (grounding mode), weights come in ``load_backbone_weights``."""
    e = cfg["encoder"]
    source = e["source"]
    if source == "torchvision":
        if e["name"] != "vgg16":
            raise ValueError(f"encoder.name {e['name']!r}: the grounding encoder is torchvision vgg16")
        return vgg16_features()[: int(e["cut"])]
    if source in ("zoo", "zoo-random"):
        from wsolbench import zoo

        return _sequential_features(zoo.create_backbone("vgg", e["scale"]))[: int(e["cut"])]
    raise ValueError(f"encoder.source must be torchvision, zoo or zoo-random, got {source!r}")


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same layer indices), without building the 120M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=False)


def _sequential_features(net: nn.Module) -> nn.Sequential:
    """The ``features`` nn.Sequential of a VGG-like CNN (the zoo's), whose indices the taps and cuts use."""
    feats = getattr(net, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise TypeError(f"{type(net).__name__} has no nn.Sequential 'features' (a VGG-like CNN is expected)")
    return feats


def _unet_encoder(cfg: dict) -> nn.Module:
    """The (random-init) multi-scale encoder of ``unet`` (WSOL mode)."""
    u = cfg["unet"]
    backbone = u["backbone"]
    if backbone == "vgg16":
        return SequentialTaps(vgg16_features())
    if backbone in ("zoo-vgg", "zoo-vgg-random"):
        from wsolbench import zoo

        return SequentialTaps(_sequential_features(zoo.create_backbone("vgg", u["scale"])))
    import timm

    return FeatureListTaps(timm.create_model(backbone, pretrained=False, features_only=True))


def build_g(cfg: dict, text_dim: int) -> nn.Module:
    """g of ``cfg["mode"]`` (random init; ``load_backbone_weights`` fills the encoder), for ``text_dim``-wide
    CLIP text embeddings."""
    if cfg["mode"] == "grounding":
        feats = _encoder_features(cfg)
        c = feature_channels(feats, size=int(cfg["encoder"]["probe_size"]))[-1]
        return TextConditionedG(feats, c, text_dim, int(cfg["decoder"]["mid_channels"]),
                                cfg["decoder"]["head_activation"])
    enc = _unet_encoder(cfg)
    return UNetG(enc, feature_channels(enc, size=int(cfg["unet"]["probe_size"])))


def load_backbone_weights(g: nn.Module, cfg: dict) -> list[str]:
    """Copy the pretrained backbone weights into g's encoder (ImageNet VGG16 / ResNet50 / InceptionV3 from the
    weights catalogue, or the zoo CNN); returns the loaded tensor names."""
    from wsolbench import zoo
    from wsolbench.weights import load_state_dict, resolve

    if cfg["mode"] == "grounding":
        e = cfg["encoder"]
        if e["source"] == "zoo":
            src = _sequential_features(zoo.load_backbone("vgg", e["scale"]))[: int(e["cut"])]
            g.E.Org_model.load_state_dict(src.state_dict())
            return list(src.state_dict())
        if e["source"] == "torchvision" and e["pretrained"]:
            path = resolve("vgg16", None if e["pretrained"] == "imagenet" else e["pretrained"])
            return _load_vgg_features(g.E.Org_model, load_state_dict(path))
        return []
    u = cfg["unet"]
    if u["backbone"] == "zoo-vgg":
        src = _sequential_features(zoo.load_backbone("vgg", u["scale"]))
        own = g.E.Org_model.state_dict()
        state = {k: v for k, v in src.state_dict().items() if k in own}
        g.E.Org_model.load_state_dict(state)
        return list(state)
    if u["backbone"] == "zoo-vgg-random" or not u["pretrained"]:
        return []
    explicit = None if u["pretrained"] == "imagenet" else u["pretrained"]
    if u["backbone"] == "vgg16":
        return _load_vgg_features(g.E.Org_model, load_state_dict(resolve("vgg16", explicit)))
    catalogue = {"resnet50": "resnet50", "inception_v3": "inception-v3"}  # torchvision names = timm's
    if u["backbone"] not in catalogue and explicit is None:
        raise ValueError(f"unet.pretrained: give the path of ImageNet weights for {u['backbone']!r} (the weights "
                         "catalogue has vgg16, resnet50, inception_v3)")
    path = resolve(catalogue[u["backbone"]], explicit) if u["backbone"] in catalogue else Path(explicit)
    state = load_state_dict(path)
    own = g.E.Org_model.state_dict()
    state = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: {len(missing)} backbone tensors of {u['backbone']} missing, e.g. {missing[:3]}")
    g.E.Org_model.load_state_dict(state, strict=False)
    return sorted(state)


def official_key(key: str) -> str:
    """An official checkpoint key → this module's key (strip DataParallel's ``module.``)."""
    return key[len("module."):] if key.startswith("module.") else key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official WWbL checkpoint: the authors' ``net_best.pth`` (``torch.save(model)`` of a
    DataParallel module) through ``wsolbench.weights.load_state_dict``'s stub unpickler (every class an inert
    stub: no code runs, only tensors come out, named ``module.E.Org_model.*`` / ``module.D.*``), or a state
    dict / safetensors file (weights-only)."""
    from wsolbench.weights import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WWbL checkpoint {path} does not exist (official_checkpoint / --checkpoint)")
    return load_state_dict(path)


def load_official_into(model: nn.Module, path: str | Path):
    """Load an official WWbL grounding checkpoint into a ``TextConditionedG`` with ``checkpoint.load_exact``
    (every tensor of the model from the file and every tensor of the file used, same shapes); returns the
    ``LoadReport``."""
    from wsolbench.checkpoint import load_exact

    state = {official_key(k): v for k, v in read_state_dict(path).items()}
    return load_exact(model, state, where=path, layout="wwbl-official-grounding")


def _load_vgg_features(trunk: nn.Sequential, state: dict[str, torch.Tensor]) -> list[str]:
    """torchvision VGG16 ``features.<i>.*`` tensors → a ``features[:k]`` slice (or the U-Net taps)."""
    own = trunk.state_dict()
    mapped = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    mapped = {k: v for k, v in mapped.items() if k in own}
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ValueError(f"not torchvision VGG16 weights: {len(missing)} tensors missing, e.g. {missing[:3]}")
    trunk.load_state_dict(mapped)
    return sorted(mapped)
