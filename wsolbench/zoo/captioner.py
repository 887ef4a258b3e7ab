"""The zoo captioner: a real ``transformers.BlipForConditionalGeneration`` + ``BlipProcessor``.

The processor's tokenizer is a ``BertTokenizer`` over a small WordPiece ``vocab.txt`` (BLIP's special
tokens ``[PAD]=0 [UNK] [CLS] [SEP] [MASK] [DEC]``, caption words, single characters), written locally, so
it loads offline; BLIP's generation conventions are kept: the decoder starts from ``[DEC]``
(``text_config.bos_token_id``) and stops at ``[SEP]`` (``text_config.sep_token_id``). Images: RGB,
resized to ``processor.image_processor.size`` (32 micro, 64 tiny), OpenAI CLIP mean/std (as BLIP).
Trained on crops of single synthetic objects with their phrase ("a red striped star").
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .specs import OPENAI_MEAN, OPENAI_STD, check_scale, spec


def world_words() -> list[str]:
    """Every word of the synthetic world's phrases and captions (class names, colours, textures)."""
    try:
        from wsolbench.datasets import synthetic as syn
    except ImportError:  # the renderer is optional for creating a random-init captioner
        return []
    words = set(syn.CLASS_NAMES) | set(getattr(syn, "COLORS", ())) | set(getattr(syn, "TEXTURES", ()))
    for seed in range(8):  # caption templates' words
        scene = syn.render_scene(seed, size=(32, 32), n_objects=2)
        for text in [scene.caption] + [o.phrase for o in scene.objects]:
            words.update(text.replace(",", " ").lower().split())
    return sorted(words)


def make_processor(scale: str, directory: str | Path | None = None):
    """A ``BlipProcessor`` whose tokenizer vocabulary is written to ``directory`` (a temp dir if None)."""
    from transformers import BlipImageProcessor, BlipProcessor

    from .tokenizers import make_bert_tokenizer, write_bert_vocab

    size = spec(scale, "captioner")["image_size"]
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="wsolbench-blip-tok-"))
    write_bert_vocab(directory, world_words())
    tokenizer = make_bert_tokenizer(directory)
    image_processor = BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(OPENAI_MEAN),
                                         image_std=list(OPENAI_STD), do_resize=True, do_normalize=True,
                                         do_rescale=True, resample=3, do_convert_rgb=True)
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def blip_config(scale: str, tokenizer):
    from transformers import BlipConfig

    s = spec(scale, "captioner")
    vision = dict(hidden_size=s["vision_width"], intermediate_size=int(s["vision_mlp_ratio"] * s["vision_width"]),
                  num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                  image_size=s["image_size"], patch_size=s["patch_size"], projection_dim=s["vision_width"],
                  initializer_range=0.02)
    text = dict(vocab_size=len(tokenizer), hidden_size=s["text_width"], encoder_hidden_size=s["vision_width"],
                intermediate_size=4 * s["text_width"], num_hidden_layers=s["text_layers"],
                num_attention_heads=s["text_heads"], max_position_embeddings=s["max_length"] + 8,
                projection_dim=s["text_width"], pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=s["text_width"])


def create_captioner(scale: str = "micro", seed: int | None = 0, tokenizer_dir: str | Path | None = None):
    """Random-init ``BlipForConditionalGeneration`` and its ``BlipProcessor`` (offline tokenizer)."""
    import torch
    from transformers import BlipForConditionalGeneration

    check_scale(scale)
    processor = make_processor(scale, tokenizer_dir)
    if seed is not None:
        torch.manual_seed(seed)
    model = BlipForConditionalGeneration(blip_config(scale, processor.tokenizer))
    return model, processor


def save_captioner(model, processor, directory: str | Path) -> Path:
    from .tokenizers import clear_call_state

    directory = Path(directory)
    clear_call_state(processor.tokenizer)
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def load_captioner_dir(directory: str | Path, device: str = "cpu"):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(str(directory), local_files_only=True)
    processor = BlipProcessor.from_pretrained(str(directory), local_files_only=True)
    return model.to(device).eval(), processor


def caption(model, processor, images, max_new_tokens: int = 8, num_beams: int = 1) -> list[str]:
    """Greedy/beam captions of a list of PIL images or H×W×3 uint8 arrays."""
    import torch

    inputs = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(pixel_values=inputs["pixel_values"].to(model.device), max_new_tokens=max_new_tokens,
                             num_beams=num_beams, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
