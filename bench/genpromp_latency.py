"""Per-image latency of GenPromp's paper profile with random-initialised, full-size Stable Diffusion v1.4.

No download: the U-Net, VAE and CLIP text encoder are built from their published configs (written out below
as dicts) with random weights, the tokenizer is rebuilt offline from open_clip's BPE file, and the test-time
classifier is a random-init timm ``tf_efficientnet_b7`` at 600 px (the paper's EfficientNet-B7). Random
weights cost the same time as real ones. The timed call is ``GenPromp.localize`` exactly as the harness
calls it (PIL-like uint8 image in, classifier logits + GT-class map out), batch 1 by default, 512 px.

Reference: TeD-Loc Table 3 reports 272.9 ms/image on an A100 and 1133 M inference parameters (512 px, batch 1).

    python bench/genpromp_latency.py --dtype float16 --iters 30 --out latency.json

Without a GPU the script says so and measures nothing (a CPU time cannot stand beside the paper's A100
figure); ``--device cpu`` runs it anyway as a functional check, labelled as such.

Prints one line per configuration and a JSON summary (also written to ``--out``): total ms/image (mean,
median, p90), the parts (classifier, VAE encode, U-Net forwards with recording, prompt encoding when not
cached), parameter counts, peak GPU memory. ``--early-exit both`` times the recorder stopping the U-Net
after its last recorded layer and the full forward (the paper's cost).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4) component configs, as published.
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD14_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD14_TEXT = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD14_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1)


PAPER_MS = 272.9  # TeD-Loc Table 3: GenPromp ms/image on an A100, 512 px, batch 1


def build_sd14(seed: int = 0) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from wsolbench.zoo.tokenizers import make_clip_tokenizer

    torch.manual_seed(seed)
    return {"unet": UNet2DConditionModel(**SD14_UNET).eval(), "vae": AutoencoderKL(**SD14_VAE).eval(),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD14_TEXT)).eval(),
            "tokenizer": make_clip_tokenizer(77), "scheduler": DDPMScheduler(**SD14_SCHEDULER)}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cuda | cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="images per localize call (per-image time = call / batch)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--early-exit", default="both", choices=["on", "off", "both"])
    ap.add_argument("--classifier", default="tf_efficientnet_b7", help="timm model name, or 'none'")
    ap.add_argument("--classifier-size", type=int, default=600)
    ap.add_argument("--num-classes", type=int, default=200)
    ap.add_argument("--input-hw", default="375x500", help="size of the raw input images (HxW, uint8)")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from wsolbench.config import load_method_config
    from wsolbench.methods.genpromp.classifier import ModelClassifier
    from wsolbench.methods.genpromp.method import GenPromp

    if args.device == "auto":
        if not torch.cuda.is_available():
            print(f"[genpromp latency] no GPU here: nothing measured. The paper's figure is {PAPER_MS} ms/image on an "
                  f"A100 (512 px, batch 1); a CPU time is not comparable. --device cpu runs a functional check.")
            return {"device": "none", "reference_ms_a100": PAPER_MS, "runs": {}}
        args.device = "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --device cpu for a (slow) functional check")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    cfg = load_method_config("genpromp", profile="paper", dataset_key="cub")
    cfg["classifier"]["kind"] = "none"
    cfg["model"]["dtype"] = args.dtype
    cfg["model"]["image_size"] = args.image_size
    names = [f"{i:03d}.class_{i}" for i in range(args.num_classes)]
    t0 = time.time()
    comps = build_sd14()
    params = {k: n_params(comps[k]) for k in ("unet", "vae", "text_encoder")}
    method = GenPromp.from_config(cfg, class_names=names, device=args.device, components=comps)
    if args.classifier != "none":
        import timm

        clf = timm.create_model(args.classifier, pretrained=False, num_classes=args.num_classes)
        params["classifier"] = n_params(clf)
        clf = clf.to(dtype=getattr(torch, args.dtype)) if args.device.startswith("cuda") else clf
        method.classifier = _CastingClassifier(ModelClassifier(clf, args.classifier_size, (0.485, 0.456, 0.406),
                                                               (0.229, 0.224, 0.225), args.device),
                                               getattr(torch, args.dtype) if args.device.startswith("cuda")
                                               else torch.float32)
    build_s = time.time() - t0
    h, w = (int(v) for v in args.input_hw.split("x"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(args.batch)]
    labels = [int(i % args.num_classes) for i in range(args.batch)]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn, n):
        out = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t) * 1000 / args.batch)
        return out

    results = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
               "dtype": args.dtype, "batch": args.batch, "image_size": args.image_size,
               "params_m": {k: round(v / 1e6, 2) for k, v in params.items()},
               "params_total_m": round(sum(params.values()) / 1e6, 2), "build_s": round(build_s, 1),
               "reference_ms_a100": PAPER_MS, "comparable_to_paper": args.device.startswith("cuda")
               and args.batch == 1 and args.image_size == 512, "runs": {}}
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.early_exit]
    for early in modes:
        method.config["inference"]["early_exit"] = early
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        call = lambda: method.localize(images, classes=labels)  # noqa: E731
        timed(call, args.warmup)  # also fills the prompt cache (one f_c per class, as in a long run)
        total = timed(call, args.iters)
        pix = method.pixels(images)
        parts = {
            "classifier": timed(lambda: method.predict_logits(images), args.iters) if method.classifier else [0.0],
            "vae_encode": timed(lambda: method.encode_latents(pix.to(args.device), method._image_generators(pix)),
                                args.iters),
            "prompt_encode_uncached": timed(lambda: (method._cache.clear(), method.class_embedding(labels[0])),
                                            max(3, args.iters // 5)),
        }
        method._cache.clear()
        for c in labels:
            method.class_embedding(c)
        maps_only = timed(lambda: method._class_maps(images, [[c] for c in labels]), args.iters)
        row = {"total_ms": _stats(total), "ratio_to_paper": round(statistics.fmean(total) / PAPER_MS, 3),
               "maps_only_ms": _stats(maps_only),
               **{f"{k}_ms": _stats(v) for k, v in parts.items()}}
        if args.device.startswith("cuda"):
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        key = "early_exit" if early else "full_unet"
        results["runs"][key] = row
        print(f"[genpromp latency] {key}: {row['total_ms']['mean']:.1f} ms/image (median "
              f"{row['total_ms']['median']:.1f}; maps {row['maps_only_ms']['mean']:.1f}, classifier "
              f"{row['classifier_ms']['mean']:.1f}, VAE {row['vae_encode_ms']['mean']:.1f}) on {results['device']} "
              f"{args.dtype}, batch {args.batch}, {args.image_size} px; x{row['ratio_to_paper']} the paper's "
              f"{PAPER_MS} ms on an A100" + ("" if results["comparable_to_paper"] else " (NOT comparable: "
                                            "CPU or another batch/size)"), flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


class _CastingClassifier:
    """Feeds the half-precision classifier half-precision inputs."""

    def __init__(self, inner, dtype) -> None:
        self.inner, self.dtype = inner, dtype

    def __call__(self, images, image_ids=None):
        import torch

        from wsolbench.imaging import to_batch

        x = to_batch(images, self.inner.size, self.inner.mean, self.inner.std).to(self.inner.device, self.dtype)
        with torch.no_grad():
            return self.inner.model(x).float().cpu()


def _stats(v: list[float]) -> dict:
    s = sorted(v)
    return {"mean": round(statistics.fmean(s), 2), "median": round(statistics.median(s), 2),
            "p90": round(s[min(len(s) - 1, int(0.9 * len(s)))], 2), "n": len(s)}


if __name__ == "__main__":
    main()
