"""The synthetic-world zoo: factories, offline tokenizers, save/reload through the real library APIs, and a
micro zoo built inside the test suite."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from wsolbench import zoo  # noqa: E402


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    """The whole micro zoo, built once for this module (seconds)."""
    root = tmp_path_factory.mktemp("zoo") / "micro"
    results = zoo.build_zoo("micro", out=root, seed=0, progress=False)
    return root, results


# --------------------------------------------------------------------------------------- tokenizers
def test_clip_tokenizer_offline_matches_open_clip(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import open_clip
    from transformers import CLIPTokenizer

    from wsolbench.zoo.tokenizers import make_clip_tokenizer, write_clip_bpe_files

    tok = make_clip_tokenizer(77)
    ref = open_clip.SimpleTokenizer()
    for text in ("a photo of a goldfish", "A red striped star, and a blue ring!", "an electric ray"):
        assert tok(text)["input_ids"] == [49406] + ref.encode(text) + [49407]
    assert len(tok) == 49408 and tok.pad_token == "<|endoftext|>"
    vocab, merges = write_clip_bpe_files(tmp_path)
    tok2 = CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    assert tok2("a photo of a dog")["input_ids"] == tok("a photo of a dog")["input_ids"]
    tok.save_pretrained(tmp_path / "saved")
    tok3 = CLIPTokenizer.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert tok3("a photo of a dog")["input_ids"] == tok("a photo of a dog")["input_ids"]
    assert tok3.add_tokens(["<cub-0>"]) == 1 and tok3.convert_tokens_to_ids("<cub-0>") == 49408


def test_blip_tokenizer_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, processor = zoo.create_captioner("micro")
    tok = processor.tokenizer
    ids = tok("a red striped star")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "striped", "star", "[SEP]"]
    assert tok.convert_tokens_to_ids("[DEC]") == 5 and tok.pad_token_id == 0


# ---------------------------------------------------------------------------------------- factories
def test_create_clip_is_registered_open_clip():
    import open_clip

    model, tok = zoo.create_clip("micro")
    assert isinstance(model, open_clip.model.CLIP)
    assert "wsolbench-clip-micro" in open_clip.list_models()
    assert model.visual.image_size == (32, 32) and model.visual.patch_size == (8, 8)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(x).shape == model.encode_text(tok(["a star", "a ring"])).shape == (2, 32)
    same, _ = zoo.create_clip("micro")
    assert _same_state(model, same)  # deterministic by seed


def test_diffusion_components_and_two_attention_scales():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    c = zoo.create_diffusion_components("micro")
    assert isinstance(c["vae"], AutoencoderKL) and isinstance(c["unet"], UNet2DConditionModel)
    assert isinstance(c["text_encoder"], CLIPTextModel) and isinstance(c["tokenizer"], CLIPTokenizer)
    assert isinstance(c["scheduler"], DDPMScheduler)
    seen = []

    class Record:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            if encoder_hidden_states is not None:
                seen.append(hidden_states.shape[1])
            from diffusers.models.attention_processor import AttnProcessor

            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask)

    c["unet"].set_attn_processor(Record())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    ids = c["tokenizer"](["a photo of a star"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        z = c["vae"].encode(x).latent_dist.mean
        h = c["text_encoder"](ids).last_hidden_state
        out = c["unet"](z, torch.tensor([1]), encoder_hidden_states=h).sample
    assert z.shape == out.shape == (1, 4, 8, 8)
    assert set(seen) == {64, 16}  # cross-attention at 8x8 and 4x4 latents


def test_backbones_are_timm_models():
    import timm

    vit = zoo.create_backbone("vit", "micro", num_classes=10)
    assert isinstance(vit, timm.models.vision_transformer.VisionTransformer) and vit.cls_token is not None
    assert vit.patch_embed.grid_size == (4, 4)
    vgg = zoo.create_backbone("vgg", "micro")
    assert vgg.features[:23](torch.rand(1, 3, 32, 32)).shape[-1] == 4  # relu4_3 at stride 8, as VGG16
    assert "wsolbench_classifier_tiny" in timm.list_models("wsolbench_*")
    with pytest.raises(ValueError, match="unknown backbone kind"):
        zoo.create_backbone("resnet", "micro")


def test_clip_text_tower_converts_exactly_to_transformers():
    from wsolbench.zoo.clip import hf_text_encoder_from_open_clip
    from wsolbench.zoo.tokenizers import make_clip_tokenizer

    model, tok = zoo.create_clip("micro", seed=3)
    enc = hf_text_encoder_from_open_clip(model, "micro")
    texts = ["a red striped star", "a photo of a ring"]
    ids = make_clip_tokenizer(16)(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    t = tok(texts)
    with torch.no_grad():
        hf = enc(ids).last_hidden_state
        x = model.ln_final(model.transformer(model.token_embedding(t) + model.positional_embedding,
                                             attn_mask=model.attn_mask))
    n = int((t[0] != 0).sum())  # tokens up to and including <|endoftext|> agree (padding differs)
    assert torch.allclose(hf[0, :n], x[0, :n], atol=1e-5)


# ----------------------------------------------------------------- save / reload through real APIs
def test_save_reload_bit_identical(tmp_path):
    import open_clip
    import timm
    from diffusers import UNet2DConditionModel

    from wsolbench.zoo import backbones, captioner, clip, diffusion

    m, _ = zoo.create_clip("micro", seed=1)
    clip.save_clip(m, tmp_path / "clip", "micro")
    m2, tok2 = clip.load_clip_dir(tmp_path / "clip")
    assert _same_state(m, m2)
    m3 = open_clip.create_model("wsolbench-clip-micro", pretrained=str(tmp_path / "clip" / clip.WEIGHTS_FILE))
    assert _same_state(m, m3)

    comps = zoo.create_diffusion_components("micro", seed=1)
    diffusion.save_diffusion(comps, tmp_path / "sd")
    back = diffusion.load_diffusion(tmp_path / "sd")
    for k in ("vae", "unet", "text_encoder"):
        assert _same_state(comps[k], back[k]), k
    assert back["scheduler"].config.beta_schedule == "scaled_linear"
    assert back["tokenizer"]("a star")["input_ids"] == comps["tokenizer"]("a star")["input_ids"]
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet", local_files_only=True)
    assert _same_state(comps["unet"], unet)

    cap, proc = zoo.create_captioner("micro", seed=1)
    captioner.save_captioner(cap, proc, tmp_path / "cap")
    cap2, proc2 = captioner.load_captioner_dir(tmp_path / "cap")
    assert _same_state(cap, cap2) and proc2.tokenizer.get_vocab() == proc.tokenizer.get_vocab()

    for kind in ("vit", "vgg", "classifier"):
        b = zoo.create_backbone(kind, "micro", num_classes=10, seed=1)
        backbones.save_backbone(b, tmp_path / kind)
        assert _same_state(b, backbones.load_backbone_dir(tmp_path / kind))
        b3 = timm.create_model(f"wsolbench_{kind}_micro", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / kind / "model.safetensors")))
        assert _same_state(b, b3)


# ---------------------------------------------------------------------------------- the micro zoo
def test_micro_zoo_layout_and_manifest(micro_zoo):
    root, results = micro_zoo
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["scale"] == "micro" and set(manifest["models"]) == set(zoo.MODELS)
    for name in zoo.MODELS:
        assert name in results and manifest["models"][name]["seed"] == 0
    for rel in ("clip/open_clip_config.json", "clip/open_clip_model.safetensors", "diffusion/model_index.json",
                "diffusion/unet/diffusion_pytorch_model.safetensors", "diffusion/tokenizer/vocab.json",
                "diffusion/scheduler/scheduler_config.json", "captioner/model.safetensors",
                "backbones/vit/model.safetensors", "backbones/vgg/config.json",
                "backbones/classifier/model.safetensors"):
        assert (root / rel).is_file(), rel
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pth"))  # safetensors only
    st = zoo.zoo_status("micro", root=root)
    assert all(v["built"] for v in st.values())


def test_micro_zoo_loads_through_library_apis(micro_zoo):
    root, _ = micro_zoo
    model, tok = zoo.load_clip("micro", root=root)
    assert not model.training and model.visual.preprocess_cfg["mean"][0] == pytest.approx(0.48145466)
    comps = zoo.load_diffusion_components("micro", root=root)
    assert comps["vae"].config.scaling_factor != 0.18215  # measured on the synthetic images
    # the diffusion text encoder is the zoo CLIP's text tower
    from wsolbench.zoo.clip import open_clip_text_to_hf_state_dict

    ref = open_clip_text_to_hf_state_dict(model)
    te = comps["text_encoder"].state_dict()
    key = "embeddings.token_embedding.weight"
    te_key = key if key in te else "text_model." + key
    assert torch.equal(te[te_key], ref["text_model." + key])
    cap, proc = zoo.load_captioner("micro", root=root)
    from wsolbench.zoo.captioner import caption

    import numpy as np

    assert isinstance(caption(cap, proc, [np.zeros((20, 20, 3), np.uint8)])[0], str)
    for kind in ("vit", "vgg", "classifier"):
        b = zoo.load_backbone(kind, "micro", root=root)
        assert b(torch.rand(1, 3, 32, 32)).shape == (1, 10)
        assert zoo.load_backbone(kind, "micro", root=root, num_classes=0)(torch.rand(1, 3, 32, 32)).ndim == 2


LOAD_EVERY_MODEL = """
import json
import sys
from wsolbench import zoo
root = sys.argv[1]
zoo.load_clip("micro", root=root)
zoo.load_diffusion_components("micro", root=root)
zoo.load_captioner("micro", root=root)
for kind in ("vit", "vgg", "classifier"):
    zoo.load_backbone(kind, "micro", root=root)
