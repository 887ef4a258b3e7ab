"""The demo's method selection: every registered method; the zoo it needs ships with the package, and is
built only when asked."""
from __future__ import annotations

import pytest

import wsolbench.registry as registry
from wsolbench import demo, zoo
from wsolbench.harness import trains_on  # imported before any test patches the registry functions it binds


class _Plain:
    tiny_zoo = ()


class _ZooBased:
    tiny_zoo = ("clip",)


def test_the_default_is_every_method_in_the_demo_untrained_ones_first(monkeypatch):
    names = demo.demo_methods()
    assert sorted(names) == registry.list_methods()
    assert names == ["center", "random", "cam", "genpromp", "mmcst", "tedloc", "wwbl"]
    monkeypatch.setitem(registry.METHODS._entries["random"].declared, "in_demo", False)  # as a class saying so
    assert "random" not in demo.demo_methods()
    assert demo.demo_methods(["TED-LOC", "center"]) == ["tedloc", "center"]


def test_missing_zoo_stops_the_demo_before_any_work(isolated_env, monkeypatch):
    monkeypatch.setenv(zoo.SHIPPED_ENV, "0")  # as if the package shipped no zoo
    monkeypatch.setattr(registry, "get_method_class", {"plain": _Plain, "zoo": _ZooBased}.__getitem__)
    monkeypatch.setattr(demo, "demo_methods", lambda methods: ["plain", "zoo"])
    out = isolated_env / "runs"
    (out / "old-run").mkdir(parents=True)
    with pytest.raises(zoo.ZooMissingError, match="wsolbench zoo build --scale tiny --models clip"):
        demo.run_demo(out=out, leaderboard_dir=isolated_env / "lb", datasets=("synthetic-cub",), fresh=True)
    assert (out / "old-run").exists() and not (isolated_env / "cache" / "synthetic").exists()
    assert demo.missing_zoo(["plain"]) == [] and demo.missing_zoo(["zoo", "plain"]) == ["clip"]


def test_build_zoo_builds_what_is_missing_first(isolated_env, monkeypatch):
    monkeypatch.setenv(zoo.SHIPPED_ENV, "0")  # as if the package shipped no zoo
    monkeypatch.setattr(registry, "get_method_class", {"plain": _Plain, "zoo": _ZooBased}.__getitem__)
    built = []
    monkeypatch.setattr(zoo, "ensure_zoo", lambda scale, models, build: built.append((scale, models, build)))
    demo.prepare_zoo(["plain", "zoo"], build=True)
    assert built == [("tiny", ["clip"], True)]


@pytest.mark.skipif(zoo.shipped_root("tiny") is None, reason="no tiny zoo shipped in this checkout")
def test_the_shipped_zoo_serves_every_method_so_the_demo_needs_no_build(isolated_env, monkeypatch):
    """With an empty cache, every registered method's tiny zoo models come from the package: `wsolbench demo`
    starts its runs at once (no --build-zoo, no 15-minute build)."""
    monkeypatch.delenv(zoo.AUTOBUILD_ENV, raising=False)
    names = demo.demo_methods()
    assert {"tedloc", "mmcst", "wwbl", "genpromp"} <= set(names)
    assert demo.missing_zoo(names) == []
    demo.prepare_zoo(names, build=False)  # nothing to build, nothing raised
    assert not zoo.zoo_root("tiny").exists()


class _SingleLabelTrainer:
    registry_name = "slt"
    tiny_zoo = ()
    needs_training = True
    single_label_training = True
    capabilities = frozenset({"single"})


class _MultiLabelSet:
    registry_name = "voc-like"
    tasks = frozenset({"pointing"})
    multi_label = True


def test_a_single_label_trainer_is_skipped_on_a_multi_label_set_and_said_so(isolated_env, monkeypatch, capsys):
    """TeD-Loc and GenPromp train from one class per image: the demo skips them on VOC-format sets (counted in
    its output) instead of stopping at their first multi-label sample; `wsolbench run` refuses in one line."""
    monkeypatch.setattr(registry, "get_method_class", {"slt": _SingleLabelTrainer}.__getitem__)
    monkeypatch.setattr(registry, "create_dataset", lambda name, split: _MultiLabelSet())
    monkeypatch.setattr(demo, "demo_methods", lambda methods: ["slt"])
    demo.run_demo(out=isolated_env / "runs", leaderboard_dir=isolated_env / "lb", datasets=("voc-like",))
    assert "slt on voc-like: skipped (trains from one class label per image; this set is multi-label)" \
        in capsys.readouterr().out


def test_which_methods_can_train_on_a_multi_label_set():
    voc = registry.DATASETS.get("voc")
    methods = ("cam", "tedloc", "mmcst", "wwbl", "genpromp")
    assert {m for m in methods if trains_on(registry.get_method_class(m), voc)} == {"cam", "mmcst", "wwbl"}
