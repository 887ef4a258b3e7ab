"""Weight conversions between the libraries' ViT layouts, so one pretrained ViT trunk can seed others.

The zoo trains one timm ``VisionTransformer`` (class token, pre-norm blocks, GELU) and copies it into
* the zoo CLIP's image tower (open_clip ``VisionTransformer`` built with ``no_ln_pre``): exact, the patch
  bias folded into the patch positions' positional embedding (open_clip's ``conv1`` has no bias);
* the zoo BLIP captioner's vision encoder (``transformers`` ``BlipVisionModel``): exact.
Both towers are then trained further with their own objectives (contrastive / captioning), as real BLIP
starts from an ImageNet ViT.
"""
from __future__ import annotations

import torch


def timm_vit_to_open_clip_visual(vit, visual) -> None:
    """Copy a timm ViT's trunk into an open_clip ``VisionTransformer`` in place (``proj`` is left as is)."""
    sd = vit.state_dict()
    if not isinstance(visual.ln_pre, torch.nn.Identity):
        raise ValueError("the open_clip tower must be built with no_ln_pre=True to match a timm ViT")
    D = sd["cls_token"].shape[-1]
    pos = sd["pos_embed"][0].clone()
    pos[1:] += sd["patch_embed.proj.bias"]  # conv1 has no bias: fold it into the patch positions
    out = {"class_embedding": sd["cls_token"].reshape(D) + 0.0, "positional_embedding": pos,
           "conv1.weight": sd["patch_embed.proj.weight"], "ln_post.weight": sd["norm.weight"],
           "ln_post.bias": sd["norm.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        s, d = f"blocks.{i}.", f"transformer.resblocks.{i}."
        out.update({d + "ln_1.weight": sd[s + "norm1.weight"], d + "ln_1.bias": sd[s + "norm1.bias"],
                    d + "attn.in_proj_weight": sd[s + "attn.qkv.weight"], d + "attn.in_proj_bias": sd[s + "attn.qkv.bias"],
                    d + "attn.out_proj.weight": sd[s + "attn.proj.weight"], d + "attn.out_proj.bias": sd[s + "attn.proj.bias"],
                    d + "ln_2.weight": sd[s + "norm2.weight"], d + "ln_2.bias": sd[s + "norm2.bias"],
                    d + "mlp.c_fc.weight": sd[s + "mlp.fc1.weight"], d + "mlp.c_fc.bias": sd[s + "mlp.fc1.bias"],
                    d + "mlp.c_proj.weight": sd[s + "mlp.fc2.weight"], d + "mlp.c_proj.bias": sd[s + "mlp.fc2.bias"]})
        i += 1
    missing, unexpected = visual.load_state_dict(out, strict=False)
    missing = [k for k in missing if k != "proj"]
    if missing or unexpected:
        raise RuntimeError(f"timm ViT -> open_clip: missing {missing}, unexpected {unexpected}")


def timm_vit_to_blip_vision(vit, vision_model) -> None:
    """Copy a timm ViT's trunk into a ``transformers`` ``BlipVisionModel`` in place."""
    sd = vit.state_dict()
    out = {"embeddings.class_embedding": sd["cls_token"], "embeddings.position_embedding": sd["pos_embed"],
           "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": sd["patch_embed.proj.bias"],
           "post_layernorm.weight": sd["norm.weight"], "post_layernorm.bias": sd["norm.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        s, d = f"blocks.{i}.", f"encoder.layers.{i}."
        out.update({d + "layer_norm1.weight": sd[s + "norm1.weight"], d + "layer_norm1.bias": sd[s + "norm1.bias"],
                    d + "self_attn.qkv.weight": sd[s + "attn.qkv.weight"], d + "self_attn.qkv.bias": sd[s + "attn.qkv.bias"],
                    d + "self_attn.projection.weight": sd[s + "attn.proj.weight"],
                    d + "self_attn.projection.bias": sd[s + "attn.proj.bias"],
                    d + "layer_norm2.weight": sd[s + "norm2.weight"], d + "layer_norm2.bias": sd[s + "norm2.bias"],
                    d + "mlp.fc1.weight": sd[s + "mlp.fc1.weight"], d + "mlp.fc1.bias": sd[s + "mlp.fc1.bias"],
                    d + "mlp.fc2.weight": sd[s + "mlp.fc2.weight"], d + "mlp.fc2.bias": sd[s + "mlp.fc2.bias"]})
        i += 1
    missing, unexpected = vision_model.load_state_dict(out, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"timm ViT -> BLIP vision: missing {missing}, unexpected {unexpected}")
