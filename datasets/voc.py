"""PASCAL VOC 2012 for dense localization (mIoU of class maps), and VOC 2007 for the TorchRay pointing game.

Layout (``root`` may be the VOC2012 folder, VOCdevkit, or the folder holding VOCdevkit)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      palette PNG, indices 0..20, 255 = ignore
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png   (SBD-augmented label maps, for train_aug)
    VOCdevkit/VOC2012/Annotations/<id>.xml            boxes (1-based, inclusive) + difficult flags
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt   (+ train_aug.txt if you have it)

Split lists: ``list_dir=`` (files ``<split>_id.txt`` or ``<split>.txt``, e.g. MCTformer/IRN ``voc12/``),
then ``<root>/voc12/``, then ImageSets/Segmentation. Lines may be bare ids or the DeepLab form
``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``. Counts: train 1,464, val 1,449, train_aug 10,582
(test 1,456 exists but has no public labels: loading it is an error unless labels are supplied).

Image labels (multi-hot over the 20 classes, background excluded), first found of: ``cls_labels=``
(pickled dict id → float32[20], loaded with allow_pickle), ``cls_labels.npy`` in the list dir / root /
VOC2012; else derived from the XML annotations (all objects); else from the label PNGs (unique values).
``label_source`` says which. Label maps: SegmentationClass, else SegmentationClassAug (``label_dir=``
overrides). Boxes from the XMLs are shifted to 0-based (x − 1), ``difficult`` per box.

Non-standard class sets (e.g. the synthetic world) put their names, one per line, in
``VOC2012/class_names.txt``; otherwise the 20 VOC classes are used.

VOC 2007 (``voc07``, the pointing game's VOC07 test: 4,952 images) is read by the same code from
``VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}``: image labels and boxes from
the XMLs (every object, with its ``difficult`` flag). The EBP "difficult" subset is read from
``pointing_game_ebp_voc07_difficult.txt`` (TorchRay's file: image id + 20 tab-separated 0/1 flags) in the
dataset root, VOC2007 folder or its parent; ``difficult_flags`` is None when it is not there.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from wsolbench.registry import register_dataset

from .base import (DatasetError, Sample, Task, WSOLDataset, describe_candidates, first_existing,
                   parse_annotation_xml, read_text_lines, resolve_root)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
LAYOUT_HELP = ("VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug, Annotations, "
               "ImageSets/Segmentation/<split>.txt}")
LAYOUT_HELP_07 = "VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}"


def read_ebp_flags(path: Path, num_classes: int) -> dict[str, tuple[bool, ...]]:
    """TorchRay's EBP "difficult" subset file: per line an image name and one 0/1 flag per class."""
    flags: dict[str, tuple[bool, ...]] = {}
    for lineno, line in read_text_lines(path, "EBP difficult-flag file"):
        parts = line.split()
        if len(parts) != num_classes + 1 or any(p not in ("0", "1") for p in parts[1:]):
            raise DatasetError(f"{path}:{lineno}: expected an image name and {num_classes} 0/1 flags, got {line!r}")
        flags[parts[0]] = tuple(p == "1" for p in parts[1:])
    return flags


def find_ebp_flags(dirs: list[Path], names: tuple[str, ...], num_classes: int) -> tuple[dict | None, Path | None]:
    """(flags, path) of the first EBP flag file named ``names`` in ``dirs``, or (None, None)."""
    path = first_existing([d / n for d in dirs for n in names])
    return (read_ebp_flags(path, num_classes), path) if path is not None else (None, None)


