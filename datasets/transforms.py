"""Standard image transforms per protocol, built from configuration values (never hard-coded in methods).

wsolevaluation (data_loaders.py): train = Resize((256, 256)) → RandomCrop(224) → RandomHorizontalFlip;
val/test = Resize((224, 224)) with NO centre crop (the GT boxes and masks are rescaled to 224 per axis, so
the image must be too). Both then ToTensor and ImageNet Normalize. Methods with other statistics (CLIP)
pass their own ``mean``/``std`` (or None to skip normalisation).

Everything returns a callable PIL.Image → float tensor 3×H×W; torchvision is imported only when a
transform is built.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Per-protocol defaults; a method/dataset YAML may override any value (see ``build_transform``).
PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "wsol": {  # CUB, ILSVRC, OpenImages (wsolevaluation)
        "train": {"resize": 256, "crop": 224, "flip": True},
        "eval": {"size": 224},
    },
    "dense": {  # VOC / COCO class maps: maps are upsampled to the ORIGINAL size by the metric
        "train": {"resize": 256, "crop": 224, "flip": True},
        "eval": {"size": 224},
    },
    "grounding": {  # Flickr30k: maps resized back to the original size by the metric
        "train": {"resize": 256, "crop": 224, "flip": True},
        "eval": {"size": 224},
    },
}
DATASET_PROTOCOL = {"cub": "wsol", "ilsvrc": "wsol", "openimages": "wsol", "voc": "dense", "coco": "dense",
                    "flickr30k": "grounding"}

_INTERP = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return getattr(InterpolationMode, _INTERP[name])
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {name!r}") from None


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    """An int or (H, W) → (H, W)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected a size int or (H, W), got {v}")
    return v  # type: ignore[return-value]


def _tail(mean, std) -> list:
    from torchvision import transforms as T

    out: list = [T.ToTensor()]
    if mean is not None and std is not None:
        out.append(T.Normalize(list(mean), list(std)))
    return out


def eval_transform(size: int | Sequence[int] = 224, mean: Sequence[float] | None = IMAGENET_MEAN,
                   std: Sequence[float] | None = IMAGENET_STD, interpolation: str = "bilinear") -> Callable:
    """Resize to ``size`` (int → size×size; or (H, W)) WITHOUT cropping, ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(_pair(size), interpolation=_interp(interpolation))] + _tail(mean, std))


def train_transform(resize: int | Sequence[int] = 256, crop: int | Sequence[int] = 224, flip: bool = True,
                    mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                    interpolation: str = "bilinear") -> Callable:
    """Resize to ``resize`` (int → square, as wsolevaluation), RandomCrop ``crop``, optional horizontal
    flip, ToTensor, Normalize."""
    from torchvision import transforms as T

    steps = [T.Resize(_pair(resize), interpolation=_interp(interpolation)), T.RandomCrop(_pair(crop))]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _tail(mean, std))


def transform_config(protocol_or_dataset: str, stage: str, overrides: dict | None = None) -> dict:
    """The resolved configuration dict for ``stage`` ("train" or "eval") of a protocol ("wsol", "dense",
    "grounding") or a dataset config key ("cub", "voc", ...), with ``overrides`` applied."""
    protocol = DATASET_PROTOCOL.get(protocol_or_dataset, protocol_or_dataset)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol/dataset {protocol_or_dataset!r}; protocols: {sorted(PROTOCOLS)}, "
                         f"datasets: {sorted(DATASET_PROTOCOL)}")
    if stage not in ("train", "eval"):
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    cfg = dict(PROTOCOLS[protocol][stage])
    cfg.update(overrides or {})
    return cfg


def build_transform(cfg: dict, stage: str) -> Callable:
    """A transform from a config dict: eval keys size/mean/std/interpolation; train keys
    resize/crop/flip/mean/std/interpolation (missing mean/std → ImageNet; explicit None → no Normalize)."""
    cfg = dict(cfg)
    if stage == "eval":
        allowed = {"size", "mean", "std", "interpolation"}
        fn: Callable = eval_transform
    elif stage == "train":
        allowed = {"resize", "crop", "flip", "mean", "std", "interpolation"}
        fn = train_transform
    else:
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"unknown {stage} transform option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return fn(**cfg)
