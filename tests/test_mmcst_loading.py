"""Strict loading of foreign checkpoints (wsolbench.checkpoint.load_exact, Localizer.load_foreign) and MMCST's
readers of MCTformer-V1 / -V2 / MCTformer+ / plain-ViT files."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wsolbench.checkpoint import CheckpointError, load_exact, load_foreign_method, partial_names
from wsolbench.localizer import Localizer


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
    with pytest.raises(CheckpointError, match=r"2 of the model's 22 tensors are not in the file \(10\.bias, 10\.weight\)"):
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
