"""Registry, configs, the Localizer input contract, atomic writes, safe loading and leaderboards."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wsolbench import config as C
from wsolbench.localizer import InputError, normalize_queries
from wsolbench.registry import Registry, RegistryError


# ---- registry -------------------------------------------------------------------------------------------
def test_import_wsolbench_is_light():
    code = "import sys, wsolbench; wsolbench.list_methods(); print(sorted(m for m in ('torch','diffusers','open_clip','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_duplicate_name_is_an_error_and_same_target_is_not():
    reg = Registry("method", "wsolbench.test-none")
    reg.register("cam", "pkg.a:A")
    reg.register("cam", "pkg.a:A")  # re-registering the same target (e.g. module re-import) is fine
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("cam", "pkg.b:B")


def test_unknown_name_suggests_near_misses():
    reg = Registry("method", "wsolbench.test-none", builtins={"tedloc": "x:y", "genpromp": "x:z"})
    with pytest.raises(RegistryError, match=r"did you mean 'tedloc'"):
        reg.canonical("tedlok")


def test_aliases_resolve_and_cannot_be_stolen():
    reg = Registry("method", "wsolbench.test-none")
    reg.register("center", "m:A", aliases=("center-gaussian",))
    assert reg.canonical("Center-Gaussian") == "center"
    with pytest.raises(RegistryError, match="already taken"):
        reg.register("other", "m:B", aliases=("center-gaussian",))


def test_entry_point_plugins_are_loaded_lazily(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent("""
        from wsolbench.localizer import Localizer, LocalizerOutput
        class Mine(Localizer):
            def localize(self, images, classes=None, texts=None):
                raise NotImplementedError
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("mine", "my_plugin:Mine", "wsolbench.methods")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == "wsolbench.methods" else real(group=group))
    reg = Registry("method", "wsolbench.methods")
    assert "mine" in reg.names()
    assert "my_plugin" not in sys.modules  # listed, not imported
    assert reg.get("mine").__name__ == "Mine"


def test_builtin_baselines_are_registered():
    import wsolbench

    assert {"center", "random"} <= set(wsolbench.list_methods())


# ---- configs --------------------------------------------------------------------------------------------
def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_overrides_are_typed_and_unknown_keys_list_valid_ones():
    assert C.parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert C.parse_override("backbone=vgg16") == (["backbone"], "vgg16")
    assert C.parse_override("ious=[30, 50]") == (["ious"], [30, 50])
    schema = {"train": {"lr": 0.1, "epochs": 2}, "backbone": "vgg16"}
    merged = C.merge(schema, C.nest(["train.lr=0.5"]), schema=schema, where="--set")
    assert merged["train"] == {"lr": 0.5, "epochs": 2}
    with pytest.raises(C.ConfigError, match=r"unknown key 'train.lrr'; did you mean 'train.lr'\? valid keys under "
                                            r"'train': epochs, lr"):
        C.merge(schema, C.nest(["train.lrr=0.5"]), schema=schema, where="--set")


def test_base_inheritance_is_one_level(tmp_path):
    _write(tmp_path / "a.yaml", "x: 1\ny: {z: 2}\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\ny: {z: 3}\n")
    _write(tmp_path / "c.yaml", "_base_: b.yaml\nx: 5\n")
    assert C.read_yaml(tmp_path / "b.yaml") == {"x": 1, "y": {"z": 3}}
    with pytest.raises(C.ConfigError, match="one level"):
        C.read_yaml(tmp_path / "c.yaml")


def test_yaml_errors_name_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(C.ConfigError, match="bad.yaml"):
        C.read_yaml(bad)
    obj = _write(tmp_path / "obj.yaml", "!!python/object:os.system {}\n")
    with pytest.raises(C.ConfigError):  # safe_load refuses object tags
        C.read_yaml(obj)


def test_method_config_layers_and_harness_split():
    cfg = C.load_method_config("center", "tiny", "cub", ["sigma=0.3"])
    assert cfg["sigma"] == 0.3 and cfg["profile"] == "tiny"
    method, harness = C.split_overrides(["train.lr=1", "harness.batch_size=4"])
    assert method == ["train.lr=1"] and harness == ["batch_size=4"]
    assert C.load_harness_config(harness)["batch_size"] == 4
    with pytest.raises(C.ConfigError, match="no config for method"):
        C.load_method_config("nonexistent")


