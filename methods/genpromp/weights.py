"""GenPromp's own pretrained models: Stable Diffusion v1.4 and its test-time classifier.

Joined to ``wsolbench.weights.CATALOGUE``; the method class names what it loads in ``pretrained``.
"""
from __future__ import annotations

from wsolbench.weightspec import WeightSpec

_SD_FILES = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
             "unet/config.json", "vae/config.json")
_SD_WEIGHTS = ("text_encoder/model.safetensors|text_encoder/pytorch_model.bin",
               "unet/diffusion_pytorch_model.safetensors|unet/diffusion_pytorch_model.bin",
               "vae/diffusion_pytorch_model.safetensors|vae/diffusion_pytorch_model.bin")

SPECS: tuple[WeightSpec, ...] = (
    WeightSpec("sd-v1-4", "diffusers", "CompVis/stable-diffusion-v1-4", _SD_FILES + _SD_WEIGHTS,
               "CreativeML OpenRAIL-M",
               "Stable Diffusion v1.4 (VAE, U-Net, CLIP ViT-L/14 text encoder, tokenizer, DDPM scheduler)",
               hf_repo="CompVis/stable-diffusion-v1-4", size_gb=5.2,
               notes="accept the licence on the model page and `hf auth login` first",
               extra={"allow_patterns": ["model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json",
                                         "text_encoder/model.safetensors", "unet/config.json",
                                         "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                                         "vae/diffusion_pytorch_model.safetensors"]}),
    WeightSpec("efficientnet-b7", "timm", "tf_efficientnet_b7.ns_jft_in1k",
               ("model.safetensors|pytorch_model.bin|tf_efficientnet_b7_ns-1dbc32de.pth",), "Apache-2.0",
               "EfficientNet-B7 Noisy Student (GenPromp's test-time classifier)",
               hf_repo="timm/tf_efficientnet_b7.ns_jft_in1k",
               url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_efficientnet_b7_ns-1dbc32de.pth",
               size_gb=0.27),
)
