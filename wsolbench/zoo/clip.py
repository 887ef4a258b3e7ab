"""The zoo CLIP: a real ``open_clip`` CLIP (ViT image tower + text transformer) with a custom config.

* The configs are registered with open_clip under ``wsolbench-clip-micro`` / ``wsolbench-clip-tiny``
  (:func:`register_open_clip_configs`), so ``open_clip.create_model("wsolbench-clip-tiny")`` works.
* A trained CLIP is saved as an open_clip "local-dir" folder (``open_clip_config.json`` with
  ``model_cfg`` + ``preprocess_cfg``, and ``open_clip_model.safetensors``), exactly the layout of
  ``hf-hub:`` open_clip repositories, and reloads with ``open_clip.create_model("local-dir:<dir>")``.
* Tokenizer: open_clip's ``SimpleTokenizer`` over the scale's BPE merges file (``SPECS[scale]["tokenizer"]``:
  OpenAI's for micro, the synthetic world's reduced one for tiny, see :mod:`.tokenizers`), context length from
  the config (16 micro, 32 tiny). A saved CLIP folder carries its merges file (``bpe_simple_vocab.txt.gz``),
  so the tokenizer travels with the weights.
* Image input (what Grad-CAM / relevancy code needs): ``model.visual.image_size`` (H, W) (32 micro,
  64 tiny), ``model.visual.patch_size`` (8, 8) so the token grid is ``image_size // patch_size``
  (4x4 micro, 8x8 tiny); pixels in [0, 1] normalised with ``model.visual.preprocess_cfg["mean"/"std"]``
  (the OpenAI CLIP mean/std).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from .specs import OPENAI_MEAN, OPENAI_STD, check_scale, spec
from .tokenizers import clip_bpe_path

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
BPE_FILE = "bpe_simple_vocab.txt.gz"  # the model's BPE merges, in OpenAI's format
_REGISTERED: set[str] = set()


def model_name(scale: str) -> str:
    return f"wsolbench-clip-{check_scale(scale)}"


def preprocess_cfg(scale: str) -> dict[str, Any]:
    size = spec(scale, "clip")["vision_cfg"]["image_size"]
    return {"size": [size, size], "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def register_open_clip_configs() -> None:
    """Add the zoo configs to open_clip's model registry (public ``open_clip.add_model_config``)."""
    import open_clip

    from .specs import SCALES

    missing = [s for s in SCALES if model_name(s) not in _REGISTERED]
    if not missing:
        return
    directory = Path(tempfile.mkdtemp(prefix="wsolbench-open-clip-cfg-"))
    for scale in missing:
        (directory / f"{model_name(scale)}.json").write_text(json.dumps(spec(scale, "clip")), encoding="utf-8")
    open_clip.add_model_config(directory)
    _REGISTERED.update(model_name(s) for s in missing)


