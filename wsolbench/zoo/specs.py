"""Sizes of every zoo model at each scale (``micro`` for tests, ``tiny`` for the CPU zoo).

All numbers that other modules need (image sizes, widths, strides) are read from here, so the methods can
ask instead of hard-coding: e.g. ``SPECS["tiny"]["clip"]["vision_cfg"]["image_size"]``.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SCALES = ("micro", "tiny")

SPECS: dict[str, dict[str, Any]] = {
    "micro": {
        "clip": {  # open_clip model_cfg
            "embed_dim": 32,
            "quick_gelu": False,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                           "mlp_ratio": 4.0, "no_ln_pre": True},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "tokenizer": {"bpe": "openai"},  # OpenAI CLIP's BPE (open_clip's bundled file): 49,408 ids
        "vae": {"sample_size": 32, "block_out_channels": (8, 16, 16), "layers_per_block": 1,
                "latent_channels": 4, "norm_num_groups": 4},
        "unet": {"sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1,
                 "attention_head_dim": 2, "norm_num_groups": 8},
        "captioner": {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
                      "vision_heads": 2, "vision_mlp_ratio": 4.0, "text_width": 32, "text_layers": 1, "text_heads": 2,
                      "max_length": 16},
        "vit": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                "mlp_ratio": 4.0},
        "vgg": {"img_size": 32, "cfg": (4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 16, 16, 16, "M", 16, 16, 16, "M"),
                "mlp_ratio": 1 / 256},
        "classifier": {"img_size": 32, "layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16), "stem_width": 8},
    },
    "tiny": {
        "clip": {
            "embed_dim": 128,
            "quick_gelu": False,
            "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8,
                           "mlp_ratio": 4.0, "no_ln_pre": True},
            # vocab_size: 512 byte symbols + the 232 OpenAI merges the synthetic world uses + 2 specials
            # (tokenizers.WORLD_BPE; the full 49,408-row embedding was 25 of the model's 29 MB)
            "text_cfg": {"context_length": 32, "vocab_size": 746, "width": 128, "heads": 4, "layers": 3},
        },
        "tokenizer": {"bpe": "synthetic-world"},  # tokenizers.WORLD_BPE: OpenAI's merges the world's words use
        "vae": {"sample_size": 64, "block_out_channels": (16, 32, 64), "layers_per_block": 1,
                "latent_channels": 4, "norm_num_groups": 8},
        "unet": {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                 "attention_head_dim": 4, "norm_num_groups": 16},
        "captioner": {"image_size": 64, "patch_size": 8, "vision_width": 64, "vision_layers": 4,
                      "vision_heads": 4, "vision_mlp_ratio": 4.0, "text_width": 96, "text_layers": 2, "text_heads": 4,
                      "max_length": 16},
        "vit": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4,
                "mlp_ratio": 4.0},
        "vgg": {"img_size": 64,
                "cfg": (8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"),
                "mlp_ratio": 1 / 64},
        "classifier": {"img_size": 64, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16},
    },
}


def check_scale(scale: str) -> str:
    if scale not in SPECS:
        raise ValueError(f"unknown zoo scale {scale!r}; choose one of {', '.join(SCALES)}")
    return scale


def spec(scale: str, model: str) -> dict[str, Any]:
    """A copy of the size spec of ``model`` ("clip", "vae", "unet", ...) at ``scale``."""
    return deepcopy(SPECS[check_scale(scale)][model])
