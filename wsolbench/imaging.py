"""Turning user images (PIL, numpy, tensors) into model batches, with errors that say what was received."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .localizer import InputError


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    extra = f" shape={tuple(shape)} dtype={dtype}" if shape is not None else ""
    return f"{type(x).__module__}.{type(x).__name__}{extra}"


def to_float_chw(img: Any, index: int = 0):
    """One image → float32 tensor 3×H×W in [0, 1]. Accepts PIL, HWC uint8/float numpy, CHW tensors."""
    import torch
    from PIL import Image

    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise InputError(f"image {index}: expected a numpy array H×W×3 (RGB), got {_describe(img)}")
        img = img[..., :3] if img.shape[2] != 1 else np.repeat(img, 3, axis=2)
        if img.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
        if np.issubdtype(img.dtype, np.floating):
            if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
                raise InputError(f"image {index}: float numpy images must be finite and in [0, 1], got "
                                 f"range [{np.nanmin(img):.3g}, {np.nanmax(img):.3g}]")
            return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
        raise InputError(f"image {index}: unsupported numpy dtype {img.dtype}; use uint8 or float in [0, 1]")
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise InputError(f"image {index}: expected a tensor 3×H×W, got {_describe(img)}")
        t = t.float().cpu()
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        if img.dtype == torch.uint8:
            return t / 255.0
        return t
    raise InputError(f"image {index}: expected a PIL.Image, numpy array or torch tensor, got {_describe(img)}")


def as_image_list(images: Any) -> list:
    """A batch given as one image, a list of images, or a B×3×H×W tensor → a list of single images."""
    import torch
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim in (2, 3):
        return [images]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise InputError("got an empty batch of images")
        for i, img in enumerate(images):
            if not isinstance(img, (Image.Image, torch.Tensor, np.ndarray)):
                raise InputError(f"image {i}: expected a PIL.Image, numpy array or torch tensor, got {_describe(img)}"
                                 + (" (a path: open it with PIL.Image.open first)" if isinstance(img, (str, Path))
                                    else ""))
        return list(images)
    raise InputError(f"images must be a PIL image, an array/tensor or a list of them, got {_describe(images)}")


def to_batch(images: Any, size: int, mean: Sequence[float], std: Sequence[float]):
    """Resize each image to size×size (bilinear, no crop) and normalise → B×3×size×size float tensor."""
    import torch
    import torch.nn.functional as F

    out = []
    for i, img in enumerate(as_image_list(images)):
        t = to_float_chw(img, i)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        out.append(t)
    batch = torch.stack(out).clamp_(0, 1)
    m = torch.tensor(mean, dtype=batch.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - m) / s