def create_clip(scale: str = "micro", seed: int | None = 0):
    """Random-init zoo CLIP (``open_clip.model.CLIP``) and its tokenizer."""
    import open_clip
    import torch

    register_open_clip_configs()
    if seed is not None:
        torch.manual_seed(seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns on the root logger that no weights were loaded: intended
    try:
        model = open_clip.create_model(model_name(scale), pretrained=None)
    finally:
        root.setLevel(level)
    model.visual.preprocess_cfg = dict(preprocess_cfg(scale))
    return model, _tokenizer(model_name(scale), clip_bpe_path(scale), spec(scale, "clip")["text_cfg"]["vocab_size"])


def _tokenizer(name: str, bpe_path: Path, vocab_size: int):
    """open_clip's tokenizer for ``name`` over ``bpe_path``, checked to fill the model's embedding table."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(name, bpe_path=str(bpe_path))
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{bpe_path}: {tokenizer.vocab_size} token ids but the CLIP text tower ({name}) has "
                         f"vocab_size {vocab_size}; rebuild the zoo (`wsolbench zoo build`)")
    return tokenizer


def save_clip(model, directory: str | Path, scale: str, extra: dict | None = None) -> Path:
    """Write an open_clip local-dir folder (config + safetensors + the scale's BPE merges file)."""
    import shutil

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": spec(scale, "clip"), "preprocess_cfg": preprocess_cfg(scale)}
    if extra:
        cfg["wsolbench"] = extra
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    shutil.copyfile(clip_bpe_path(scale), directory / BPE_FILE)
    return directory


def load_clip_dir(directory: str | Path, device: str = "cpu"):
    """Load a local-dir open_clip folder through open_clip's own ``local-dir:`` code path (eval mode)."""
    import open_clip

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not an open_clip local-dir folder)")
    model = open_clip.create_model(f"local-dir:{directory}", device=device)
    cfg = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    model.visual.preprocess_cfg = dict(cfg.get("preprocess_cfg", {}))
    bpe = directory / BPE_FILE if (directory / BPE_FILE).is_file() else clip_bpe_path()  # older folders: OpenAI's
    tokenizer = _tokenizer(f"local-dir:{directory}", bpe, cfg["model_cfg"]["text_cfg"]["vocab_size"])
    return model.eval(), tokenizer


# ------------------------------------------------------------------ open_clip text tower -> transformers
def text_encoder_config(scale: str):
    """The ``transformers.CLIPTextConfig`` matching the zoo CLIP's text tower."""
    from transformers import CLIPTextConfig

    t = spec(scale, "clip")["text_cfg"]
    bos, eos = t["vocab_size"] - 2, t["vocab_size"] - 1  # the two special tokens close the vocabulary
    return CLIPTextConfig(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                          num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                          max_position_embeddings=t["context_length"],
                          hidden_act="quick_gelu" if spec(scale, "clip").get("quick_gelu") else "gelu",
                          layer_norm_eps=1e-5, projection_dim=spec(scale, "clip")["embed_dim"],
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def open_clip_text_to_hf_state_dict(model) -> dict:
    """Map an open_clip text tower (``model.transformer``, ``token_embedding``, ...) to CLIPTextModel keys."""
    sd = model.state_dict()
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    n_layers = len(model.transformer.resblocks)
    for i in range(n_layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        w_q, w_k, w_v = sd[src + "attn.in_proj_weight"].chunk(3, dim=0)
        b_q, b_k, b_v = sd[src + "attn.in_proj_bias"].chunk(3, dim=0)
        out.update({
            dst + "self_attn.q_proj.weight": w_q, dst + "self_attn.q_proj.bias": b_q,
            dst + "self_attn.k_proj.weight": w_k, dst + "self_attn.k_proj.bias": b_k,
            dst + "self_attn.v_proj.weight": w_v, dst + "self_attn.v_proj.bias": b_v,
            dst + "self_attn.out_proj.weight": sd[src + "attn.out_proj.weight"],
            dst + "self_attn.out_proj.bias": sd[src + "attn.out_proj.bias"],
            dst + "layer_norm1.weight": sd[src + "ln_1.weight"], dst + "layer_norm1.bias": sd[src + "ln_1.bias"],
            dst + "layer_norm2.weight": sd[src + "ln_2.weight"], dst + "layer_norm2.bias": sd[src + "ln_2.bias"],
            dst + "mlp.fc1.weight": sd[src + "mlp.c_fc.weight"], dst + "mlp.fc1.bias": sd[src + "mlp.c_fc.bias"],
            dst + "mlp.fc2.weight": sd[src + "mlp.c_proj.weight"], dst + "mlp.fc2.bias": sd[src + "mlp.c_proj.bias"],
        })
    return {k: v.detach().clone() for k, v in out.items()}


def hf_text_encoder_from_open_clip(model, scale: str):
    """A ``transformers.CLIPTextModel`` carrying the open_clip CLIP's text tower weights.

    Its ``last_hidden_state`` equals open_clip's text transformer output after ``ln_final`` (before the
    pooling/projection): the conditioning Stable Diffusion takes from its CLIP text encoder.
    """
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(text_encoder_config(scale))
    state = open_clip_text_to_hf_state_dict(model)
    if not any(k.startswith("text_model.") for k in encoder.state_dict()):  # transformers >= 5 layout
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"open_clip -> CLIPTextModel conversion: missing {missing}, unexpected {unexpected}")
    return encoder.eval()
