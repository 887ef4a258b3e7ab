"""MS COCO 2014 for dense localization (mIoU of class maps) and the pointing game.

Layout::

    <root>/annotations/instances_{train,val}2014.json
    <root>/{train,val}2014/COCO_{train,val}2014_<12-digit id>.jpg

The instances JSON is read with pycocotools. 80 classes: category ids 1..90 mapped to 0..79 in sorted id
order (``class_names`` in that order; label-map value = class index + 1). Image order: sorted image id
(torchvision's CocoDetection order), or the order of ``list_file=`` (e.g. MCTformer's ``train_id.txt`` of
``COCO_train2014_000000xxxxxx`` names). Image labels: every category with an annotation, crowd included
(ReCAM/MCTformer). Boxes: bbox x,y,w,h → x0=x, y0=y, x1=x+w, y1=y+h; ``meta["iscrowd"]`` flags each box.

Semantic ground truth (``Sample.load_label_map``), as metrics.md / ReCAM ``annToMask.py``: zeros, then each
non-crowd annotation in annotation order writes its class index + 1 where ``annToMask`` is 1, later ones
overwrite. Built on demand, never at index time.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import ClassVar

import numpy as np

from wsolbench.registry import register_dataset

from .base import DatasetError, Sample, Task, WSOLDataset, read_text_lines, resolve_root

LAYOUT_HELP = ("<root>/annotations/instances_{train,val}2014.json and <root>/{train,val}2014/"
               "COCO_{train,val}2014_<12-digit id>.jpg")
_NAME_RE = re.compile(r"(\d+)$")


def semantic_label_map(coco, image_id: int, cat_to_index: dict[int, int]) -> np.ndarray:
    """uint8 H×W: 0 background, class index + 1 per non-crowd annotation in annotation order (later
    annotations overwrite earlier ones)."""
    info = coco.imgs[image_id]
    out = np.zeros((int(info["height"]), int(info["width"])), np.uint8)
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("iscrowd", 0):
            continue
        m = coco.annToMask(ann).astype(bool)
        out[m] = cat_to_index[ann["category_id"]] + 1
    return out


def class_mask(coco, image_id: int, cat_to_index: dict[int, int], class_index: int,
               include_crowd: bool = True) -> np.ndarray:
    """bool H×W: union of ``annToMask`` of the image's annotations of one class (pointing game GT)."""
    info = coco.imgs[image_id]
    out = np.zeros((int(info["height"]), int(info["width"])), bool)
    for ann in coco.imgToAnns.get(image_id, []):
        if cat_to_index[ann["category_id"]] == class_index and (include_crowd or not ann.get("iscrowd", 0)):
            out |= coco.annToMask(ann).astype(bool)
    return out


def load_coco(path: Path):
    """pycocotools COCO for ``path`` with a DatasetError naming the file on any problem."""
    import contextlib
    import io

    if not path.is_file():
        raise DatasetError(f"coco: instances file missing: expected {path} ({LAYOUT_HELP})")
    try:
        from pycocotools.coco import COCO
    except ImportError as exc:  # pragma: no cover - pycocotools is a dependency
        raise DatasetError("coco: pycocotools is required to read the instances JSON (pip install pycocotools)") \
            from exc
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
            return COCO(str(path))
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read COCO instances JSON ({type(exc).__name__}: {exc})") from exc


