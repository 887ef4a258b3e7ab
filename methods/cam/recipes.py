"""The named wsolevaluation recipes, one per backbone × dataset: ``configs/cam_<backbone>_<dataset>.yaml``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from wsolbench.config import load_method_config, method_config_dir

RECIPE_BACKBONES = ("vgg16", "resnet50", "inceptionv3")  # the backbones with ImageNet weights
RECIPE_DATASETS = ("cub", "ilsvrc", "openimages")


def recipe_file(backbone: str, dataset: str) -> Path:
    """``configs/cam_<backbone>_<dataset>.yaml``: the wsolevaluation recipe of one backbone on one dataset."""
    path = method_config_dir("cam") / f"cam_{backbone}_{dataset}.yaml"
    if not path.is_file():
        raise ValueError(f"no CAM recipe {path.name}: recipes exist for backbones {', '.join(RECIPE_BACKBONES)} on "
                         f"{', '.join(RECIPE_DATASETS)}")
    return path


def recipe_config(backbone: str, dataset: str, overrides: Sequence[str] = (), profile: str = "paper") -> dict:
    """The resolved config of one recipe: cam.yaml ← cam_<dataset>.yaml ← the recipe file ← ``overrides``."""
    return load_method_config("cam", profile, dataset, list(overrides), extra_file=recipe_file(backbone, dataset))
