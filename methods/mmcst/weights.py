"""MMCST's own pretrained models: its ViT/DeiT backbones (its CLIP ViT-B/16 is shared with TeD-Loc).

Joined to ``wsolbench.weights.CATALOGUE``; the method class names what it loads in ``pretrained``.
"""
from __future__ import annotations

from wsolbench.weightspec import WeightSpec

SPECS: tuple[WeightSpec, ...] = (
    WeightSpec("vit-b16", "timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
               ("model.safetensors|pytorch_model.bin",), "Apache-2.0",
               "ViT-B/16 ImageNet-21k→1k (MMCST backbone)",
               hf_repo="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", size_gb=0.35),
    WeightSpec("deit-s16", "timm", "deit_small_patch16_224.fb_in1k",
               ("model.safetensors|pytorch_model.bin|deit_small_patch16_224-cd65a155.pth",), "Apache-2.0",
               "DeiT-S/16 (MCTformer's backbone; MMCST ablations)",
               hf_repo="timm/deit_small_patch16_224.fb_in1k",
               url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth", size_gb=0.09),
    WeightSpec("deit-b16", "timm", "deit_base_patch16_224.fb_in1k",
               ("model.safetensors|pytorch_model.bin|deit_base_patch16_224-b5f2ef4d.pth",), "Apache-2.0",
               "DeiT-B/16 (ViT-B/16 trained on ImageNet-1k only)",
               hf_repo="timm/deit_base_patch16_224.fb_in1k",
               url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth", size_gb=0.35),
)
