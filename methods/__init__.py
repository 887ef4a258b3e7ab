"""The built-in methods, one package each (``wsolbench/methods/<package>/``: code, ``configs/``, docs).

``from wsolbench.methods import TeDLoc`` imports that one method's module on first use (by class name, via
the registry); ``import wsolbench.methods`` itself imports nothing heavy.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """A registered method class by its class name (``CAM``, ``TeDLoc``, ``CenterPrior``, ...)."""
    from wsolbench.registry import METHODS

    cls = None if name.startswith("_") else METHODS.by_class_name(name)
    if cls is None:
        raise AttributeError(f"module 'wsolbench.methods' has no attribute {name!r}")
    return cls
