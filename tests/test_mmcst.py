"""MMCST (methods/mmcst/): masked attention, GWRP, map shapes, losses, training, checkpoints.

Small random models (a 2-block timm ViT, a 1-layer open_clip CLIP) built from config kwargs, so no zoo or
downloads are needed; everything runs on CPU in a few seconds.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from wsolbench.localizer import InputError
from wsolbench.methods.mmcst.loading import adapt_vit_state_dict
from wsolbench.methods.mmcst.losses import contrastive_loss, gwrp, mmcst_losses, pool_scores
from wsolbench.methods.mmcst.method import MMCST
from wsolbench.methods.mmcst.model import group_attention_mask, interpolate_pos_dino, masked_block_forward
from wsolbench.methods.mmcst.train import sample_average_precision, scaled_lr

CLASSES = ["star", "heart", "ring"]
SIZE = 32  # input side; patch 8 → 4x4 grid


def small_cfg(**changes) -> dict:
    cfg = {
        "model": {
            "backbone": {"source": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "drop_path": 0.0,
                         "kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}},
            "clip": {"source": "open_clip", "arch": "ViT-B-16", "pretrained": None,
                     "kwargs": {"embed_dim": 16,
                                "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8,
                                               "patch_size": 8},
                                "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2,
                                             "layers": 1}}},
            "input_size": SIZE, "text_tokens": True, "class_patch": True, "mask_groups": True,
            "token_source": "fused", "patch_proj": "conv3",
        },
        "loss": {"pooling": "gwrp", "gwrp_decay": 0.996, "contrast": 1.0},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "scheduler": "none", "augment": "simple",
                  "resize_size": 36, "num_workers": 0, "seed": 0, "select": "last"},
        "infer": {"map": "mm", "attn_layers": 1, "refine": True, "fuse_attention": True, "scales": [1.0],
                  "flip": False, "extras": [], "resolution": "square"},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def make_method(**changes) -> MMCST:
    torch.manual_seed(0)
    return MMCST.from_config(small_cfg(**changes), class_names=CLASSES)


def images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def method() -> MMCST:
    return make_method()


# ---------------------------------------------------------------------------------- attention mask
def test_group_mask_blocks_exactly_cross_group():
    c, n = 3, 5
    allowed = group_attention_mask(c, c, n)
    assert allowed.shape == (2 * c + n, 2 * c + n)
    expected = torch.ones_like(allowed)
    expected[:c, c:2 * c] = False
    expected[c:2 * c, :c] = False
    assert torch.equal(allowed, expected)
    assert (~allowed).sum() == 2 * c * c


def test_attention_weights_zero_exactly_between_groups(method):
    net = method.model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = net(x, need_attn=True)
    c = len(CLASSES)
    assert len(out["attn"]) == len(net.blocks)
    for a in out["attn"]:
        assert a.shape == (2, 2 * c + 16, 2 * c + 16)
        blocked = ~group_attention_mask(c, c, 16)
        assert torch.all(a[:, blocked] == 0)
        assert torch.all(a[:, ~blocked] > 0)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


def test_one_layer_class_tokens_do_not_see_text_tokens():
    m = make_method(**{"model.backbone.kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}})
    net = m.model.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        net.text_embed.normal_()
        a = net(x)["cls_out"]
        net.text_embed.normal_()
        b = net(x)["cls_out"]
        torch.testing.assert_close(a, b)  # masked: the class group never attends to the text group
        net.mask_groups = False
        c = net(x)["cls_out"]
        net.text_embed.normal_()
        d = net(x)["cls_out"]
    assert not torch.allclose(c, d)


def test_masked_block_reuses_timm_block(method):
    blk = method.model.blocks[0].eval()
    x = torch.randn(2, 11, 24)
    y, _ = masked_block_forward(blk, x)
    torch.testing.assert_close(y, blk(x))
    allowed = group_attention_mask(2, 2, 7)
    y_sdpa, _ = masked_block_forward(blk, x, allowed, need_weights=False)
    y_expl, w = masked_block_forward(blk, x, allowed, need_weights=True)
    torch.testing.assert_close(y_sdpa, y_expl, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, 11, 11)
    # the block's parameters are the timm module's own (no copies)
    assert method.model.blocks is not None and isinstance(method.model.blocks[0], type(blk))


# ---------------------------------------------------------------------------------- GWRP
def test_gwrp_hand_computation():
    x = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    d = 0.5
    expected = (4 + 3 * d + 2 * d ** 2 + 1 * d ** 3) / (1 + d + d ** 2 + d ** 3)
    torch.testing.assert_close(gwrp(x, d), torch.tensor([expected]))
    torch.testing.assert_close(gwrp(x, 1.0), x.mean(-1))
    torch.testing.assert_close(gwrp(x, 1e-9), x.max(-1).values)
    torch.testing.assert_close(gwrp(x, 0.0), x.max(-1).values)
    maps = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pool_scores(maps, "gap", 0.996), maps.mean((2, 3)))
    torch.testing.assert_close(pool_scores(maps, "gwrp", 1.0), maps.mean((2, 3)))
    with pytest.raises(ValueError):
        gwrp(x, 1.5)


# ---------------------------------------------------------------------------------- shapes
def test_forward_and_map_shapes(method):
    net = method.model.eval()
    c = len(CLASSES)
    for h, w in ((SIZE, SIZE), (48, 32)):
        out = net(torch.randn(2, 3, h, w), need_attn=True)
        gh, gw = h // 8, w // 8
        assert out["grid"] == (gh, gw)
        assert out["logits"].shape == (2, c)
        assert out["t2p"].shape == out["c2p"].shape == (2, c, gh, gw)
        assert out["txt_out"].shape == out["cls_out"].shape == (2, c, 24)
        for variant in ("mm", "t2p", "c2p", "attn"):
            for refine in (True, False):
                assert net.maps(out, variant, attn_layers=1, fuse_attention=True, refine=refine,
                                relu=True).shape == (2, c, gh, gw)


def test_localize_multi_single_extras(method):
    c = len(CLASSES)
    imgs = images(3)
    out = method.localize(imgs)
    assert out.maps.shape == (3, c, SIZE, SIZE) and out.logits.shape == (3, c)
    assert out.classes == [[0, 1, 2]] * 3
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1 + 1e-6
    single = method.localize(imgs, classes=[2, 0, 1])
    assert single.maps.shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(single.maps[:, 0], out.maps[torch.arange(3), torch.tensor([2, 0, 1])])
    m2 = copy.copy(method)
    m2.icfg = {**method.icfg, "scales": [1.0, 0.75, 1.25], "flip": True, "extras": ["attn", "t2p", "c2p"]}
    ms = m2.localize(imgs[:2])
    assert ms.maps.shape == (2, c, SIZE, SIZE)
    assert set(ms.extras) == {"attn", "t2p", "c2p"} and all(v.shape == ms.maps.shape for v in ms.extras.values())
    with pytest.raises(InputError):
        method.localize(imgs, classes=[5, 0, 1])
    with pytest.raises(InputError):
        method.localize(imgs, texts=["a", "b", "c"])


# ---------------------------------------------------------------------------------- losses
def test_contrastive_loss_minimal_for_matched_pairs():
    torch.manual_seed(0)
    t = torch.randn(6, 16)
    matched = contrastive_loss(t, t, 0.07)
    for _ in range(20):
        perm = torch.randperm(6)
        if torch.equal(perm, torch.arange(6)):
            continue
        assert matched < contrastive_loss(t, t[perm], 0.07)
    # lower bound: matched loss → 0 as the temperature sharpens
    assert contrastive_loss(t, t, temperature=0.001) < 1e-3


def test_losses_and_one_training_step_lowers_loss(method):
    torch.manual_seed(0)
    m = make_method()
    net = m.model.train()
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    img = torch.randn(4, net.clip_dim)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    out = net(x)
    losses = mmcst_losses(net, out, y, img, m.lcfg)
    assert set(losses) == {"loss", "cls", "text_patch", "class_patch", "contrast"}
    total = losses["cls"] + losses["text_patch"] + losses["class_patch"] + losses["contrast"]
    torch.testing.assert_close(losses["loss"].detach(), total)
    opt.zero_grad()
    losses["loss"].backward()
    assert net.lambda_text.grad is not None and net.lambda_cls.grad is not None
    assert net.text_embed.grad is None and not net.text_embed.requires_grad  # CLIP text embeddings stay fixed
    opt.step()
    with torch.no_grad():
        after = mmcst_losses(net, net(x), y, img, m.lcfg)["loss"]
    assert after < losses["loss"]


class _ListDataset:
    """The part of ``WSOLDataset`` that ``fit`` uses: samples with image files and class labels."""

    def __init__(self, samples, class_names):
        self.samples, self.class_names = samples, list(class_names)
        self.num_classes = len(class_names)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_fit_end_to_end_with_trainloop(tmp_path):
    from wsolbench.datasets.base import Sample

    samples = []
    for i, img in enumerate(images(6, seed=1)):
        path = tmp_path / f"{i}.png"
        img.save(path)
        samples.append(Sample(image_id=str(i), image_path=path, size=img.size, labels=(i % 3, (i + 1) % 3)))
    m = make_method(**{"train.epochs": 2})
    history = m.fit(_ListDataset(samples, CLASSES), out_dir=tmp_path / "train", progress=False)["history"]
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)
    assert {"cls", "text_patch", "class_patch", "contrast"} <= set(history[0])
    assert (tmp_path / "train" / "last.pt").exists()
    assert float(m.model.text_embed.norm(dim=-1).min()) > 0.99  # CLIP text embeddings filled in (L2-normalised)
    assert m.localize(images(1)).maps.shape == (1, 3, SIZE, SIZE)


# ---------------------------------------------------------------------------------- checkpoints
def test_save_load_identical_maps(method, tmp_path):
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    imgs = images(2)
    before = method.localize(imgs)
    method.save(tmp_path / "ckpt")
    loaded = MMCST.load(tmp_path / "ckpt")
    after = loaded.localize(imgs)
    torch.testing.assert_close(after.maps, before.maps)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(loaded.model.text_embed, method.model.text_embed)


def test_mctformer_style_checkpoint(method, tmp_path):
    """An MMCST state dict saved the MCTformer way ({'model': ...}, DDP ``module.`` prefixes) loads exactly."""
    imgs = images(2)
    ref = method.localize(imgs)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in method.model.state_dict().items()}}, path)
    fresh = MMCST.load_foreign(path, small_cfg(), class_names=CLASSES)
    report = fresh.load_report
    assert report.layout == "mmcst" and report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(method.model.state_dict())
    torch.testing.assert_close(fresh.localize(imgs).maps, ref.maps)


def test_plain_vit_weights_repeat_class_token():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64, patch_size=8,
                            embed_dim=24, depth=2, num_heads=2)
    m = make_method()
    adapted = adapt_vit_state_dict({"model": vit.state_dict()}, m.model)
    assert adapted.layout == "vit" and "head.weight" in adapted.ignored and "head.weight" not in adapted.state
    assert "pos_embed" in adapted.adapted and "cls_token" in adapted.adapted
    m.model.load_state_dict(adapted.state, strict=False)
    c = len(CLASSES)
    torch.testing.assert_close(m.model.cls_token, vit.cls_token.expand(1, c, -1))
    torch.testing.assert_close(m.model.pos_embed[:, :c], vit.pos_embed[:, :1].expand(1, c, -1))
    assert m.model.pos_embed.shape == (1, c + 16, 24)  # 8x8 grid resized to the net's 4x4
    torch.testing.assert_close(m.model.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)


# ---------------------------------------------------------------------------------- ablations
@pytest.mark.parametrize("changes", [
    {"model.text_tokens": False, "model.class_patch": False, "infer.map": "attn"},  # attention only (MCTformer-V1)
    {"model.text_tokens": False, "loss.pooling": "gap"},  # +C2P with GAP
    {"model.class_patch": False, "infer.map": "t2p"},  # +text tokens only
    {"model.token_source": "input", "loss.contrast": 0.0},  # global fusion, no contrastive loss
    {"model.token_source": "output", "model.mask_groups": False, "model.patch_proj": "linear"},
    {"model.text_tokens": False, "model.class_patch": False, "model.patch_cam": True, "infer.map": "patchcam"},
])
def test_ablation_switches(changes):
    m = make_method(**changes)
    net = m.model
    x = torch.randn(2, 3, SIZE, SIZE)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    losses = mmcst_losses(net, net(x), y, torch.randn(2, net.clip_dim), m.lcfg)
    assert torch.isfinite(losses["loss"])
    if not net.use_text:
        assert "text_patch" not in losses and "contrast" not in losses and not hasattr(net, "text_proj")
    if not net.use_c2p:
        assert "class_patch" not in losses
    if m.lcfg["contrast"] == 0:
        assert "contrast" not in losses
    assert ("patch_cam" in losses) == net.use_patch_cam  # MCTformer-V2's patch-head loss
    assert m.localize(images(2)).maps.shape == (2, 3, SIZE, SIZE)


# ---------------------------------------------------------------------------------- configs / paper profile
def test_configs_resolve():
    from wsolbench.config import load_method_config

    paper = load_method_config("mmcst", "paper", "voc")
    assert paper["train"]["lr"] == 5e-4 and paper["train"]["batch_size"] == 32 and paper["train"]["epochs"] == 60
    assert paper["train"]["optimizer"] == "adamw" and paper["loss"]["gwrp_decay"] == 0.996
    assert paper["train"]["lr_base_batch"] == 512 and paper["infer"]["resolution"] == "native"
    assert paper["protocol"]["dense"] == "mctformer-miou"
    assert scaled_lr(paper["train"]) == pytest.approx(5e-4 * 32 / 512)  # MCTformer's main.py: lr x batch / 512
    assert scaled_lr({**paper["train"], "lr_base_batch": None}) == 5e-4
    assert load_method_config("mmcst", "paper", "coco")["train"]["epochs"] == 60
    assert load_method_config("mmcst", "paper", "openimages")["train"]["epochs"] == 10
    assert load_method_config("mmcst", "paper", "openimages")["infer"]["resolution"] == "square"  # 224, wsolevaluation
    tiny = load_method_config("mmcst", "tiny", "voc")
    assert tiny["model"]["backbone"]["source"] == "zoo" and tiny["model"]["clip"]["source"] == "zoo"


def test_prompts_read_class_names_as_words():
    """VOC's compound names split into words; other names through the one class-name cleaner (index prefix and
    underscores gone), in mmcst.yaml's "a photo of {}"."""
    m = MMCST.from_config(small_cfg(), class_names=["diningtable", "001.Black_footed_Albatross", "traffic light"])
    assert m._prompts() == ["a photo of dining table", "a photo of Black footed Albatross", "a photo of traffic light"]


