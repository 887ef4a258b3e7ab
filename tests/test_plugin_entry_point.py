"""README "Adding a method", followed literally by a third party: the toy method package ``tests/plugin_toy/
toy_wsol`` (one folder: ``method.py`` with the class, ``configs/toy.yaml`` with its only defaults), copied into a
temp folder and registered through an entry point in the group ``wsolbench.methods``, keeps the
``wsolbench.testing`` contract, runs through ``wsolbench run`` and appears on ``wsolbench leaderboard``.

The package is made visible as ``pip install`` would: the folder on the path beside a ``*.dist-info`` whose
``entry_points.txt`` holds the entry point (what pip writes from the package's pyproject.toml), in a fresh
interpreter so that this process's registry never sees the toy.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOY = Path(__file__).parent / "plugin_toy" / "toy_wsol"
# what `pip install` writes for a package whose pyproject.toml says
#   [project.entry-points."wsolbench.methods"]
#   toy = "toy_wsol.method:ToyConv"
ENTRY_POINTS = "[wsolbench.methods]\ntoy = toy_wsol.method:ToyConv\n"


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose interpreters see the toy package and its entry point, with their own data/cache."""
    root = tmp_path_factory.mktemp("plugin")
    site = root / "site"
    shutil.copytree(TOY, site / TOY.name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = site / "toy_wsol-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-wsol\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "WSOLBENCH_DATA": str(root / "data"), "WSOLBENCH_CACHE": str(root / "cache"),
           "WSOLBENCH_CONFIG": str(root / "config.yaml"), "OMP_NUM_THREADS": "1"}
    env.pop("WSOLBENCH_ZOO_AUTOBUILD", None)
    return env


def _python(env: dict[str, str], *args: str) -> str:
    """Run ``python ARGS`` with ``env``; its stdout (a failure shows its stderr)."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return out.stdout


def test_toy_entry_point_is_registered_and_keeps_the_contract(toy_env, tmp_path):
    code = ("from wsolbench.registry import get_method_class, list_methods\n"
            "from wsolbench.testing import check_localizer, micro_config\n"
            "assert 'toy' in list_methods(), list_methods()\n"
            "print(get_method_class('toy').__module__)\n"
            "assert get_method_class('toy')().config == {'size': 32, 'seed': 0}  # defaults: configs/toy.yaml\n"
            f"check_localizer(get_method_class('toy'), micro_config('toy'), tmp_dir={str(tmp_path)!r})\n")
    assert _python(toy_env, "-c", code).strip() == "toy_wsol.method"


def test_toy_runs_through_wsolbench_run_and_reaches_the_leaderboard(toy_env, tmp_path):
    runs = tmp_path / "runs"
    _python(toy_env, "-m", "wsolbench.cli", "run", "--method", "toy", "--dataset", "synthetic-cub", "--limit", "8",
            "--out", str(runs), "--quiet")
    table = _python(toy_env, "-m", "wsolbench.cli", "leaderboard", "--runs", str(runs), "--format", "csv",
                    "--no-paper")
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["method"] == "toy"]
    assert len(rows) == 1, table
    row = rows[0]
    assert row["table"].startswith("synthetic-cub") and row["n"] == "8" and row["source"] == "measured", row
    assert 0 <= float(row["maxboxacc ↑"]) <= 100, row


def test_a_plugins_own_weights_yaml_joins_the_catalogue(toy_env, tmp_path):
    """A plugin declares its own pretrained models beside its module, as a built-in package does."""
    site = Path(toy_env["PYTHONPATH"].split(os.pathsep)[0]) / "toy_wsol"
    spec = ("- name: toy-net\n  kind: timm\n  source: toy_net.v1\n  files: [model.safetensors]\n"
            "  licence: MIT\n  description: the toy's (imaginary) backbone\n")
    (site / "weights.yaml").write_text(spec)
    try:
        code = ("from wsolbench import weights as W\n"
                "print(W.CATALOGUE['toy-net'].source, W.CATALOGUE['vgg16'].kind)\n")
        assert _python(toy_env, "-c", code).split() == ["toy_net.v1", "torchvision"]
    finally:
        (site / "weights.yaml").unlink()
