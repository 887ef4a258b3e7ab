"""TeD-Loc's own pretrained models: its frozen ViT encoders and the CLIP of its class anchors.

Joined to ``wsolbench.weights.CATALOGUE``; the method class names what it loads in ``pretrained``.
"""
from __future__ import annotations

from wsolbench.weightspec import WeightSpec

SPECS: tuple[WeightSpec, ...] = (
    WeightSpec("clip-vit-l14-openai", "open_clip", "ViT-L-14/openai",
               ("open_clip_model.safetensors|open_clip_pytorch_model.bin|ViT-L-14.pt",), "MIT",
               "OpenAI CLIP ViT-L/14 (TeD-Loc class-anchor text embeddings, optional)",
               hf_repo="timm/vit_large_patch14_clip_224.openai",
               url="https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
               size_gb=1.7),
    WeightSpec("eva01-large", "timm", "eva_large_patch14_196.in22k_ft_in22k_in1k",
               ("model.safetensors|pytorch_model.bin",), "MIT",
               "EVA-01 ViT-L/14 at 196 px (TeD-Loc's frozen encoder as the paper cites it; encoder.variant eva01-l-196)",
               hf_repo="timm/eva_large_patch14_196.in22k_ft_in22k_in1k", size_gb=1.2),
    WeightSpec("eva02-large", "timm", "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
               ("model.safetensors|pytorch_model.bin",), "MIT",
               "EVA-02 ViT-L/14 (TeD-Loc encoder.variant eva02-l-448; created with img_size=224 for 224 px input)",
               hf_repo="timm/eva02_large_patch14_448.mim_m38m_ft_in22k_in1k", size_gb=1.2),
)