# ---- the Localizer input contract ------------------------------------------------------------------------
def test_query_normalisation_and_errors():
    assert normalize_queries([1, 2], 2, kind="classes", item_type=(int, np.integer)) == [[1], [2]]
    assert normalize_queries([[1, 2], [3, 4]], 2, kind="classes", item_type=(int,)) == [[1, 2], [3, 4]]
    with pytest.raises(InputError, match="3 entries but the batch has 2"):
        normalize_queries([1, 2, 3], 2, kind="classes", item_type=(int,))
    with pytest.raises(InputError, match="same number of queries"):
        normalize_queries([[1], [2, 3]], 2, kind="classes", item_type=(int,))


def test_images_of_every_kind_and_clear_errors():
    import torch
    from PIL import Image

    from wsolbench.imaging import to_batch

    pil = Image.new("RGB", (40, 30), (255, 0, 0))
    arr = np.zeros((30, 40, 3), np.uint8)
    ten = torch.rand(3, 30, 40)
    batch = to_batch([pil, arr, ten], 16, (0, 0, 0), (1, 1, 1))
    assert batch.shape == (3, 3, 16, 16)
    assert torch.allclose(batch[0, 0], torch.ones(16, 16))
    with pytest.raises(InputError, match="got builtins.str"):
        to_batch(["not an image"], 16, (0, 0, 0), (1, 1, 1))
    with pytest.raises(InputError, match=r"shape=\(5, 5\)"):
        to_batch([torch.zeros(5, 5)], 16, (0, 0, 0), (1, 1, 1))
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        to_batch([np.full((4, 4, 3), 2.0)], 16, (0, 0, 0), (1, 1, 1))


def test_baselines_shapes_and_determinism():
    import wsolbench

    center = wsolbench.create_method("center", profile="tiny", class_names=["a", "b", "c"])
    imgs = [np.zeros((20, 30, 3), np.uint8), np.full((20, 30, 3), 9, np.uint8)]
    out = center.localize(imgs, classes=[0, 2])
    assert out.maps.shape == (2, 1, 56, 56) and out.classes == [[0], [2]]
    assert out.maps[0, 0].argmax() == out.maps[0, 0].flatten().argmax()
    assert center.localize(imgs).maps.shape[1] == 3  # multi: every class
    rnd = wsolbench.create_method("random", profile="tiny")
    a, b = rnd.localize(imgs, classes=[0, 0]).maps, rnd.localize(imgs[::-1], classes=[0, 0]).maps
    assert np.array_equal(a[0].numpy(), b[1].numpy())  # seeded by content, not by position
    assert not np.array_equal(a[0].numpy(), a[1].numpy())


# ---- atomic writes and safe loading ----------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from wsolbench.io import atomic_path, write_json

    target = write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_pickled_code_is_refused(tmp_path):
    import argparse

    import torch

    from wsolbench.checkpoint import load_tensors, save_tensors

    path = tmp_path / "evil.pt"
    torch.save({"f": argparse.Namespace(x=1)}, path)  # an arbitrary object: unpickling would run its code
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        load_tensors(path)
    st = save_tensors({"w": torch.arange(4.0)}, tmp_path / "w.safetensors")
    assert torch.equal(load_tensors(st)["w"], torch.arange(4.0))


# ---- leaderboards ----------------------------------------------------------------------------------------
def test_leaderboard_marks_measured_and_reported(tmp_path):
    from wsolbench.leaderboard import build_tables, load_runs, render

    run = tmp_path / "runs" / "cam-x"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "method": "cam", "dataset": "synthetic-cub", "dataset_key": "cub", "split": "test", "profile": "tiny",
        "n_images": 10, "threshold_policy": "oracle",
        "results": {"default": {"maxboxacc": 61.5, "top1_loc": 40.0}}}))
    md = render(build_tables(load_runs(tmp_path / "runs")), "md")
    assert "maxboxacc ↑" in md and "61.50" in md and "measured" in md
    assert "reported: GenPromp (ICCV 2023) Table 1" in md  # CUB paper rows beside the synthetic CUB table
    assert "nan" not in md and "| 10 " in md  # counts as integers; reported rows have no count: empty cell
    csv_text = render(build_tables(load_runs(tmp_path / "runs"), with_paper=False), "csv")
    assert "61.5" in csv_text and "reported" not in csv_text
