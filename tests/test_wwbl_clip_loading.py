"""THE OpenAI-CLIP loader (``wsolbench.weights.load_open_clip``): QuickGELU for OpenAI weights loaded from a file,
OpenAI TorchScript archives, one-line errors, and WWbL's, TeD-Loc's and MMCST's configs all going through it.

A micro open_clip CLIP (the zoo's architecture, random weights) stands in for ViT-B: its state dict has the
OpenAI/open_clip layout, and the catalogue gets a test entry for it.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
import torch.nn as nn  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402

from wsolbench import weights as W  # noqa: E402


@pytest.fixture
def micro_clip(monkeypatch, tmp_path):
    """(model, catalogue name) of a random micro CLIP registered under the tags ``openai`` and ``laion``."""
    from wsolbench import zoo

    model, _ = zoo.create_clip("micro")
    for tag in ("openai", "laion"):
        name = f"wsolbench-clip-micro/{tag}"
        spec = W.WeightSpec(name, "open_clip", name, ("micro.pt",), "MIT", "test micro CLIP")
        monkeypatch.setitem(W.CATALOGUE, name, spec)
    return model


def _activations(model):
    return {type(blk.mlp.gelu) for blk in list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)}


def test_an_openai_state_dict_file_gets_quickgelu(micro_clip, tmp_path):
    torch.save(micro_clip.state_dict(), tmp_path / "micro.pt")
    model, tok = W.load_open_clip("wsolbench-clip-micro", "openai", path=tmp_path / "micro.pt")
    assert _activations(model) == {QuickGELU}
    for k, v in micro_clip.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert tok("a photo").shape[-1] == 16
    other, _ = W.load_open_clip("wsolbench-clip-micro", "laion", path=tmp_path / "micro.pt")
    assert _activations(other) == {nn.GELU}  # a non-OpenAI tag keeps the config's activation


class _Holder(nn.Module):
    """A TorchScript-able module whose state dict is a given one (OpenAI's .pt archives are ScriptModules)."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        for key, value in state.items():
            node = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, nn.Module())
                node = getattr(node, part)
            node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_an_openai_torchscript_archive_loads_through_open_clip(micro_clip, tmp_path):
    torch.jit.script(_Holder(micro_clip.state_dict())).save(str(tmp_path / "micro.pt"))
    model, _ = W.load_open_clip("wsolbench-clip-micro", "openai", path=tmp_path / "micro.pt")
    assert _activations(model) == {QuickGELU}
    for k, v in micro_clip.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_a_wrong_file_is_named_in_one_line(micro_clip, tmp_path):
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "micro.pt")
    with pytest.raises(ValueError) as err:
        W.load_open_clip("wsolbench-clip-micro", "openai", path=tmp_path / "micro.pt")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "micro.pt") in msg and "clip.weights" in msg


def test_every_method_loads_openai_clip_through_the_one_loader(monkeypatch, tmp_path):
    """WWbL's paper profile, TeD-Loc's and MMCST's configs ask ``weights.load_open_clip`` for their CLIP."""
    from wsolbench.config import load_method_config
    from wsolbench.methods.mmcst import method as mmcst
    from wsolbench.methods.tedloc import method as tedloc
    from wsolbench.methods.wwbl.clip_teacher import build_clip

    calls = []

    class Stop(Exception):
        pass

    def fake(name, pretrained="openai", path=None, device="cpu", **kwargs):
        calls.append((name, pretrained))
        raise Stop

    monkeypatch.setattr(W, "load_open_clip", fake)
    with pytest.raises(Stop):
        build_clip(load_method_config("wwbl", "paper", "flickr30k"), "cpu")
    m = mmcst.MMCST.__new__(mmcst.MMCST)  # only clip() is exercised: no backbone is built
    m.mcfg, m._clip = load_method_config("mmcst", "paper")["model"], None
    with pytest.raises(Stop):
        m.clip()
    t = tedloc.TeDLoc.__new__(tedloc.TeDLoc)  # only load_clip is exercised: no encoder is built
    t.config, t.device = load_method_config("tedloc", "paper", "cub"), "cpu"
    with pytest.raises(Stop):
        t.load_clip()
    assert calls == [("ViT-B-32", "openai"), ("ViT-B-16", "openai"), ("ViT-B-16", "openai")]
