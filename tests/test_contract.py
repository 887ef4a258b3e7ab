"""The Localizer contract (wsolbench.testing.check_localizer) on every registered method, built-in or entry point.

Each method is built from its own package's micro config (tiny profile + ``configs/<name>_micro.yaml``), so a new
method gets its case here with nothing to edit in this file.
"""
from __future__ import annotations

import pytest

from wsolbench.registry import DECLARED, METHODS, get_method_class, list_methods
from wsolbench.testing import check_localizer, micro_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_keeps_the_contract(name, isolated_env):
    check_localizer(get_method_class(name), micro_config(name), tmp_dir=isolated_env)


@pytest.mark.parametrize("name", list_methods())
def test_declared_attributes_read_without_import_match_the_class(name):
    """What the registry reads from a method's source (``wsolbench weights list``, the demo) is the class's."""
    cls = get_method_class(name)
    for attr in DECLARED:
        assert METHODS.declared(name, attr) == getattr(cls, attr), f"{name}.{attr}"


# ---- the checker catches what it is for: the toy plugin keeps the contract, and each way of breaking it is named
@pytest.fixture
def toy(monkeypatch):
    """The plugin test's toy class (tests/plugin_toy/toy_wsol), registered as "toy" for this test only."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugin_toy"))
    from toy_wsol.method import ToyConv

    METHODS.names()  # built-ins and entry points loaded into the table the scratch copy starts from
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    METHODS.register("toy", ToyConv)
    monkeypatch.setattr(ToyConv, "registry_name", "toy", raising=False)
    return ToyConv


def test_the_toy_plugin_keeps_the_contract(toy, tmp_path):
    check_localizer(toy, micro_config("toy"), tmp_dir=tmp_path)


def _broken(base: type, how: str) -> type:
    """``base`` with one contract break ``how``."""
    import torch

    from wsolbench.localizer import Capability

    class Broken(base):
        capabilities = base.capabilities | ({Capability.PHRASE} if how == "claims phrases" else set())

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if how == "loses its state":  # a state the checkpoint does not hold (as training would leave)
                torch.nn.init.normal_(self.model.weight)

        def state_dict(self):
            return {} if how == "loses its state" else super().state_dict()

        def load_state_dict(self, state):
            if how != "loses its state":
                super().load_state_dict(state)

        def localize(self, images, classes=None, texts=None, meta=None):
            if how == "ignores texts":
                texts = None
            if how == "wraps class indices" and classes is not None:
                classes = [c % len(self.class_names) if isinstance(c, int) else c for c in classes]
            out = super().localize(images, classes, texts, meta)
            if how == "float64 maps":
                out.maps = out.maps.double()
            if how == "misnames classes":
                out.classes = [[(c + 1) % len(self.class_names) for c in q] for q in out.classes]
            if how == "adds noise":
                out.maps = out.maps + torch.rand_like(out.maps)
            return out

    return Broken


@pytest.mark.parametrize("how, message", [
    ("float64 maps", "maps must be a float32 tensor B×K×h×w"),
    ("misnames classes", r"classes \[\[1\], \[2\]\] are not the queried \[\[0\], \[1\]\]"),
    ("adds noise", r"two identical single calls \(determinism\): maps differ"),
    ("loses its state", r"save then load \(round trip\): maps differ"),
    ("wraps class indices", r"classes=\[3, 0\] \(3 classes, 2 images\) was accepted"),
    ("ignores texts", r"localize\(texts=.*\) without the 'phrase' capability was accepted"),
    ("claims phrases", r"phrase texts=.*: 1 texts per image gave 3 maps"),  # declared, but texts are ignored
])
def test_the_checker_names_each_break_of_the_contract(toy, tmp_path, how, message):
    with pytest.raises(AssertionError, match=message):
        check_localizer(_broken(toy, how), micro_config("toy"), tmp_dir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_methods() if METHODS.declared(n, "needs_training")])
def test_every_trained_method_keeps_the_contract(name, isolated_env):
    """The same contract after a micro fit on 8 synthetic-CUB training images (the trained state is what
    save/load must carry)."""
    from wsolbench.registry import create_dataset

    train = create_dataset("synthetic-cub", split="train")
    check_localizer(get_method_class(name), micro_config(name), class_names=train.class_names, tmp_dir=isolated_env,
                    fit_data=train.subset(range(8)))
