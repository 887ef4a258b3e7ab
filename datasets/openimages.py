"""OpenImages30k (wsolevaluation): 100 classes, pixel masks only (PxAP, pIoU).

Layout::

    <root>/{train,val,test}/<mid>/<image>.jpg          <mid> = the class MID without "/m/" (e.g. 01226z)
    <mask_root>/{val,test}/<mid>/<image>_m<mid>_<hash>.png   instance masks (1-bit PNG)
    <mask_root>/{val,test}/<mid>/<image>_ignore.png          ignore mask (8-bit PNG)
    metadata/OpenImages/<split>/{image_ids,class_labels,image_sizes,localization}.txt
    localization.txt: <image>,<mask>,<ignore>  (ignore only on an image's first line); image_sizes.txt is
    empty, so Sample.size is None (read it from the image).

``mask_root`` defaults to ``root`` (wsolevaluation keeps masks beside the images). Class names: MIDs,
or words from a ``class-descriptions*.csv`` (``/m/01226z,Football``) in ``root`` / its parent /
``class_descriptions=``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar

from wsolbench.registry import register_dataset

from . import wsol_metadata as wm
from .base import DatasetError, Sample, Task, WSOLDataset, resolve_root

LAYOUT_HELP = ("OpenImages30k (wsolevaluation): <root>/{train,val,test}/<mid>/<image>.jpg, masks "
               "<root>/{val,test}/<mid>/<image>_m<mid>_<hash>.png and <image>_ignore.png, metadata "
               "metadata/OpenImages/{train,val,test}/")


def read_class_descriptions(path: Path) -> dict[str, str]:
    """MID → display name from '/m/xxxx,Name' lines (quotes allowed)."""
    out = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise DatasetError(f"{path}:{lineno}: malformed line, expected '<MID>,<name>', got {row!r}")
            mid = row[0].strip()
            out[mid[3:] if mid.startswith("/m/") else mid] = row[1].strip()
    return out


@register_dataset("openimages", aliases=("openimages30k",))
class OpenImages30k(WSOLDataset):
    """OpenImages30k with instance and ignore masks."""

    default_subdir: ClassVar[str] = "OpenImages"
    default_subdirs: ClassVar[tuple[str, ...]] = ("OpenImages", "OpenImages30k")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.MASKS})
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 29819, "val": 2500, "test": 5000}
    canonical_mask_counts: ClassVar[dict[str, int]] = {"val": 3854, "test": 7632}
    multi_label: ClassVar[bool] = False
    config_key: ClassVar[str] = "openimages"
    metadata_name: ClassVar[str] = "OpenImages"

    def __init__(self, root: str | Path | None = None, split: str = "test", *,
                 metadata_dir: str | Path | None = None, mask_root: str | Path | None = None,
                 images_dir: str | Path | None = None, class_descriptions: str | Path | None = None,
                 on_error: str = "fail") -> None:
        root = resolve_root(type(self), root, LAYOUT_HELP)
        super().__init__(root, split, on_error=on_error)
        split_dir = wm.find_split_dir(self.metadata_name, split, self.root, metadata_dir)
        meta = wm.load_split(split_dir, "masks")
        self.metadata_path = split_dir
        self.image_root = Path(images_dir) if images_dir else self.root
        self.mask_root = Path(mask_root) if mask_root else self.root
        if split != "train" and not meta.masks:
            raise DatasetError(f"{split_dir / 'localization.txt'}: no masks for the {split} split; expected "
                               f"'<image>,<mask>,<ignore>' lines")
        samples = []
        for image_id in meta.image_ids:
            masks = meta.masks.get(image_id, [])
            ign = meta.ignores.get(image_id)
            samples.append(Sample(image_id=image_id, image_path=self.image_root / image_id,
                                  size=meta.sizes.get(image_id), labels=(meta.labels[image_id],),
                                  mask_paths=tuple(self.mask_root / m for m in masks),
                                  ignore_path=self.mask_root / ign if ign else None))
        self.samples = samples
        # class k's MID from the image paths (<split>/<mid>/<file>)
        all_labels = wm.labels_of_all_splits(split_dir, meta.labels)
        n = max(all_labels.values(), default=-1) + 1
        mids: list[str | None] = [None] * n
        for image_id, lab in all_labels.items():
            parts = image_id.split("/")
            if mids[lab] is None and len(parts) >= 3:
                mids[lab] = parts[-2]
        self.class_mids = [m if m is not None else f"class_{k}" for k, m in enumerate(mids)]
        desc_path = Path(class_descriptions) if class_descriptions else next(
            (p for d in (self.root, self.root.parent) for p in sorted(d.glob("class-descriptions*.csv"))), None)
        names = read_class_descriptions(desc_path) if desc_path is not None else {}
        self.class_names = [names.get(m, m) for m in self.class_mids]

    def check(self, verify: bool = False) -> list[str]:
        problems = super().check(verify)
        expected = self.canonical_mask_counts.get(self.split)
        if expected is not None:
            n = sum(len(s.mask_paths) for s in self.samples)
            if n != expected:
                problems.append(f"{self.registry_name}/{self.split}: {n} instance masks, the canonical count "
                                f"is {expected}")
        return problems


@register_dataset("synthetic-openimages")
class SyntheticOpenImages(OpenImages30k):
    """The OpenImages loader on the synthetic world (``make_synthetic("openimages")``) in
    ``cache_dir()/synthetic/openimages``: 200 train / 50 val / 100 test images, instance masks (some images
    with two instances) and ignore masks."""

    synthetic_format: ClassVar[str] = "openimages"
    default_subdirs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path | None = None, split: str = "test", **options) -> None:
        from .synthetic import ensure_synthetic, read_manifest

        root = Path(root) if root is not None else ensure_synthetic(self.synthetic_format)
        super().__init__(root, split, **options)
        manifest = read_manifest(self.root)
        self.canonical_counts = manifest["counts"]
        self.canonical_mask_counts = manifest.get("mask_counts", {})