def test_a_partial_config_takes_mmcst_yaml_defaults():
    """The schema YAML is the one source of defaults: keys a config leaves out get mmcst.yaml's values, where the
    old code fallbacks disagreed (patch_proj conv3, optimizer adam, augment simple)."""
    from wsolbench.methods.mmcst.train import make_optimizer, train_transform

    cfg = small_cfg()
    del cfg["model"]["patch_proj"], cfg["train"]["augment"]
    m = MMCST.from_config(cfg, class_names=CLASSES)
    assert m.model.patch_proj.kernel_size == (1, 1)  # mmcst.yaml: linear (the paper's "linearly projected")
    assert m.lcfg["temperature"] == 0.07 and m.lcfg["gwrp_decay"] == 0.996 and m.icfg["relu"] is True
    opt = make_optimizer(m.model.parameters(), m.tcfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.05
    assert opt.defaults["lr"] == pytest.approx(1e-3 * 4 / 512)  # train.lr_base_batch: 512
    assert "RandAugment" in repr(train_transform(m.tcfg, SIZE, m.mean, m.std))  # augment: mctformer
    with pytest.raises(ValueError, match="train.augment must be 'mctformer' or 'simple'"):
        train_transform({**m.tcfg, "augment": "strong"}, SIZE, m.mean, m.std)
    with pytest.raises(ValueError, match="infer.scales is empty"):
        make_method(**{"infer.scales": []})


def test_registered():
    from wsolbench.registry import METHODS

    assert METHODS.get("mmcst") is MMCST


def test_paper_architecture_random_init(isolated_env):
    """DeiT-B/16 + CLIP ViT-B/16 widths, built without weights (they are loaded at fit()); on the meta device
    (shapes only, no memory); the forward pass itself is covered by the small models above."""
    from wsolbench.config import load_method_config

    cfg = load_method_config("mmcst", "paper", "voc")
    names = [f"class{i}" for i in range(20)]
    with torch.device("meta"):
        m = MMCST.from_config(cfg, class_names=names, device="meta")
    net = m.model
    assert net.cls_token.shape == (1, 20, 768) and net.pos_embed.shape == (1, 20 + 196, 768)
    assert net.text_embed.shape == (20, 512) and net.text_proj.weight.shape == (768, 512)
    assert net.contrast_proj.weight.shape == (512, 768) and len(net.blocks) == 12
    assert net.patch_proj.weight.shape == (768, 768, 1, 1)  # "linearly projected"
    keys = set(net.state_dict())
    assert {"blocks.11.attn.qkv.weight", "patch_embed.proj.weight", "norm.weight"} <= keys
    assert m.input_size == 224 and m.icfg["scales"] == [1.0, 0.75, 1.25] and m.icfg["flip"] is True
    # real weights are resolved offline at fit(): absent here, the error names the files and the fix
    from wsolbench import weights

    if weights.find("deit-b16")[0] is None:
        with pytest.raises(weights.MissingWeightsError, match="deit-b16"):
            m.fit([], progress=False)
    if weights.find("clip-vit-b16-openai")[0] is None:
        with pytest.raises(weights.MissingWeightsError, match="clip-vit-b16-openai"):
            m.ensure_text_embeddings()


MICRO_OVERRIDES = (
    "model.backbone.source=timm", "model.backbone.name=vit_tiny_patch16_224", "model.backbone.pretrained=false",
    "model.backbone.kwargs={patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}",
    "model.clip.source=open_clip", "model.clip.pretrained=null",
    "model.clip.kwargs={embed_dim: 16, vision_cfg: {image_size: 16, layers: 1, width: 16, head_width: 8, "
    "patch_size: 8}, text_cfg: {context_length: 12, vocab_size: 49408, width: 16, heads: 2, layers: 1}}",
    f"model.input_size={SIZE}", "train.epochs=1", "train.batch_size=4", "train.resize_size=36",
    "train.max_steps_per_epoch=2", "infer.attn_layers=1", "harness.batch_size=4",
)


@pytest.mark.parametrize("dataset, metric", [("synthetic-voc", "miou"), ("synthetic-openimages", "pxap")])
def test_registered_and_runs_through_the_harness(isolated_env, dataset, metric):
    import json

    from wsolbench.harness import RunSpec, run
    from wsolbench.registry import get_method_class

    assert get_method_class("mmcst") is MMCST
    res = run(RunSpec(method="mmcst", dataset=dataset, profile="tiny", limit=6, out=isolated_env / "runs",
                      progress=False, overrides=MICRO_OVERRIDES))
    results = json.loads((res.run_dir / "metrics.json").read_text())["results"]
    assert 0 <= results["default"][metric] <= 100
    assert 0 <= results["attn"][metric] <= 100  # the tiny profile also scores the attention-only map


def test_sample_average_precision_by_hand():
    # ranks: TP (P 1, R .5), FP, TP (P 2/3, R 1) -> .5·1 + .5·2/3
    assert sample_average_precision(np.array([1, 0, 1, 0]), np.array([.9, .8, .7, .1])) == pytest.approx(5 / 6)
    assert sample_average_precision(np.array([0, 1]), np.array([.5, .5])) == pytest.approx(0.5)  # a tie: one step
    assert sample_average_precision(np.array([0, 1, 0]), np.array([.1, .9, .3])) == pytest.approx(1.0)


def test_select_best_val_map_epoch(tmp_path, monkeypatch):
    """train.select=val_map keeps the epoch with the best val mAP (MCTformer's checkpoint_best.pth)."""
    from wsolbench.checkpoint import load_tensors
    from wsolbench.datasets.base import Sample
    from wsolbench.training import load_checkpoint

    samples = []
    for i, img in enumerate(images(6, seed=2)):
        path = tmp_path / f"{i}.png"
        img.save(path)
        samples.append(Sample(image_id=str(i), image_path=path, size=img.size, labels=(i % 3,)))
    data = _ListDataset(samples, CLASSES)
    m = make_method(**{"train.epochs": 3, "train.select": "val_map"})
    first = m.val_map(data, 4)
    assert 1 / 3 <= first <= 1  # one label among 3 classes: every image's AP is 1, 1/2 or 1/3
    scripted = iter([0.2, 0.9, 0.5])
    monkeypatch.setattr(m, "val_map", lambda d, bs: next(scripted))
    out = m.fit(data, val_data=data, out_dir=tmp_path / "train", progress=False)
    assert [r["val_map"] for r in out["history"]] == [0.2, 0.9, 0.5] and out["selected_epoch"] == 2
    best = load_tensors(tmp_path / "train" / "best_val_map.safetensors")
    last = load_checkpoint(tmp_path / "train" / "last.pt")["modules"]["model"]
    state = m.model.state_dict()
    assert all(torch.equal(v, best[k]) for k, v in state.items())  # the epoch-2 weights, not the last epoch's
    assert not all(torch.equal(v, last[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="train.select=val_map needs validation data"):
        make_method(**{"train.select": "val_map"}).fit(data, progress=False)
    with pytest.raises(ValueError, match="train.select must be 'last' or 'val_map'"):
        make_method(**{"train.select": "best"})


def test_text_projection_choices():
    m = make_method(**{"model.text_proj": "frozen", "model.text_scale": 4.0})
    net = m.model
    assert not any(p.requires_grad for p in net.text_proj.parameters())  # "kept constant", literally
    m.ensure_text_embeddings()
    torch.testing.assert_close(net.text_tokens_in(), net.text_proj(4.0 * net.text_embed))
    with pytest.raises(ValueError, match="model.text_proj must be 'learned' or 'frozen'"):
        make_method(**{"model.text_proj": "clip"})


def test_position_embeddings_interpolate_as_dino():
    """MCTformer/DINO: bicubic with scale_factor=(n+0.1)/side, which weights differently from size=(h, w)."""
    import torch.nn.functional as F

    pos = torch.randn(1, 14 * 14, 6)
    assert interpolate_pos_dino(pos, (14, 14), (14, 14), True) is pos  # square input, same grid: unchanged
    out = interpolate_pos_dino(pos, (14, 14), (15, 20), False)
    grid = pos.reshape(1, 14, 14, 6).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(15.1 / 14, 20.1 / 14), mode="bicubic")
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(1, 300, 6))
    by_size = F.interpolate(grid, size=(15, 20), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 300, 6)
    assert (out - by_size).abs().max() > 1e-3
    # a non-square input with the trained grid is still resampled (MCTformer's w == h test)
    assert not torch.equal(interpolate_pos_dino(pos, (14, 14), (14, 14), False), pos)


def test_mctformer_augment_posterizes_to_black_at_magnitude_ten_instead_of_raising():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10 (0 bits kept): a black image, as with MCTformer's Pillow; Pillow
    13's posterize raises on 0 bits, which stopped the paper profile's training (about once in 660 images)."""
    from timm.data.auto_augment import RandAugment

    from wsolbench.methods.mmcst.train import train_transform

    cfg = {"augment": "mctformer", "resize_size": SIZE}
    rand = next(t for t in train_transform(cfg, SIZE, (0.5,) * 3, (0.5,) * 3).transforms if isinstance(t, RandAugment))
    ops = [op for op in rand.ops if op.name.startswith("Posterize")]
    assert [op.name for op in ops] == ["PosterizeIncreasing"]
    op = ops[0]
    op.prob, op.magnitude_std, op.magnitude = 1.0, 0, 10
    img = Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5  # 4 - int(0.5 * 4) = 2 bits: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(op(img)).max() == 192
