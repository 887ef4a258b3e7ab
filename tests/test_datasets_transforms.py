"""Standard transforms are built from configuration values (resize 224 without crop for evaluation, etc.)."""
from __future__ import annotations

import numpy as np
import pytest

from wsolbench.datasets import transforms as T


@pytest.fixture
def image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (150, 300, 3), dtype=np.uint8))


def test_eval_resizes_without_crop(image):
    import torch

    x = T.eval_transform(224)(image)
    assert tuple(x.shape) == (3, 224, 224) and x.dtype == torch.float32
    raw = T.eval_transform((112, 224), mean=None, std=None)(image)
    assert tuple(raw.shape) == (3, 112, 224) and 0 <= float(raw.min()) and float(raw.max()) <= 1
    # no crop: the left and right thirds of the image survive (a centre crop would drop them)
    from PIL import Image

    arr = np.zeros((150, 300, 3), np.uint8)
    arr[:, :20] = 255
    left = T.eval_transform(224, mean=None, std=None)(Image.fromarray(arr))
    assert float(left[:, :, :5].mean()) > 0.9


def test_train_transform_random_crop_and_flip(image):
    import torch

    torch.manual_seed(0)
    t = T.train_transform(resize=256, crop=224, flip=True)
    a, b = t(image), t(image)
    assert tuple(a.shape) == (3, 224, 224) and not torch.equal(a, b)


def test_configured_per_protocol():
    assert T.transform_config("cub", "eval") == {"size": 224}
    assert T.transform_config("wsol", "train") == {"resize": 256, "crop": 224, "flip": True}
    assert T.transform_config("voc", "eval", {"size": 448})["size"] == 448
    t = T.build_transform(T.transform_config("cub", "eval", {"mean": T.CLIP_MEAN, "std": T.CLIP_STD}), "eval")
    assert callable(t)
    with pytest.raises(ValueError, match="unknown eval transform option"):
        T.build_transform({"size": 224, "crop": 200}, "eval")
    with pytest.raises(ValueError, match="unknown protocol"):
        T.transform_config("mnist", "eval")