zoo.zoo_status("micro", root=root)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("wsolbench.zoo"))))
"""


def test_loading_the_zoo_does_not_import_the_builder(micro_zoo):
    """The trainer (``wsolbench.zoo.builder``) is imported only when building (issue 26 item 4)."""
    import os
    import subprocess
    import sys

    root, _ = micro_zoo
    out = subprocess.run([sys.executable, "-c", LOAD_EVERY_MODEL, str(root)], capture_output=True, text=True,
                         check=True, env={**os.environ, zoo.AUTOBUILD_ENV: "1"}).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "wsolbench.zoo.clip" in loaded and "wsolbench.zoo.diffusion" in loaded  # it did load them
    assert not [m for m in loaded if m.startswith("wsolbench.zoo.builder")], loaded


def test_build_is_deterministic_and_tracks_dependencies(micro_zoo, tmp_path):
    root, _ = micro_zoo
    zoo.build_zoo("micro", out=tmp_path, seed=0, models=["vit"], progress=False)
    for rel in ("backbones/vit/model.safetensors", "backbones/classifier/model.safetensors"):
        assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes()  # the teacher came along
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["models"]) == {"classifier", "vit"} and manifest["models"]["vit"]["built_from"] == ["classifier"]


def test_vit_trunk_converts_exactly_to_clip_and_blip():
    from wsolbench.zoo.builder.convert import timm_vit_to_blip_vision, timm_vit_to_open_clip_visual

    vit = zoo.create_backbone("vit", "micro", num_classes=10, seed=2)
    clip, _ = zoo.create_clip("micro")
    cap, _ = zoo.create_captioner("micro")
    timm_vit_to_open_clip_visual(vit, clip.visual)
    timm_vit_to_blip_vision(vit, cap.vision_model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        assert torch.allclose(clip.visual(x), tokens[:, 0] @ clip.visual.proj, atol=1e-5)
        assert torch.allclose(cap.vision_model(pixel_values=x).last_hidden_state, tokens, atol=1e-5)


def test_ensure_zoo_builds_missing_or_names_the_command(isolated_env, monkeypatch, capsys):
    monkeypatch.setenv(zoo.AUTOBUILD_ENV, "0")
    with pytest.raises(zoo.ZooMissingError, match="wsolbench zoo build --scale micro --models vgg"):
        zoo.load_backbone("vgg", "micro")
    monkeypatch.setenv(zoo.AUTOBUILD_ENV, "1")
    root = zoo.ensure_zoo("micro", ["vgg"])
    assert root == isolated_env / "cache" / "zoo" / "micro"
    assert "building the micro zoo models classifier, vgg" in capsys.readouterr().out  # vgg is distilled
    assert zoo.zoo_status("micro")["vgg"]["built"] and not zoo.zoo_status("micro")["vit"]["built"]
    assert zoo.ensure_zoo("micro", ["vgg"]) == root  # already built: nothing to do
    assert "building" not in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["models"]["vgg"]["recipe"] = "older"  # built by another version of the recipe: stale
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert zoo.zoo_status("micro")["vgg"]["stale"]
    zoo.ensure_zoo("micro", ["vgg"])
    assert "building the micro zoo models vgg " in capsys.readouterr().out  # the classifier is still fresh
    assert not zoo.zoo_status("micro")["vgg"]["stale"]
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.ensure_zoo("micro", ["nope"])
    with pytest.raises(ValueError, match="unknown zoo scale"):
        zoo.zoo_root("huge")


def test_mimetic_init_sets_attention_and_value_products():
    """Per head W_q W_kᵀ leans to +identity (a rank-d_h share of a·Z + b·I) and W_v W_proj is exactly a·Z − b·I
    (full rank), so its diagonal averages −b."""
    import torch

    from wsolbench.zoo.backbones import mimetic_init

    torch.manual_seed(0)
    vit = zoo.create_backbone("vit", "tiny", num_classes=0, seed=0)
    mimetic_init(vit, attn_scale=(0.7, 0.7), value_scale=(0.4, 0.4))
    attn = vit.blocks[0].attn
    dim, heads = attn.qkv.in_features, attn.num_heads
    dh = dim // heads
    w = attn.qkv.weight.detach()
    for h in range(heads):
        qk = w[h * dh:(h + 1) * dh].T @ w[dim + h * dh:dim + (h + 1) * dh]
        assert torch.diagonal(qk).mean() > 0.05
    vp = w[2 * dim:].T @ attn.proj.weight.detach().T
    assert abs(float(torch.diagonal(vp).mean()) + 0.4) < 0.06
    off = vp - torch.diag(torch.diagonal(vp))
    assert 0.2 < float(off.std() * dim ** 0.5) < 0.6  # the a·Z part, std a/sqrt(dim)


def test_build_command_models_parse_back():
    """The command the errors print (`--models vit,clip`) is accepted as the CLI passes it (one argument)."""
    from wsolbench.zoo import _normalise_models, build_command

    cmd = build_command("tiny", ["vit", "clip"])
    assert cmd.endswith("--models vit,clip")
    assert _normalise_models([cmd.split()[-1]]) == ["vit", "clip"]
    assert _normalise_models(["vgg", "vit,vgg"]) == ["vgg", "vit"]
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        _normalise_models(["vit,nope"])


def test_unet_recipe_speeds_up_cross_attention_and_oversamples_multi_object_scenes():
    """The two U-Net training choices that make its cross-attention spatial (see TRAIN["tiny"]["unet"])."""
    import numpy as np

    from wsolbench.zoo.builder import train
    from wsolbench.zoo.diffusion import create_unet

    names = [["star"]] * 30 + [["star", "ring"]] * 10
    p = train.multi_object_weights(names, 0.5)
    assert p.sum() == pytest.approx(1.0) and p[30:].sum() == pytest.approx(0.5) and p[0] < p[30]
    assert np.allclose(train.multi_object_weights([["star"]] * 4, 0.5), 0.25)  # no multi scenes: uniform
    unet = create_unet("micro")
    opt = train._adamw(unet.named_parameters(), 1e-3, lr_mults={"attn2.to_q": 10.0, "attn2.to_k": 10.0})
    fast = {id(p) for g in opt.param_groups if g["lr_mult"] == 10.0 for p in g["params"]}
    named = dict(unet.named_parameters())
    assert fast == {id(v) for n, v in named.items() if ".attn2.to_q." in n or ".attn2.to_k." in n} and fast
    assert not any(id(v) in fast for n, v in named.items() if ".attn1." in n or ".attn2.to_v." in n)
