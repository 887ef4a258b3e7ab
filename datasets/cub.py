"""CUB-200-2011: the original release layout and the wsolevaluation metadata layout (incl. CUBV2 val).

Original release (``layout="original"``; splits train/test)::

    <root>/images.txt                 <id> <class_dir>/<file>.jpg
    <root>/image_class_labels.txt     <id> <1..200>
    <root>/train_test_split.txt       <id> <1 = train, 0 = test>
    <root>/bounding_boxes.txt         <id> <x> <y> <w> <h>      (floats; box = x, y, x+w, y+h)
    <root>/classes.txt                <n> <class_dir>
    <root>/images/<class_dir>/<file>.jpg

wsolevaluation (``layout="wsol"``; splits train/val/test, val = CUBV2)::

    <images>/<class_dir>/<file>.jpg   <images> = <root>/images if it exists, else <root> (= dataset/CUB)
    metadata/CUB/<split>/{image_ids,class_labels,image_sizes,localization}.txt   (see ``metadata_dir``)

Masks: the separate segmentations release ``segmentations/<class_dir>/<file>.png`` (looked for in
``segmentations_dir``, <root>/segmentations, <root>/../segmentations). When every image of the split has
one, samples carry ``mask_paths`` and the dataset adds the ``masks`` task; a partial set is an error.
Image ids are ``<class_dir>/<file>.jpg`` in both layouts, so caches agree across layouts.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from wsolbench.classnames import class_text
from wsolbench.registry import register_dataset

from . import wsol_metadata as wm
from .base import DatasetError, Sample, Task, WSOLDataset, first_existing, read_text_lines, resolve_root

LAYOUT_HELP = ("CUB_200_2011 original release (images.txt, image_class_labels.txt, train_test_split.txt, "
               "bounding_boxes.txt, classes.txt, images/<class_dir>/<file>.jpg) or the wsolevaluation layout "
               "(<root>/<class_dir>/<file>.jpg with metadata/CUB/{train,val,test}/image_ids.txt, ...)")
ORIGINAL_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


@register_dataset("cub")
class CUB200(WSOLDataset):
    """CUB-200-2011 (boxes; masks when the segmentations release is present)."""

    default_subdir: ClassVar[str] = "CUB"
    default_subdirs: ClassVar[tuple[str, ...]] = ("CUB", "CUB_200_2011")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.BOXES})
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 5994, "val": 1000, "test": 5794}
    canonical_box_counts: ClassVar[dict[str, int]] = {"train": 5994, "val": 1000, "test": 5794}
    multi_label: ClassVar[bool] = False
    config_key: ClassVar[str] = "cub"
    metadata_name: ClassVar[str] = "CUB"

    def __init__(self, root: str | Path | None = None, split: str = "test", *, layout: str = "auto",
                 metadata_dir: str | Path | None = None, images_dir: str | Path | None = None,
                 segmentations_dir: str | Path | None = None, on_error: str = "fail") -> None:
        root = resolve_root(type(self), root, LAYOUT_HELP)
        super().__init__(root, split, on_error=on_error)
        if layout == "auto":  # the wsolevaluation metadata when it can be found (it has val), else original
            try:
                wm.find_split_dir(self.metadata_name, split, self.root, metadata_dir)
                layout = "wsol"
            except DatasetError as exc:
                if not (self.root / "images.txt").is_file():
                    raise DatasetError(f"cub: {self.root} holds neither layout. {exc}. Or the original "
                                       f"release: {LAYOUT_HELP}") from None
                layout = "original"
        if layout not in ("wsol", "original"):
            raise DatasetError(f"cub: layout must be 'auto', 'wsol' or 'original', got {layout!r}")
        self.layout = layout
        self.tasks = frozenset(type(self).tasks)
        self.class_dirs: list[str] = []
        if layout == "original":
            self._load_original(images_dir)
        else:
            self._load_wsol(metadata_dir, images_dir)
        self.class_names = [class_text(d, synonyms="all") for d in self.class_dirs]
        self._attach_segmentations(segmentations_dir)

    # ----------------------------------------------------------------------------------------- wsol
    def _load_wsol(self, metadata_dir, images_dir) -> None:
        split_dir = wm.find_split_dir(self.metadata_name, self.split, self.root, metadata_dir)
        meta = wm.load_split(split_dir, "boxes")
        self.metadata_path = split_dir
        self.image_root = Path(images_dir) if images_dir else (
            self.root / "images" if (self.root / "images").is_dir() else self.root)
        self.samples = wm.box_samples(meta, self.image_root)
        self.class_dirs = self._class_dirs_from(meta)

    def _class_dirs_from(self, meta: wm.WSOLMetadata) -> list[str]:
        classes_txt = first_existing([self.root / "classes.txt", self.root.parent / "classes.txt",
                                      self.root.parent / "CUB_200_2011" / "classes.txt"])
        if classes_txt is not None:
            return _parse_classes_txt(classes_txt)
        all_labels = wm.labels_of_all_splits(meta.directory, meta.labels)
        n = max(all_labels.values(), default=-1) + 1
        dirs: list[str | None] = [None] * n
        for image_id, lab in all_labels.items():
            if dirs[lab] is None and "/" in image_id:
                dirs[lab] = image_id.split("/", 1)[0]
        return [d if d is not None else f"class_{k}" for k, d in enumerate(dirs)]

    # ------------------------------------------------------------------------------------- original
    def _load_original(self, images_dir) -> None:
        if self.split == "val":
            raise DatasetError(f"cub: the original CUB-200-2011 release has no val split (expected "
                               f"{self.root / 'images.txt'} ... to hold train/test only); use layout='wsol' "
                               f"with the wsolevaluation metadata (CUBV2 val)")
        r = self.root
        paths = _parse_id_table(r / "images.txt", 1, str)
        labels = _parse_id_table(r / "image_class_labels.txt", 1, int)
        is_train = _parse_id_table(r / "train_test_split.txt", 1, int)
        boxes = _parse_id_table(r / "bounding_boxes.txt", 4, float, multi=True)
        classes_txt = r / "classes.txt"
        self.class_dirs = _parse_classes_txt(classes_txt) if classes_txt.is_file() else []
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
            missing = [i for i in paths if i not in table]
            if missing:
                raise DatasetError(f"{r / name}: no entry for {len(missing)} image id(s) of images.txt, "
                                   f"e.g. {missing[0]!r}")
        self.image_root = Path(images_dir) if images_dir else r / "images"
        self.metadata_path = r
        want = 1 if self.split == "train" else 0
        samples = []
        n_cls = max(labels.values(), default=0)
        for cub_id, rel in paths.items():
            if is_train[cub_id] not in (0, 1):
                raise DatasetError(f"{r / 'train_test_split.txt'}: id {cub_id!r} has is_train "
                                   f"{is_train[cub_id]}, expected 0 or 1")
            if is_train[cub_id] != want:
                continue
            lab = labels[cub_id] - 1
            if lab < 0:
                raise DatasetError(f"{r / 'image_class_labels.txt'}: id {cub_id!r} has class "
                                   f"{labels[cub_id]}, expected 1..{n_cls}")
            b = boxes.get(cub_id, [])
            arr = np.asarray([(x, y, x + w, y + h) for x, y, w, h in b], np.float32).reshape(-1, 4)
            samples.append(Sample(image_id=rel, image_path=self.image_root / rel, size=None, labels=(lab,),
                                  boxes=arr, box_labels=np.full(len(arr), lab, np.int64),
                                  meta={"cub_id": cub_id}))
        no_box = [s.image_id for s in samples if len(s.boxes) == 0]
        if no_box:
            raise DatasetError(f"{r / 'bounding_boxes.txt'}: no box for {len(no_box)} image(s), e.g. {no_box[0]!r}")
        self.samples = samples
        if not self.class_dirs:
            dirs: dict[int, str] = {}
            for cub_id, rel in paths.items():
                dirs.setdefault(labels[cub_id] - 1, rel.split("/", 1)[0])
            self.class_dirs = [dirs.get(k, f"class_{k}") for k in range(n_cls)]

    # -------------------------------------------------------------------------------- segmentations
    def _attach_segmentations(self, segmentations_dir) -> None:
        if segmentations_dir is not None:
            seg = Path(segmentations_dir)
            if not seg.is_dir():
                raise DatasetError(f"cub: segmentations_dir {seg} does not exist (expected "
                                   f"segmentations/<class_dir>/<file>.png from the CUB segmentations release)")
        else:
            seg = first_existing([self.root / "segmentations", self.root.parent / "segmentations",
                                  self.root.parent / "CUB_200_2011" / "segmentations"])
        if seg is None or not self.samples:
            return
        paths = [seg / Path(s.image_id).with_suffix(".png") for s in self.samples]
        present = [p.exists() for p in paths]
        if not any(present):
            return  # e.g. CUBV2 val: no segmentations exist for these images
        if not all(present):
            missing = [p for p, ok in zip(paths, present) if not ok]
            raise DatasetError(f"cub/{self.split}: segmentation masks in {seg} cover only "
                               f"{sum(present)}/{len(paths)} images; missing e.g. {missing[0]}. Complete the "
                               f"segmentations release or pass segmentations_dir pointing elsewhere")
        for s, p in zip(self.samples, paths):
            s.mask_paths = (p,)
        self.segmentations_dir = seg
        self.tasks = self.tasks | {Task.MASKS}


def _parse_classes_txt(path: Path) -> list[str]:
    table = _parse_id_table(path, 1, str)
    try:
        items = sorted(table.items(), key=lambda kv: int(kv[0]))
    except ValueError:
        raise DatasetError(f"{path}: class ids must be integers ('<n> <class_dir>')") from None
    return [v for _, v in items]


def _parse_id_table(path: Path, n_values: int, conv, multi: bool = False) -> dict:
    """'<id> <v1> ... <vn>' lines (whitespace separated; for one string value the rest of the line, so paths
    may contain spaces)."""
    out: dict = {}
    for lineno, line in read_text_lines(path, f"CUB {path.name}"):
        parts = line.split(None, 1) if (n_values == 1 and conv is str) else line.split()
        if len(parts) != n_values + 1:
            raise DatasetError(f"{path}:{lineno}: malformed line, expected '<id>' and {n_values} value(s), "
                               f"got {line!r}")
        key = parts[0]
        try:
            vals = [conv(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: malformed value in {line!r}") from None
        value = vals[0] if n_values == 1 else tuple(vals)
        if multi:
            out.setdefault(key, []).append(value)
        else:
            if key in out:
                raise DatasetError(f"{path}:{lineno}: duplicate id {key!r}")
            out[key] = value
    return out


@register_dataset("synthetic-cub")
class SyntheticCUB(CUB200):
    """The CUB loader on the synthetic world (``make_synthetic("cub")``), generated on first use in
    ``cache_dir()/synthetic/cub``: 200 train / 60 val / 100 test images, 10 shape classes, segmentations."""

    synthetic_format: ClassVar[str] = "cub"
    default_subdirs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path | None = None, split: str = "test", **options) -> None:
        from .synthetic import ensure_synthetic, read_manifest

        root = Path(root) if root is not None else ensure_synthetic(self.synthetic_format)
        options.setdefault("layout", "wsol")
        super().__init__(root, split, **options)
        self.canonical_counts = read_manifest(self.root)["counts"]
        self.canonical_box_counts = read_manifest(self.root).get("box_counts", {})
