"""The harness end to end on the synthetic world: runs, resume equivalence, bad input, CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from wsolbench import harness
from wsolbench.harness import HarnessError, RunSpec, run
from wsolbench.localizer import Capability, Localizer, LocalizerOutput
from wsolbench.registry import METHODS


def _spec(tmp_path, **kw):
    base = dict(method="center", dataset="synthetic-cub", limit=24, out=tmp_path / "runs", progress=False,
                overrides=("harness.batch_size=4",))
    base.update(kw)
    return RunSpec(**base)


def test_center_run_writes_config_metrics_and_per_image(isolated_env):
    res = run(_spec(isolated_env))
    rec = json.loads((res.run_dir / "metrics.json").read_text())
    assert 0 <= rec["results"]["default"]["maxboxacc"] <= 100
    assert rec["threshold_policy"] == "oracle" and rec["n_images"] == 24
    assert "bicubic" in rec["map_preparation"] and rec["versions"]["torch"]
    assert rec["device"] == "cpu" and rec["torch_threads"] == torch.get_num_threads()
    assert (res.run_dir / "config.yaml").exists()
    assert len((res.run_dir / "per_image.jsonl").read_text().splitlines()) == 24
    assert not list(res.run_dir.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_resume_after_a_crash_gives_identical_numbers(isolated_env, monkeypatch):
    whole = run(_spec(isolated_env, method="random", run_id="whole"))
    calls = {"n": 0}
    real = harness._BoxEvaluator.process

    def crashing(self, samples, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third batch
        return real(self, samples, images)

    monkeypatch.setattr(harness._BoxEvaluator, "process", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(_spec(isolated_env, method="random", run_id="crashed"))
    shards = sorted((isolated_env / "runs" / "crashed" / "cache").glob("batch-*.npz"))
    assert len(shards) == 2
    monkeypatch.setattr(harness._BoxEvaluator, "process", real)
    calls["n"] = 0
    counted = {"n": 0}

    def counting(self, samples, images):
        counted["n"] += 1
        return real(self, samples, images)

    monkeypatch.setattr(harness._BoxEvaluator, "process", counting)
    resumed = run(_spec(isolated_env, method="random", run_id="crashed", resume=True))
    assert counted["n"] == 4  # 6 batches of 4, 2 reused from the cache
    assert resumed.results == whole.results


def test_resume_with_changed_flags_is_refused(isolated_env):
    run(_spec(isolated_env, run_id="r"))
    with pytest.raises(HarnessError, match="config differs"):
        run(_spec(isolated_env, run_id="r", resume=True, overrides=("harness.batch_size=8",)))


def test_missing_data_root_names_the_path(isolated_env):
    missing = isolated_env / "nowhere"
    with pytest.raises(HarnessError, match=str(missing)):
        run(_spec(isolated_env, dataset="cub", data_root=missing))


def test_corrupt_image_fails_or_is_counted_and_listed(isolated_env):
    from wsolbench.registry import create_dataset

    ds = create_dataset("synthetic-cub", split="test")
    root = isolated_env / "cubcopy"
    shutil.copytree(ds.root, root)
    victim = ds.subset(range(3))[2].image_path.relative_to(ds.root)
    (root / victim).write_bytes(b"not a jpeg")
    with pytest.raises(HarnessError, match=str(victim.name)):
        run(_spec(isolated_env, dataset="synthetic-cub", data_root=root, limit=8))
    res = run(_spec(isolated_env, dataset="synthetic-cub", data_root=root, limit=8,
                    overrides=("harness.batch_size=4", "harness.on_error=skip")))
    assert res.record["skipped"]["count"] == 1 and res.record["n_images"] == 7
    assert victim.name in res.record["skipped"]["items"][0]["path"]


class _NaNMaps(Localizer):
    capabilities = frozenset({Capability.SINGLE})

    def localize(self, images, classes=None, texts=None):
        return LocalizerOutput(maps=torch.full((len(images), 1, 7, 7), float("nan")))


def test_nan_maps_are_counted_not_silent(isolated_env, monkeypatch):
    monkeypatch.setitem(METHODS.builtins, "nanmaps", "x:y")
    METHODS.register("nanmaps", _NaNMaps)
    monkeypatch.setattr(harness, "load_method_config", lambda *a, **k: {})
    try:
        res = run(_spec(isolated_env, method="nanmaps", limit=8))
    finally:
        METHODS._entries.pop("nanmaps", None)
    assert res.results["default"]["nonfinite_maps"] == 8


def test_cli_help_list_and_one_line_errors(isolated_env, capsys):
    from wsolbench.cli import main

    assert main(["--help"]) == 0
    assert main(["list", "methods"]) == 0
    assert "center" in capsys.readouterr().out
    assert main(["run", "--method", "centre", "--dataset", "synthetic-cub"]) == 3  # bad input
    err = capsys.readouterr().err
    assert err.startswith("wsolbench: error: unknown method 'centre'") and "did you mean 'center'" in err


def test_cli_run_then_leaderboard(isolated_env, capsys):
    from wsolbench.cli import main

    runs = isolated_env / "runs"
    assert main(["run", "--method", "center", "--dataset", "synthetic-cub", "--limit", "12", "--profile", "tiny",
                 "--out", str(runs), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", "--runs", str(runs), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "| center" in out and "measured" in out and "reported" in out


class _ZooMethod(Localizer):
    capabilities = frozenset({Capability.SINGLE})
    tiny_zoo = ("vit",)

    def localize(self, images, classes=None, texts=None):
        return LocalizerOutput(maps=torch.rand(len(images), 1, 7, 7))


def test_a_rebuilt_zoo_is_a_new_run_not_a_resumed_one(isolated_env, monkeypatch):
    """Tiny runs record the zoo models they stand on: after a rebuild, --resume must not reuse old results."""
    from wsolbench import zoo
    from wsolbench.zoo.manifest import recipe

    monkeypatch.setitem(METHODS.builtins, "zoomethod", "x:y")
    METHODS.register("zoomethod", _ZooMethod)
    monkeypatch.setattr(harness, "load_method_config", lambda *a, **k: {})
    monkeypatch.setenv(zoo.SHIPPED_ENV, "0")  # no zoo at first (not even the shipped one)
    root = zoo.zoo_root("tiny")
    (root / "backbones" / "vit").mkdir(parents=True)
    try:
        first = run(_spec(isolated_env, method="zoomethod", profile="tiny", limit=4, resume=True))
        for f in ("config.json", "model.safetensors"):  # a vit built with the current recipe: its content hash
            (root / "backbones" / "vit" / f).write_text("{}")
        (root / "manifest.json").write_text(json.dumps({"scale": "tiny", "models": {"vit": {
            "recipe": recipe("tiny", "vit"), "seed": 0, "fingerprint": "2026112121000000"}}}))
        second = run(_spec(isolated_env, method="zoomethod", profile="tiny", limit=4, resume=True))
        again = run(_spec(isolated_env, method="zoomethod", profile="tiny", limit=4, resume=True))
    finally:
        METHODS._entries.pop("zoomethod", None)
    assert first.run_dir != second.run_dir and second.run_dir == again.run_dir
    assert "2026112121000000" in (second.run_dir / "config.yaml").read_text()


def test_checkpoint_runs_apply_set_overrides(isolated_env):
    """--checkpoint with --set evaluates the saved method under the overridden config (it used to be ignored)."""
    from wsolbench.registry import create_method

    ckpt = create_method("random", profile="tiny").save(isolated_env / "ckpt")  # saved with seed 0
    direct = run(_spec(isolated_env, method="random", run_id="direct", overrides=("harness.batch_size=4", "seed=5")))
    loaded = run(_spec(isolated_env, method="random", run_id="loaded", checkpoint=ckpt,
                       overrides=("harness.batch_size=4", "seed=5")))
    plain = run(_spec(isolated_env, method="random", run_id="plain", checkpoint=ckpt))
    assert loaded.results == direct.results and plain.results != direct.results
    import yaml

    assert yaml.safe_load((loaded.run_dir / "config.yaml").read_text())["method_config"]["seed"] == 5
    with pytest.raises(Exception, match="unknown key 'sead'"):
        run(_spec(isolated_env, method="random", run_id="typo", checkpoint=ckpt, overrides=("sead=5",)))
