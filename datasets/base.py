"""The common sample type and dataset base class every loader returns.

Boxes inside the library are always x0, y0, x1, y1 in ORIGINAL image pixels (float); each loader converts
from its on-disk convention once, at load time. Pixel ground truth is loaded lazily.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Sequence

import numpy as np


class Task(str, enum.Enum):
    """What ground truth a dataset carries, hence which metrics apply."""

    BOXES = "boxes"  # MaxBoxAcc v1/V2, Top-1/Top-5/GT-known Loc
    MASKS = "masks"  # PxAP, pIoU (binary FG mask + ignore mask)
    DENSE = "dense"  # mIoU over a class label map (255 = ignore), pointing game
    PHRASES = "phrases"  # phrase grounding: pointing accuracy, grounding box accuracy


class DatasetError(ValueError):
    """Bad or missing data on disk; the message names the file (and line/field) and the fix."""


@dataclass
class Phrase:
    """A grounded phrase (Flickr30k Entities style): text plus the boxes of the entity it refers to."""

    text: str
    boxes: np.ndarray  # (N, 4) float, x0,y0,x1,y1 original pixels (0-based)
    entity_id: str = ""
    types: tuple[str, ...] = ()
    sentence_index: int = 0
    first_word_index: int = 0


@dataclass
class Sample:
    """One image and its annotations. ``load_*`` read pixels lazily (nothing is decoded at index time)."""

    image_id: str
    image_path: Path
    size: tuple[int, int] | None  # (W, H) of the original image; None when the metadata lacks it
    labels: tuple[int, ...] = ()  # class indices present (single-label datasets: one)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (N,4) x0y0x1y1
    box_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # (N,) class per box
    mask_paths: tuple[Path, ...] = ()  # instance/FG masks (OpenImages, CUB segmentations)
    ignore_path: Path | None = None  # ignore mask (OpenImages)
    label_map_path: Path | None = None  # class-index PNG, 255 = ignore (VOC)
    label_map_fn: Callable[[], np.ndarray] | None = None  # built on demand (COCO from instances JSON)
    captions: tuple[str, ...] = ()
    phrases: tuple[Phrase, ...] = ()
    difficult: np.ndarray | None = None  # (N,) bool per box where the format has it (VOC)

    @property
    def label(self) -> int:
        """The single class label (single-label datasets)."""
        if len(self.labels) != 1:
            raise DatasetError(f"{self.image_id}: expected one class label, has {list(self.labels)}")
        return self.labels[0]

    def load_image(self):
        """The image as an RGB PIL image; a corrupt file raises DatasetError naming the path."""
        from PIL import Image

        try:
            with Image.open(self.image_path) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as exc:
            raise DatasetError(f"image file missing: {self.image_path}") from exc
        except Exception as exc:  # PIL raises several types for truncated/corrupt files
            raise DatasetError(f"cannot decode image {self.image_path}: {exc}") from exc

    def load_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """(foreground, ignore) boolean H×W at original resolution: masks OR-ed (>0.5 of 0..1 grayscale);
        ignore = ignore PNG > 0.5 and not foreground (the wsolevaluation rule)."""
        from PIL import Image

        if not self.mask_paths:
            raise DatasetError(f"{self.image_id}: this sample has no pixel masks")
        fg = None
        for p in self.mask_paths:
            m = _read_gray01(p) > 0.5
            fg = m if fg is None else (fg | m)
        if self.ignore_path is not None:
            ign = (_read_gray01(self.ignore_path) > 0.5) & ~fg
        else:
            ign = np.zeros_like(fg)
        return fg, ign

    def load_label_map(self) -> np.ndarray:
        """Class-index map (uint8, 0 = background, k+1 = class k, 255 = ignore) at original resolution."""
        from PIL import Image

        if self.label_map_fn is not None:
            return self.label_map_fn()
        if self.label_map_path is None:
            raise DatasetError(f"{self.image_id}: this sample has no dense label map")
        try:
            with Image.open(self.label_map_path) as im:
                return np.asarray(im, dtype=np.uint8).copy()  # palette PNG → indices, not colours
        except FileNotFoundError as exc:
            raise DatasetError(f"label map missing: {self.label_map_path}") from exc


def _read_gray01(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError as exc:
        raise DatasetError(f"mask file missing: {path}") from exc
    return arr


class WSOLDataset:
    """Base class: an indexed, lazily loaded split of one dataset.

    Subclasses set ``tasks``, ``canonical_counts`` and fill ``self.samples`` and ``self.class_names`` in
    ``__init__`` from files under ``root`` (default: the data-root setting + ``default_subdir``).
    """

    registry_name: ClassVar[str] = ""
    default_subdir: ClassVar[str] = ""
    tasks: ClassVar[frozenset[Task]] = frozenset()
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    canonical_counts: ClassVar[dict[str, int]] = {}
    multi_label: ClassVar[bool] = False

    def __init__(self, root: str | Path | None = None, split: str = "test") -> None:
        from wsolbench.paths import dataset_root

        if split not in self.splits:
            raise DatasetError(f"{self.registry_name}: unknown split {split!r}; choose one of {self.splits}")
        self.root = Path(root) if root is not None else dataset_root(self.default_subdir or self.registry_name)
        if not self.root.exists():
            raise DatasetError(f"{self.registry_name}: data root {self.root} does not exist. Put the dataset "
                               f"there or set WSOLBENCH_DATA (see `wsolbench data check --dataset "
                               f"{self.registry_name}`)")
        self.split = split
        self.samples: list[Sample] = []
        self.class_names: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int]) -> "WSOLDataset":
        """A shallow copy holding only ``indices`` (used by ``--limit``)."""
        import copy

        new = copy.copy(self)
        new.samples = [self.samples[i] for i in indices]
        return new

    def check(self) -> list[str]:
        """Problems with the layout/counts as human-readable lines (empty list = OK)."""
        problems = []
        expected = self.canonical_counts.get(self.split)
        if expected is not None and len(self.samples) != expected:
            problems.append(f"{self.registry_name}/{self.split}: {len(self.samples)} images, the canonical "
                            f"count is {expected}")
        missing = [s.image_path for s in self.samples if not Path(s.image_path).exists()]
        if missing:
            problems.append(f"{len(missing)} image files missing, e.g. {missing[0]}")
        return problems

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
                f"root={str(self.root)!r})")
