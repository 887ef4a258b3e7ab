"""``wsolbench data check``: validate a dataset's layout and counts, naming what is missing and where."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .base import DatasetError

# every module that registers datasets (importing them fills the registry even before lazy builtins load)
DATASET_MODULES = ("cub", "ilsvrc", "openimages", "voc", "coco", "flickr30k")


def _import_all() -> None:
    import importlib

    for m in DATASET_MODULES:
        importlib.import_module(f"wsolbench.datasets.{m}")


def check_dataset(name: str, root: str | Path | None = None, *, splits: Sequence[str] | None = None,
                  verify: bool = False, **options) -> list[str]:
    """Problems with dataset ``name`` as human-readable lines; an empty list means all splits loaded and
    match the canonical image (and box/mask) counts with every referenced file present.

    Each split is built with the real loader (``options`` are passed on, e.g. ``metadata_dir=``); a split
    that cannot be built contributes its error, which names the expected path and layout. ``verify=True``
    also decodes every image to find corrupt files (slow).
    """
    from wsolbench.registry import get_dataset_class

    from .base import resolve_root

    _import_all()
    cls = get_dataset_class(name)
    label = getattr(cls, "registry_name", name) or name
    is_synthetic = getattr(cls, "synthetic_format", None) is not None
    if not is_synthetic or root is not None:  # one clear line when the root itself is missing
        layout_help = getattr(sys.modules.get(cls.__module__), "LAYOUT_HELP", "")
        try:
            resolve_root(cls, root, layout_help)
        except DatasetError as exc:
            return [str(exc)]
    problems: list[str] = []
    for split in (splits or cls.splits):
        try:
            ds = cls(root=root, split=split, **options)
        except DatasetError as exc:
            if split in getattr(cls, "optional_splits", ()) and not splits:
                continue  # e.g. VOC 2012 test: no public labels, so usually absent
            problems.append(f"{label}/{split}: {exc}")
            continue
        problems += ds.check(verify=verify)
    return problems


def check_report(name: str, root: str | Path | None = None, **kwargs) -> str:
    """check_dataset as one printable block ("OK" when nothing is wrong)."""
    problems = check_dataset(name, root, **kwargs)
    return f"{name}: OK" if not problems else "\n".join([f"{name}: {len(problems)} problem(s)"] + problems)
