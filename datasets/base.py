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
    POINTING = "pointing"  # TorchRay pointing game: a class's boxes / masks (VOC 2007 test, COCO 2014 val)


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
    meta: dict = field(default_factory=dict)  # format-specific extras (COCO ann ids/iscrowd, Flickr chains, ...)

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
    config_key: ClassVar[str] = ""  # key of the per-(method, dataset) YAML configs ("cub", "voc", ...)
    eval_split: ClassVar[str] = "test"  # the split the benchmark reports on
    ON_ERROR_POLICIES: ClassVar[tuple[str, ...]] = ("fail", "skip")

    def __init__(self, root: str | Path | None = None, split: str = "test", on_error: str = "fail") -> None:
        from wsolbench.paths import dataset_root

        if split not in self.splits:
            raise DatasetError(f"{self.registry_name}: unknown split {split!r}; choose one of {self.splits}")
        if on_error not in self.ON_ERROR_POLICIES:
            raise DatasetError(f"{self.registry_name}: on_error must be one of {self.ON_ERROR_POLICIES}, "
                               f"got {on_error!r}")
        self.root = Path(root) if root is not None else dataset_root(self.default_subdir or self.registry_name)
        if not self.root.exists():
            raise DatasetError(f"{self.registry_name}: data root {self.root} does not exist. Put the dataset "
                               f"there or set WSOLBENCH_DATA (see `wsolbench data check --dataset "
                               f"{self.registry_name}`)")
        self.split = split
        self.on_error = on_error
        self.samples: list[Sample] = []
        self.class_names: list[str] = []
        self.bad_images: list[tuple[Path, str]] = []  # (path, reason) of images that failed to decode

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

    @property
    def class_synonyms(self) -> list[tuple[str, ...]]:
        """Per class, its names (first = ``class_names[k]``); datasets with synonym lists override this."""
        syn = getattr(self, "_class_synonyms", None)
        return list(syn) if syn else [(n,) for n in self.class_names]

    def load_image(self, item: "int | Sample"):
        """The RGB PIL image of a sample, applying the ``on_error`` policy to undecodable files: "fail"
        raises DatasetError naming the path; "skip" records (path, reason) in ``bad_images`` and returns None.
        Either way the failure is counted, so a run can report it (``error_report``)."""
        sample = self.samples[item] if isinstance(item, (int, np.integer)) else item
        try:
            return sample.load_image()
        except DatasetError as exc:
            self.bad_images.append((Path(sample.image_path), str(exc)))
            if self.on_error == "fail":
                raise DatasetError(f"{exc} (on_error='fail'; pass on_error='skip' / --on-error skip to skip "
                                   f"and report undecodable images)") from exc
            return None

    def iter_images(self) -> Iterator[tuple[Sample, object]]:
        """(sample, PIL image) for every sample; undecodable images follow the ``on_error`` policy."""
        for s in self.samples:
            img = self.load_image(s)
            if img is not None:
                yield s, img

    def error_report(self) -> list[str]:
        """One line per image that failed to decode (empty when none did)."""
        if not self.bad_images:
            return []
        head = [f"{self.registry_name}/{self.split}: {len(self.bad_images)} image(s) could not be decoded "
                f"(on_error={self.on_error!r})"]
        return head + [f"  {p}: {reason}" for p, reason in self.bad_images]

    def check(self, verify: bool = False) -> list[str]:
        """Problems with the layout/counts as human-readable lines (empty list = OK): the image count
        against ``canonical_counts``, the box count against ``canonical_box_counts`` where known, missing
        image/mask/label files (count and an example path); ``verify=True`` also decodes every image."""
        problems = []
        label = f"{self.registry_name}/{self.split}"
        expected = self.canonical_counts.get(self.split)
        if expected is not None and len(self.samples) != expected:
            problems.append(f"{label}: {len(self.samples)} images, the canonical count is {expected}")
        expected_boxes = getattr(self, "canonical_box_counts", {}).get(self.split)
        if expected_boxes is not None:
            n_boxes = sum(len(s.boxes) for s in self.samples)
            if n_boxes != expected_boxes:
                problems.append(f"{label}: {n_boxes} boxes, the canonical count is {expected_boxes}")
        problems += missing_file_problems(self.samples, label)
        if verify:
            problems += verify_images(self)
        return problems

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
                f"root={str(self.root)!r})")


# ------------------------------------------------------------------------------------------------
# Shared helpers for the loaders (bad-input rules live here so that every format behaves the same).


