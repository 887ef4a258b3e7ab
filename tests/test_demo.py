"""The demo's method selection: methods whose tiny zoo is not built are left out by default, and said so."""
from __future__ import annotations

import wsolbench.registry as registry
from wsolbench import demo


class _Plain:
    tiny_zoo = ()


class _ZooBased:
    tiny_zoo = ("clip",)


def test_methods_waiting_for_the_zoo_are_split_off(isolated_env, monkeypatch):
    monkeypatch.setattr(registry, "get_method_class", {"plain": _Plain, "zoo": _ZooBased}.__getitem__)
    assert demo.zoo_ready(["plain", "zoo"]) == (["plain"], ["zoo"])


def test_default_demo_reports_what_it_leaves_out(isolated_env, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(registry, "get_method_class", {"plain": _Plain, "zoo": _ZooBased}.__getitem__)
    monkeypatch.setattr(demo, "DEMO_METHODS", ("plain", "zoo"))
    monkeypatch.setattr(demo, "available", lambda names: list(names))
    (tmp_path / "runs").mkdir()
    demo.run_demo(out=tmp_path / "runs", leaderboard_dir=tmp_path / "lb", datasets=())
    text = capsys.readouterr().out
    assert "zoo left out" in text and "wsolbench zoo build" in text and "methods plain on" in text
