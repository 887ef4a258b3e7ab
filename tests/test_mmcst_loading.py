"""Strict loading of foreign checkpoints (wsolbench.checkpoint.load_exact, Localizer.load_foreign) and MMCST's
readers of MCTformer-V1 / -V2 / MCTformer+ / plain-ViT files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsolbench.checkpoint import CheckpointError, load_exact, load_foreign_method, partial_names
from wsolbench.localizer import Localizer
from wsolbench.methods.mmcst.loading import adapt_vit_state_dict
from wsolbench.methods.mmcst.method import MMCST


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_load_exact_loads_every_tensor_and_reports_it():
    src, dst = _net(), _net()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    report = load_exact(dst, src.state_dict(), where="f.pth", layout="plain")
    assert report.loaded == sorted(src.state_dict())
    assert report.missing == report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    assert "loaded 4 tensors (plain layout)" in report.summary()


def test_load_exact_refuses_missing_unexpected_and_shape_mismatch():
    dst = _net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    state = dict(_net().state_dict())
    del state["1.bias"]
    with pytest.raises(CheckpointError, match=r"f\.pth: 1 of the model's 4 tensors are not in the file \(1\.bias\)"):
        load_exact(dst, state, where="f.pth")
    with pytest.raises(CheckpointError, match=r"tensors of the file are not in the model \(extra\)"):
        load_exact(dst, {**_net().state_dict(), "extra": torch.zeros(1)}, where="f.pth")
    with pytest.raises(CheckpointError, match=r"0\.weight \(file \(5, 3\), model \(4, 3\)\)"):
        load_exact(dst, {**_net().state_dict(), "0.weight": torch.zeros(5, 3)}, where="f.pth")
    for k, v in dst.state_dict().items():  # nothing was written by a refused load
        assert torch.equal(v, before[k])


def test_load_exact_partial_by_name_is_recorded_and_typos_raise():
    dst = _net()
    state = {k: v for k, v in _net().state_dict().items() if not k.startswith("1.")}
    report = load_exact(dst, {**state, "aux.w": torch.ones(2)}, partial=("1", "aux.w"), where="f.pth")
    assert report.missing == ["1.bias", "1.weight"] and report.unexpected == ["aux.w"]
    assert report.partial == ["1", "aux.w"]
    assert "partial load (1, aux.w)" in report.summary()
    with pytest.raises(CheckpointError, match=r"load\.partial names \['nothere'\]"):
        load_exact(dst, state, partial=("1", "nothere"), where="f.pth")
    # a prefix covers names below it at a dot, not names that merely start with the same letters
    eleven = nn.Sequential(*[nn.Linear(1, 1) for _ in range(11)])
    state = {k: v for k, v in eleven.state_dict().items() if k.split(".")[0] not in ("1", "10")}
    with pytest.raises(CheckpointError, match=r"2 of the model's 22 tensors are not in the file "
                                              r"\(10\.bias, 10\.weight\)"):
        load_exact(eleven, state, partial=("1",))


def test_partial_names_from_config():
    assert partial_names({"load": {"partial": ["text_proj", "lambda_text"]}}) == ("text_proj", "lambda_text")
    assert partial_names({"load": {"partial": "head"}}) == ("head",)
    assert partial_names({}) == () and partial_names(None) == ()


def test_base_localizer_cannot_read_foreign_files(tmp_path):
    class Plain(Localizer):
        registry_name = "plain"

        def localize(self, images, classes=None, texts=None, meta=None):
            raise AssertionError

    f = tmp_path / "w.pth"
    torch.save({"model": {}}, f)
    with pytest.raises(CheckpointError, match=r"w\.pth: method 'plain' cannot read foreign checkpoint files"):
        load_foreign_method(Plain, f, {}, ["a"])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_foreign_method(Plain, tmp_path / "nope.pth", {}, ["a"])


# ---------------------------------------------------------------------------------- MMCST readers
C = 3  # classes of the micro models below
MCT_CFG = {  # a micro MCTformer: class tokens only (V1); V2 adds model.patch_cam
    "model": {"backbone": {"source": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "drop_path": 0.0,
                           "kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}},
              "input_size": 32, "text_tokens": False, "class_patch": False},
    "infer": {"map": "attn", "attn_layers": 1, "scales": [1.0], "flip": False, "resolution": "square"},
}


def _cfg(**model):
    import copy

    cfg = copy.deepcopy(MCT_CFG)
    cfg["model"].update(model)
    if model.get("patch_cam"):
        cfg["infer"]["map"] = "patchcam"
    return cfg


def _random_state(method: MMCST, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in method.model.state_dict().items()}


def _image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_mctformer_v2_file_loads_its_class_head(tmp_path):
    ref = MMCST.from_config(_cfg(patch_cam=True), class_names=list("abc"))
    state = _random_state(ref)
    assert state["head.weight"].shape == (C, 24, 3, 3) and state["cls_token"].shape == (1, C, 24)
    ref.model.load_state_dict(state)
    path = tmp_path / "v2.pth"
    torch.save({"model": state}, path)
    m = MMCST.load_foreign(path, _cfg(patch_cam=True), list("abc"))
    assert m.load_report.layout == "mctformer-v2" and "head.weight" in m.load_report.loaded
    torch.testing.assert_close(m.model.head.weight, state["head.weight"])
    torch.testing.assert_close(m.localize([_image()]).maps, ref.localize([_image()]).maps)
    # the same file into a model without the class head: refused, unless the head is named as a partial load
    with pytest.raises(CheckpointError, match=r"v2\.pth: 2 tensors of the file are not in the model \(head\.bias, "
                                              r"head\.weight\).*This is an mctformer-v2 file: --set .*"
                                              r"model\.patch_cam=true infer\.map=patchcam"):
        MMCST.load_foreign(path, _cfg(), list("abc"))
    cfg = _cfg()
    cfg["load"] = {"partial": ["head"]}
    assert MMCST.load_foreign(path, cfg, list("abc")).load_report.unexpected == ["head.bias", "head.weight"]


def test_mctformer_plus_uses_its_trained_position_embeddings(tmp_path):
    ref = MMCST.from_config(_cfg(patch_cam=True), class_names=list("abc"))
    state = _random_state(ref)
    ref.model.load_state_dict(state)
    plus = {k: v for k, v in state.items() if k != "pos_embed"}
    plus["pos_embed_cls"], plus["pos_embed_pat"] = state["pos_embed"][:, :C], state["pos_embed"][:, C:]
    plus["pos_embed"] = torch.full((1, 1 + 16, 24), 7.0)  # MCTformer+'s inherited, never-used pos_embed
    path = tmp_path / "plus.pth"
    torch.save({"model": plus}, path)
    m = MMCST.load_foreign(path, _cfg(patch_cam=True), list("abc"))
    report = m.load_report
    assert report.layout == "mctformer-plus" and "pos_embed" in report.ignored
    assert "never uses pos_embed" in report.ignored["pos_embed"]
    torch.testing.assert_close(m.model.pos_embed, state["pos_embed"])
    torch.testing.assert_close(m.localize([_image()]).logits, ref.localize([_image()]).logits)


def test_plain_vit_pos_embed_is_split_by_its_class_token_count():
    """A plain ViT (one class token, 4x4 grid: pos_embed 1+16) into an 8-class model: 1+16-8 = 9 is a perfect
    square, which the old parser took for 8 class positions + a 3x3 grid."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=24, depth=2, num_heads=2)
    m = MMCST.from_config(_cfg(), class_names=list("abcdefgh"))
    adapted = adapt_vit_state_dict(vit.state_dict(), m.model)
    pos = adapted.state["pos_embed"]
    assert adapted.layout == "vit" and pos.shape == (1, 8 + 16, 24)
    torch.testing.assert_close(pos[:, :8], vit.pos_embed[:, :1].expand(1, 8, -1))
    torch.testing.assert_close(pos[:, 8:], vit.pos_embed[:, 1:])  # the grid, untouched (same 4x4)
    torch.testing.assert_close(adapted.state["cls_token"], vit.cls_token.expand(1, 8, -1))
    load_exact(m.model, adapted.state, where="vit")  # every tensor of the model comes from the ViT