def read_text_lines(path: str | Path, what: str = "file") -> list[tuple[int, str]]:
    """Non-blank lines of a text file as (1-based line number, line) with line endings removed.

    Handles files with or without a trailing newline, CRLF/CR endings and a UTF-8 BOM; keeps spaces
    inside lines (ids with spaces). A missing file raises DatasetError naming the expected path.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{what} missing: expected {path}") from exc
    except IsADirectoryError as exc:
        raise DatasetError(f"{what}: expected a file at {path}, found a directory") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # not splitlines(): only real EOLs
    return [(i, line) for i, line in enumerate(lines, 1) if line.strip()]


def first_existing(candidates: Sequence[Path]) -> Path | None:
    for c in candidates:
        if c.exists():
            return c
    return None


def describe_candidates(candidates: Sequence[Path]) -> str:
    return ", ".join(str(c) for c in candidates)


def missing_file_problems(samples: Sequence[Sample], label: str) -> list[str]:
    """Lines naming missing image / mask / ignore / label-map files (count + first example each)."""
    groups: dict[str, list[Path]] = {"image": [], "mask": [], "ignore mask": [], "label map": []}
    for s in samples:
        if not Path(s.image_path).exists():
            groups["image"].append(Path(s.image_path))
        for m in s.mask_paths:
            if not Path(m).exists():
                groups["mask"].append(Path(m))
        if s.ignore_path is not None and not Path(s.ignore_path).exists():
            groups["ignore mask"].append(Path(s.ignore_path))
        if s.label_map_path is not None and not Path(s.label_map_path).exists():
            groups["label map"].append(Path(s.label_map_path))
    return [f"{label}: {len(paths)} {kind} file(s) missing, e.g. {paths[0]}"
            for kind, paths in groups.items() if paths]


def verify_images(dataset: "WSOLDataset") -> list[str]:
    """Decode every image (slow); lines naming each corrupt file. Does not raise."""
    bad = []
    for s in dataset.samples:
        if not Path(s.image_path).exists():
            continue  # reported by missing_file_problems
        try:
            s.load_image()
        except DatasetError as exc:
            bad.append(str(exc))
    if not bad:
        return []
    return [f"{dataset.registry_name}/{dataset.split}: {len(bad)} corrupt image(s)"] + [f"  {b}" for b in bad]


def resolve_root(cls: type, root: str | Path | None, layout_help: str = "") -> Path:
    """``root`` as a Path; by default the first existing of data-root/<d> for d in ``cls.default_subdirs``
    (else ``cls.default_subdir``). A missing root raises DatasetError naming the paths and the layout."""
    from wsolbench.paths import dataset_root

    if root is not None:
        cands = [Path(root).expanduser()]
    else:
        subdirs = getattr(cls, "default_subdirs", ()) or (cls.default_subdir or cls.registry_name,)
        cands = [dataset_root(d) for d in subdirs]
    found = first_existing(cands)
    if found is None:
        name = cls.registry_name or cls.__name__
        where = cands[0] if len(cands) == 1 else f"any of {describe_candidates(cands)}"
        raise DatasetError(f"{name}: data root {where} does not exist. Expected layout: {layout_help or '?'}. "
                           f"Pass root=..., or put the dataset under the data root (WSOLBENCH_DATA); see "
                           f"`wsolbench data check --dataset {name}`")
    return found


def parse_annotation_xml(path: str | Path) -> dict:
    """A PASCAL-VOC-style XML annotation (VOC, ILSVRC val, Flickr30k Entities) as a plain dict::

        {"filename": str, "width": int|None, "height": int|None,
         "objects": [{"names": [str, ...], "box": (xmin, ymin, xmax, ymax) | None, "difficult": bool,
                      "truncated": bool, "nobndbox": bool, "scene": bool}, ...]}

    Coordinates are returned exactly as written (no 1-based shift here; the caller knows the convention).
    A missing or malformed file raises DatasetError naming the path (and the line for XML syntax errors).
    """
    import xml.etree.ElementTree as ET

    path = Path(path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"annotation XML missing: expected {path}") from exc
    except ET.ParseError as exc:
        line = getattr(exc, "position", (None,))[0]
        raise DatasetError(f"{path}:{line}: malformed XML ({exc})") from exc
    root = tree.getroot()

    def num(el, tag, obj_index=None):
        child = el.find(tag)
        where = f"{path}: object {obj_index}" if obj_index is not None else str(path)
        if child is None or child.text is None or not child.text.strip():
            raise DatasetError(f"{where}: missing <{tag}>")
        try:
            return float(child.text.strip())
        except ValueError:
            raise DatasetError(f"{where}: <{tag}> is not a number: {child.text!r}") from None

    def flag(el, tag) -> bool:
        child = el.find(tag)
        if child is None or child.text is None or not child.text.strip():
            return False
        try:
            return int(float(child.text.strip())) > 0
        except ValueError:
            raise DatasetError(f"{path}: <{tag}> is not 0/1: {child.text!r}") from None

    size = root.find("size")
    width = height = None
    if size is not None and size.find("width") is not None:
        width, height = int(num(size, "width")), int(num(size, "height"))
    filename = (root.findtext("filename") or "").strip()
    objects = []
    for i, obj in enumerate(root.findall("object")):
        names = [(n.text or "").strip() for n in obj.findall("name")]
        if not names or not all(names):
            raise DatasetError(f"{path}: object {i} has no <name>")
        bb = obj.find("bndbox")
        box = None
        if bb is not None:
            box = (num(bb, "xmin", i), num(bb, "ymin", i), num(bb, "xmax", i), num(bb, "ymax", i))
        objects.append({"names": names, "box": box, "difficult": flag(obj, "difficult"),
                        "truncated": flag(obj, "truncated"), "nobndbox": flag(obj, "nobndbox"),
                        "scene": flag(obj, "scene")})
    return {"filename": filename, "width": width, "height": height, "objects": objects}
