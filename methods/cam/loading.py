"""What a CAM starts from or is read from: ImageNet backbones (through the weights catalogue), a saved
wsolbench CAM's backbone (``finetune_from``) and trained wsolevaluation checkpoints (``--checkpoint FILE``).

ImageNet weights (profile ``paper``) are found offline by ``wsolbench.weights.resolve`` (configs/weights.yaml:
a path in the config, WSOLBENCH_WEIGHTS or the torch hub cache; never downloaded); missing weights raise
``MissingWeightsError`` naming the file, the places searched and the command that fetches it.

wsolevaluation checkpoints (``best_checkpoint.pth.tar``: ``architecture``, ``state_dict``) are mapped to
``CAMNet``'s names (``wsolevaluation_to_camnet``); the file does not store ``large_feature_map``, so the
config must name it (the ``cam_<backbone>*.yaml`` recipes do).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsolbench import weights
from wsolbench.config import ConfigError
from wsolbench.weights import MissingWeightsError

from .model import CAMNet

# each backbone's ImageNet checkpoint in the weights catalogue (configs/weights.yaml: torchvision's
# vgg16-397923af.pth, resnet50-0676ba61.pth, inception_v3_google-0cc3c7bd.pth); CAM.pretrained lists them
IMAGENET_WEIGHTS = {"vgg16": "vgg16", "resnet50": "resnet50", "inceptionv3": "inception-v3"}


def imagenet_weights_file(backbone: str, pretrained: str) -> Path:
    """The ImageNet checkpoint that config key ``pretrained`` names for ``backbone``, found by
    ``wsolbench.weights.resolve``: ``imagenet`` searches WSOLBENCH_WEIGHTS and the torch hub cache, any other
    value is an explicit file or a folder holding it (as given, else under the weights dir:
    ``wsolbench.weights.local_path``)."""
    if backbone not in IMAGENET_WEIGHTS:
        raise ConfigError(f"config key 'pretrained': backbone {backbone!r} has no ImageNet weights; "
                          "set pretrained: null")
    name = IMAGENET_WEIGHTS[backbone]
    if str(pretrained).lower() == "imagenet":
        return weights.resolve(name)
    path = weights.local_path(str(pretrained))
    if (path / "model.safetensors").is_file():
        raise ConfigError(f"config key 'pretrained': {path} is a saved wsolbench model, not ImageNet weights; "
                          f"to start from a saved CAM set finetune_from={path} (and pretrained=null)")
    if not path.exists():
        raise MissingWeightsError(f"CAM pretrained weights {path} do not exist, as given or under the weights dir "
                                  f"(config key 'pretrained'); use 'imagenet' to search the weights dir and the "
                                  f"torch cache")
    return weights.resolve(name, path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    return weights.load_state_dict(path, strip_prefix="module.")


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


def load_imagenet(net: CAMNet, backbone: str, path: Path, *, classifier: bool) -> list[str]:
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
