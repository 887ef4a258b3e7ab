"""The zoo latent diffusion model, in the diffusers layout of ``CompVis/stable-diffusion-v1-4``.

Components (``create_diffusion_components``): ``vae`` (``AutoencoderKL``, 4x spatial reduction, 4 latent
channels), ``unet`` (``UNet2DConditionModel``: two resolutions, cross-attention in every down/up block
and the mid block, so attention maps exist at the latent resolution and half of it: 16x16 and 8x8 for the
tiny zoo's 64 px images / 16x16 latents, 8x8 and 4x4 for micro), ``text_encoder``
(``transformers.CLIPTextModel``; in the built zoo it is the zoo CLIP's text tower, frozen, as SD uses
OpenAI CLIP's), ``tokenizer`` (``transformers.CLIPTokenizer`` rebuilt offline from the scale's BPE merges file, the zoo
CLIP's: OpenAI's for micro, ids identical to SD's; the synthetic world's reduced one for tiny) and ``scheduler`` (``DDPMScheduler`` with SD's scaled-linear betas, 1000 steps).

On disk (``diffusion_dir``): ``vae/ unet/ text_encoder/ tokenizer/ scheduler/`` plus
``model_index.json``, each loadable with ``<Class>.from_pretrained(dir, subfolder=...)``. Latents are
``vae.encode(x).latent_dist.sample() * vae.config.scaling_factor`` with pixels in [-1, 1]; the scaling
factor is measured on the synthetic images at build time (SD's is 0.18215).
"""
from __future__ import annotations

import json
from pathlib import Path

from .specs import check_scale, spec

SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def image_size(scale: str) -> int:
    return spec(scale, "vae")["sample_size"]


def create_vae(scale: str = "micro"):
    from diffusers import AutoencoderKL

    s = spec(scale, "vae")
    n = len(s["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(s["block_out_channels"]),
                         layers_per_block=s["layers_per_block"], latent_channels=s["latent_channels"],
                         norm_num_groups=s["norm_num_groups"], sample_size=s["sample_size"],
                         scaling_factor=0.18215)


def create_unet(scale: str = "micro"):
    from diffusers import UNet2DConditionModel

    s = spec(scale, "unet")
    n = len(s["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=s["sample_size"], in_channels=spec(scale, "vae")["latent_channels"],
        out_channels=spec(scale, "vae")["latent_channels"], layers_per_block=s["layers_per_block"],
        block_out_channels=tuple(s["block_out_channels"]), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=spec(scale, "clip")["text_cfg"]["width"], attention_head_dim=s["attention_head_dim"],
        norm_num_groups=s["norm_num_groups"])


def create_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1)


def create_tokenizer(scale: str = "micro"):
    from .tokenizers import clip_bpe_path, make_clip_tokenizer

    return make_clip_tokenizer(spec(scale, "clip")["text_cfg"]["context_length"], clip_bpe_path(scale))


def create_text_encoder(scale: str = "micro"):
    from transformers import CLIPTextModel

    from .clip import text_encoder_config

    return CLIPTextModel(text_encoder_config(scale)).eval()


def create_diffusion_components(scale: str = "micro", seed: int | None = 0) -> dict:
    """Random-init components (keys vae, unet, text_encoder, tokenizer, scheduler)."""
    import torch

    check_scale(scale)
    if seed is not None:
        torch.manual_seed(seed)
    return {"vae": create_vae(scale), "unet": create_unet(scale), "text_encoder": create_text_encoder(scale),
            "tokenizer": create_tokenizer(scale), "scheduler": create_scheduler()}


def save_diffusion(components: dict, directory: str | Path, scale: str) -> Path:
    """``save_pretrained`` every component into its subfolder (safetensors) and write model_index.json."""
    from .tokenizers import clear_call_state, clip_bpe_path, write_clip_bpe_files

    directory = Path(directory)
    clear_call_state(components["tokenizer"])
    for name in SUBFOLDERS:
        components[name].save_pretrained(str(directory / name))
    # vocab.json + merges.txt, as in SD's tokenizer folder
    write_clip_bpe_files(directory / "tokenizer", clip_bpe_path(scale))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _version("diffusers"),
             "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return directory


def load_diffusion(directory: str | Path, device: str = "cpu") -> dict:
    """Load every component with its library's ``from_pretrained(dir, subfolder=...)`` (offline)."""
    from wsolbench.weights import load_diffusers_folder

    parts = load_diffusers_folder(directory)
    for name in ("vae", "unet", "text_encoder"):
        parts[name] = parts[name].to(device).eval()
    return parts


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