@register_dataset("coco", aliases=("coco14", "coco2014"))
class COCO2014(WSOLDataset):
    """MS COCO 2014 train/val with image labels, boxes and semantic label maps built from the instances."""

    default_subdir: ClassVar[str] = "COCO"
    default_subdirs: ClassVar[tuple[str, ...]] = ("COCO", "coco", "coco2014", "MSCOCO")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.DENSE, Task.POINTING})  # pointing: --protocol torchray-pointing
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 82783, "val": 40504}
    multi_label: ClassVar[bool] = True
    config_key: ClassVar[str] = "coco"
    eval_split: ClassVar[str] = "val"

    def __init__(self, root: str | Path | None = None, split: str = "val", *,
                 annotation_file: str | Path | None = None, images_dir: str | Path | None = None,
                 list_file: str | Path | None = None, on_error: str = "fail") -> None:
        root = resolve_root(type(self), root, LAYOUT_HELP)
        super().__init__(root, split, on_error=on_error)
        ann_path = (Path(annotation_file) if annotation_file
                    else self.root / "annotations" / f"instances_{split}2014.json")
        self.annotation_file = ann_path
        self.coco = coco = load_coco(ann_path)
        cat_ids = sorted(coco.cats)
        self.category_ids = cat_ids
        self.cat_to_index = {c: i for i, c in enumerate(cat_ids)}
        self.class_names = [coco.cats[c]["name"] for c in cat_ids]
        self.image_root = Path(images_dir) if images_dir else self.root / f"{split}2014"
        if list_file is not None:
            order = []
            for lineno, line in read_text_lines(Path(list_file), "COCO image list"):
                m = _NAME_RE.search(Path(line.strip()).stem)
                if m is None:
                    raise DatasetError(f"{list_file}:{lineno}: expected an image name ending in its numeric id, "
                                       f"got {line!r}")
                img_id = int(m.group(1))
                if img_id not in coco.imgs:
                    raise DatasetError(f"{list_file}:{lineno}: image {line.strip()!r} is not in {ann_path}")
                order.append(img_id)
        else:
            order = sorted(coco.imgs)
        samples = []
        for img_id in order:
            info = coco.imgs[img_id]
            anns = coco.imgToAnns.get(img_id, [])
            try:
                boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                     a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
                box_labels = np.asarray([self.cat_to_index[a["category_id"]] for a in anns], np.int64)
            except (KeyError, IndexError, TypeError) as exc:
                raise DatasetError(f"{ann_path}: malformed annotation of image {img_id} ({exc!r}); expected "
                                   f"bbox [x,y,w,h] and a category_id listed in categories") from None
            fname = info.get("file_name") or f"COCO_{split}2014_{img_id:012d}.jpg"
            samples.append(Sample(
                image_id=Path(fname).stem, image_path=self.image_root / fname,
                size=(int(info["width"]), int(info["height"])),
                labels=tuple(sorted(set(box_labels.tolist()))), boxes=boxes, box_labels=box_labels,
                label_map_fn=functools.partial(semantic_label_map, coco, img_id, self.cat_to_index),
                meta={"coco_id": img_id, "ann_ids": [a["id"] for a in anns],
                      "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool)}))
        self.samples = samples
        from .voc import find_ebp_flags  # TorchRay's EBP "difficult" subset (pointing game), when beside the data

        self.difficult_flags, self.difficult_file = find_ebp_flags(
            [self.root, self.root / "annotations"], ("pointing_game_ebp_coco_difficult.txt",), len(self.class_names))

    def class_mask(self, sample: Sample, class_index: int, include_crowd: bool = True) -> np.ndarray:
        """Union of the class's instance masks in ``sample`` (original resolution), for the pointing game."""
        return class_mask(self.coco, sample.meta["coco_id"], self.cat_to_index, class_index, include_crowd)


@register_dataset("synthetic-coco")
class SyntheticCOCO(COCO2014):
    """The COCO loader on the synthetic world (``make_synthetic("coco")``) in ``cache_dir()/synthetic/coco``:
    multi-object scenes, train 150 / val 60, 10 categories with non-contiguous ids, polygon and RLE
    segmentations, a few crowd annotations."""

    synthetic_format: ClassVar[str] = "coco"
    default_subdirs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path | None = None, split: str = "val", **options) -> None:
        from .synthetic import ensure_synthetic, read_manifest

        root = Path(root) if root is not None else ensure_synthetic(self.synthetic_format)
        super().__init__(root, split, **options)
        self.canonical_counts = read_manifest(self.root)["counts"]