def test_deit_small_mctformer_file_into_the_vit_b_profile_raises(tmp_path):
    """The paper profile (ViT-B/16 width 768) refuses a DeiT-S (384) MCTformer file instead of loading nothing."""
    import timm

    from wsolbench.config import load_method_config

    deit = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0)
    state = {k: v for k, v in deit.state_dict().items()}
    state["cls_token"] = state["cls_token"].repeat(1, 20, 1)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1].repeat(1, 20, 1), state["pos_embed"][:, 1:]], 1)
    state["head.weight"], state["head.bias"] = torch.zeros(20, 384), torch.zeros(20)  # V1's unused Linear
    path = tmp_path / "mctformer_v1_deit_s.pth"
    torch.save({"model": state}, path)
    cfg = load_method_config("mmcst", "paper", "voc", ["model.text_tokens=false", "model.class_patch=false",
                                                       "infer.map=attn"])
    names = [f"c{i}" for i in range(20)]
    with pytest.raises(CheckpointError, match=r"mctformer_v1_deit_s\.pth: \d+ tensors have other shapes than the "
                                              r"model's: .*\(file \(1, 20, 384\), model \(1, 20, 768\)\).*--set "
                                              r"model\.backbone\.name=deit-s16 model\.text_tokens=false"):
        MMCST.load_foreign(path, cfg, names)
    # with the DeiT-S backbone it loads; the MMCST parts of the full paper model are refused unless named
    small = load_method_config("mmcst", "paper", "voc", ["model.backbone.name=deit-s16", "model.text_tokens=false",
                                                         "model.class_patch=false", "infer.map=attn"])
    assert MMCST.load_foreign(path, small, names).load_report.missing == []
    full = load_method_config("mmcst", "paper", "voc", ["model.backbone.name=deit-s16", "model.clip.pretrained=null"])
    with pytest.raises(CheckpointError, match=r"of the model's \d+ tensors are not in the file \(.*lambda_cls"):
        MMCST.load_foreign(path, full, names)


def test_missing_checkpoint_path_is_named(tmp_path):
    from wsolbench.checkpoint import read_saved_meta

    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.pth \(give a directory written by "
                                                r"Localizer\.save, or a checkpoint file"):
        read_saved_meta(tmp_path / "nope.pth", "mmcst")
