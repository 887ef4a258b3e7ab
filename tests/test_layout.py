"""The package layout: one folder per method, found by reading its decorator, shipped by setup.cfg."""
from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest

from wsolbench.registry import METHODS, discover_methods

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_folder_is_a_package_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {p.name for p in (ROOT / "methods").iterdir() if (p / "__init__.py").is_file()}
    assert folders and {f"wsolbench.methods.{f}" for f in folders} <= listed


@pytest.mark.parametrize("name,target,aliases,home,declared", discover_methods(), ids=lambda v: str(v)[:20])
def test_reading_the_decorator_finds_what_importing_registers(name, target, aliases, home, declared):
    cls = METHODS.get(name)
    assert cls.registry_name == name
    assert f"{cls.__module__}:{cls.__qualname__}" == target
    assert Path(sys.modules[cls.__module__].__file__).parent == home
    assert all(METHODS.canonical(a) == name for a in aliases)
    assert (home / "configs" / f"{name}.yaml").is_file(), "a method's schema YAML lives in its package"
    assert all(getattr(cls, k) == v for k, v in declared.items()), "the literal class attributes read right"
