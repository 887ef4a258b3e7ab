"""WWbL's own pretrained models: its frozen CLIP ViT-B/32 and the BLIP captioner of its open-world mode.

Joined to ``wsolbench.weights.CATALOGUE``; the method class names what it loads in ``pretrained``.
"""
from __future__ import annotations

from wsolbench.weightspec import WeightSpec

SPECS: tuple[WeightSpec, ...] = (
    WeightSpec("clip-vit-b32-openai", "open_clip", "ViT-B-32/openai",
               ("open_clip_model.safetensors|open_clip_pytorch_model.bin|ViT-B-32.pt",), "MIT",
               "OpenAI CLIP ViT-B/32 (WWbL's frozen CLIP: losses, relevancy maps, text embeddings)",
               hf_repo="timm/vit_base_patch32_clip_224.openai",
               url="https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
               size_gb=0.6),
    WeightSpec("blip-caption-base", "transformers", "Salesforce/blip-image-captioning-base",
               ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.txt",
                "model.safetensors|pytorch_model.bin"), "BSD-3-Clause",
               "BLIP captioning, ViT-B, CapFilt-large (WWbL's proposal captions)",
               hf_repo="Salesforce/blip-image-captioning-base", size_gb=0.99,
               extra={"allow_patterns": ["*.json", "*.txt", "model.safetensors"]}),
)