def voc_palette() -> list[int]:
    """The standard VOC colour map (256 RGB triples, flattened) used by SegmentationClass PNGs."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def parse_id_list(path: Path) -> list[str]:
    """Image ids from a split list: bare ids (spaces kept) or DeepLab '/JPEGImages/x.jpg /Seg.../x.png'."""
    ids, seen = [], {}
    for lineno, line in read_text_lines(path, "split list"):
        s = line.strip()
        if s.startswith("/") or (" " in s and s.split()[0].lower().endswith((".jpg", ".jpeg", ".png"))):
            s = Path(s.split()[0]).stem
        if s in seen:
            raise DatasetError(f"{path}:{lineno}: duplicate image id {s!r} (first on line {seen[s]})")
        seen[s] = lineno
        ids.append(s)
    return ids


def load_cls_labels(path: Path) -> dict[str, np.ndarray]:
    try:
        obj = np.load(path, allow_pickle=True)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read image labels ({exc}); expected a pickled dict "
                           f"id → float32 multi-hot saved with np.save") from exc
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict id → multi-hot vector, got {type(obj).__name__}")
    return {str(k): np.asarray(v) for k, v in obj.items()}


@register_dataset("voc", aliases=("voc12", "voc2012"))
class VOC2012(WSOLDataset):
    """PASCAL VOC 2012 segmentation splits with image-level labels and label maps."""

    default_subdir: ClassVar[str] = "VOCdevkit/VOC2012"
    default_subdirs: ClassVar[tuple[str, ...]] = ("VOCdevkit/VOC2012", "VOC2012", "VOCdevkit", "voc")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.DENSE, Task.POINTING})  # pointing: --protocol torchray-pointing
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "trainval", "train_aug", "test")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 1464, "val": 1449, "trainval": 2913,
                                                  "train_aug": 10582, "test": 1456}
    optional_splits: ClassVar[tuple[str, ...]] = ("test",)  # `data check` skips it when absent/unlabelled
    multi_label: ClassVar[bool] = True
    config_key: ClassVar[str] = "voc"
    eval_split: ClassVar[str] = "train"  # the dense-localization benchmark reports mIoU on train (1,464)
    class_names_default: ClassVar[tuple[str, ...]] = VOC_CLASSES
    year_dir: ClassVar[str] = "VOC2012"
    imagesets: ClassVar[tuple[str, ...]] = ("Segmentation",)  # ImageSets/<x>/<split>.txt, first found
    list_subdir: ClassVar[str] = "voc12"  # MCTformer/IRN-style split lists + cls_labels.npy
    layout_help: ClassVar[str] = LAYOUT_HELP
    ebp_files: ClassVar[tuple[str, ...]] = ()  # TorchRay "difficult" subset flag files (VOC 2007)

    def __init__(self, root: str | Path | None = None, split: str = "train", *,
                 list_dir: str | Path | None = None, cls_labels: str | Path | None = None,
                 label_dir: str | Path | None = None, load_boxes: bool = True, on_error: str = "fail") -> None:
        root = resolve_root(type(self), root, self.layout_help)
        super().__init__(root, split, on_error=on_error)
        self.outer_root = self.root
        self.root = self._find_voc_root(self.root)
        r = self.root
        names_file = r / "class_names.txt"
        self.class_names = ([line.strip() for _, line in read_text_lines(names_file)] if names_file.is_file()
                            else list(self.class_names_default))
        # split list
        sub = self.list_subdir
        list_dirs = ([Path(list_dir)] if list_dir else []) + [self.outer_root / sub, r / sub, r.parent.parent / sub]
        cands = [d / f"{split}_id.txt" for d in list_dirs] + [d / f"{split}.txt" for d in list_dirs] + \
            [r / "ImageSets" / kind / f"{split}.txt" for kind in self.imagesets]
        list_path = first_existing(cands)
        if list_path is None:
            raise DatasetError(f"voc: split list for {split!r} not found; looked for {describe_candidates(cands)}")
        self.list_path = list_path
        ids = parse_id_list(list_path)
        # label maps
        if label_dir is not None:
            label_dirs = [Path(label_dir)]
            if not label_dirs[0].is_dir():
                raise DatasetError(f"voc: label_dir {label_dirs[0]} does not exist")
        else:
            label_dirs = [d for d in (r / "SegmentationClass", r / "SegmentationClassAug") if d.is_dir()]
        ann_dir = r / "Annotations"
        # image labels
        labels_src = None
        if cls_labels is not None:
            if not Path(cls_labels).is_file():
                raise DatasetError(f"voc: cls_labels file missing: expected {cls_labels}")
            labels_src = Path(cls_labels)
        else:
            labels_src = first_existing([list_path.parent / "cls_labels.npy"] +
                                        [d / "cls_labels.npy" for d in list_dirs] + [r / "cls_labels.npy"])
        label_table = load_cls_labels(labels_src) if labels_src is not None else None
        self.label_source = str(labels_src) if labels_src else ("xml" if ann_dir.is_dir() else "label_png")
        k = len(self.class_names)
        samples = []
        for image_id in ids:
            s = Sample(image_id=image_id, image_path=r / "JPEGImages" / f"{image_id}.jpg", size=None)
            lm = None
            for d in label_dirs:
                p = d / f"{image_id}.png"
                if p.exists():
                    lm = p
                    break
            s.label_map_path = lm
            xml = ann_dir / f"{image_id}.xml"
            ann = parse_annotation_xml(xml) if (load_boxes or label_table is None) and xml.is_file() else None
            if ann is not None:
                s.size = (ann["width"], ann["height"]) if ann["width"] else None
                boxes, blabels, diff = [], [], []
                for i, obj in enumerate(ann["objects"]):
                    name = obj["names"][0]
                    if name not in self.class_names:
                        raise DatasetError(f"{xml}: object {i} has class {name!r}, not one of {self.class_names}")
                    if obj["box"] is not None:
                        x0, y0, x1, y1 = obj["box"]
                        boxes.append((x0 - 1, y0 - 1, x1 - 1, y1 - 1))  # 1-based inclusive → 0-based
                        blabels.append(self.class_names.index(name))
                        diff.append(obj["difficult"])
                s.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
                s.box_labels = np.asarray(blabels, np.int64)
                s.difficult = np.asarray(diff, bool)
            if label_table is not None:
                vec = label_table.get(image_id)
                if vec is None:
                    raise DatasetError(f"{labels_src}: no image labels for {image_id!r} (listed in {list_path})")
                if vec.shape != (k,):
                    raise DatasetError(f"{labels_src}: labels of {image_id!r} have shape {vec.shape}, expected "
                                       f"({k},) for {k} classes")
                s.labels = tuple(int(i) for i in np.flatnonzero(vec > 0))
            elif ann is not None:
                s.labels = tuple(sorted({self.class_names.index(o["names"][0]) for o in ann["objects"]}))
            elif lm is not None:
                vals = np.unique(s.load_label_map())
                s.labels = tuple(int(v) - 1 for v in vals if 0 < v < 255)
            else:
                raise DatasetError(f"voc: no image labels for {image_id!r}: no cls_labels.npy, no {xml} and no "
                                   f"label map in {describe_candidates(label_dirs) or r / 'SegmentationClass'}")
            samples.append(s)
        self.samples = samples
        self.difficult_flags, self.difficult_file = find_ebp_flags(
            list(dict.fromkeys([self.outer_root, r, r.parent])), self.ebp_files, k)

    @classmethod
    def _find_voc_root(cls, root: Path) -> Path:
        year = cls.year_dir
        for c in (root, root / year, root / "VOCdevkit" / year):
            if (c / "JPEGImages").is_dir() or (c / "ImageSets").is_dir():
                return c
        raise DatasetError(f"voc: no {year} folder under {root}; expected {cls.layout_help} (looked in {root}, "
                           f"{root / year}, {root / 'VOCdevkit' / year})")

    def check(self, verify: bool = False) -> list[str]:
        problems = super().check(verify)
        no_map = [s.image_id for s in self.samples if s.label_map_path is None]
        if no_map and self.split in ("train", "val", "trainval"):
            example = self.root / "SegmentationClass" / f"{no_map[0]}.png"
            problems.append(f"voc/{self.split}: {len(no_map)} image(s) without a label map in "
                            f"SegmentationClass/SegmentationClassAug, e.g. {example}")
        return problems


@register_dataset("voc07", aliases=("voc2007",))
class VOC2007(VOC2012):
    """PASCAL VOC 2007 (detection splits) for the TorchRay pointing game: boxes with difficult flags."""

    default_subdir: ClassVar[str] = "VOCdevkit/VOC2007"
    default_subdirs: ClassVar[tuple[str, ...]] = ("VOCdevkit/VOC2007", "VOC2007", "VOCdevkit", "voc07")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.POINTING})
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "trainval", "test")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 2501, "val": 2510, "trainval": 5011, "test": 4952}
    optional_splits: ClassVar[tuple[str, ...]] = ()
    config_key: ClassVar[str] = "voc07"
    eval_split: ClassVar[str] = "test"  # the pointing game's VOC07 test
    year_dir: ClassVar[str] = "VOC2007"
    imagesets: ClassVar[tuple[str, ...]] = ("Main", "Segmentation")
    list_subdir: ClassVar[str] = "voc07"
    layout_help: ClassVar[str] = LAYOUT_HELP_07
    ebp_files: ClassVar[tuple[str, ...]] = ("pointing_game_ebp_voc07_difficult.txt", "ebp_voc07_difficult.txt")

    def check(self, verify: bool = False) -> list[str]:
        return WSOLDataset.check(self, verify)  # no label maps expected in the detection splits


@register_dataset("synthetic-voc")
class SyntheticVOC(VOC2012):
    """The VOC loader on the synthetic world (``make_synthetic("voc")``) in ``cache_dir()/synthetic/voc``:
    multi-object scenes, train 100 / val 50 / train_aug 150 (train + 50 SBD-like extras) / test 60 (held
    out, labelled), 10 classes."""

    synthetic_format: ClassVar[str] = "voc"
    default_subdirs: ClassVar[tuple[str, ...]] = ()
    eval_split: ClassVar[str] = "test"

    def __init__(self, root: str | Path | None = None, split: str = "test", **options) -> None:
        from .synthetic import ensure_synthetic, read_manifest

        root = Path(root) if root is not None else ensure_synthetic(self.synthetic_format)
        super().__init__(root, split, **options)
        self.canonical_counts = read_manifest(self.outer_root)["counts"]
