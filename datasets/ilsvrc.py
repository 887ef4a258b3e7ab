"""ILSVRC 2012 (ImageNet-1k) for WSOL: wsolevaluation metadata and the original val XMLs.

wsolevaluation layout (``layout="wsol"``)::

    <root>/train/<synset>/<file>.JPEG        train  (metadata/ILSVRC/train, or a folder scan if absent)
    <root>/val/ILSVRC2012_val_00000001.JPEG  test = ILSVRC 2012 val, 50,000 images, 80,477 boxes
    <root>/val2/<label>/<k>.jpeg             val  = ImageNetV2 threshold-0.7, 10,000 images, 18,532 boxes
    metadata/ILSVRC/<split>/{image_ids,class_labels,image_sizes,localization}.txt

Original val annotations (``layout="original"``, split "test")::

    <xml_dir>/ILSVRC2012_val_00000001.xml    <size><width>/<height>, <object><name>nXXXXXXXX</name>
                                             <bndbox><xmin>/<ymin>/<xmax>/<ymax> (used as x0,y0,x1,y1)
    images: <root>/val/<filename>.JPEG (or <root>/Data/CLS-LOC/val)
    xml_dir: given, or the first of <root>/Annotations/CLS-LOC/val, <root>/val_xml, <root>/bbox_val,
             <root>/val (the bbox_val tarball extracts next to the images) that holds *.xml

Class index = position of the synset in sorted order. Class names and synonyms come from the synset
mapping (``n01440764 tench, Tinca tinca``): ``synset_mapping=``, <root>/LOC_synset_mapping.txt,
<root>/synset_words.txt, <root>/../LOC_synset_mapping.txt; for the 1000 standard classes, timm's copy of
the same table is used when no file is found. ``class_synonyms[k]`` lists all names of class k.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

import numpy as np

from wsolbench.registry import register_dataset

from . import wsol_metadata as wm
from .base import (DatasetError, Sample, Task, WSOLDataset, describe_candidates, first_existing,
                   parse_annotation_xml, read_text_lines, resolve_root)

LAYOUT_HELP = ("ILSVRC: <root>/{train/<synset>/, val/ILSVRC2012_val_*.JPEG, val2/<label>/*.jpeg} with "
               "metadata/ILSVRC/{train,val,test}/ (wsolevaluation), or the val XMLs "
               "(<root>/Annotations/CLS-LOC/val/*.xml or <root>/val/*.xml) with a synset mapping file")
MAPPING_NAMES = ("LOC_synset_mapping.txt", "synset_words.txt", "synset_mapping.txt")
IMAGE_EXTS = (".jpeg", ".jpg", ".png")


def parse_synset_mapping(path: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """(synsets in file order, synonyms per synset) from '<wnid> name, synonym, ...' lines."""
    wnids, syns = [], []
    for lineno, line in read_text_lines(path, "synset mapping"):
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].startswith("n"):
            raise DatasetError(f"{path}:{lineno}: malformed line, expected '<wnid> name, synonym, ...', got {line!r}")
        wnids.append(parts[0])
        syns.append(tuple(s.strip() for s in parts[1].split(",") if s.strip()))
    return wnids, syns


def timm_imagenet_mapping() -> tuple[list[str], list[tuple[str, ...]]] | None:
    """The standard 1000 synsets (sorted) and their names from timm's package data, without importing timm."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    info = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"
    synsets_file, lemma_file = info / "imagenet_synsets.txt", info / "imagenet_synset_to_lemma.txt"
    if not synsets_file.is_file() or not lemma_file.is_file():
        return None
    wnids = [line for _, line in read_text_lines(synsets_file)]
    lemmas = {}
    for _, line in read_text_lines(lemma_file):
        k, _, v = line.partition("\t")
        lemmas[k] = v
    syns = [tuple(s.strip() for s in lemmas.get(w, w).split(",") if s.strip()) for w in wnids]
    return wnids, syns


@register_dataset("ilsvrc", aliases=("imagenet",))
class ILSVRC(WSOLDataset):
    """ILSVRC 2012 with WSOL splits (test = val 2012, val = ImageNetV2)."""

    default_subdir: ClassVar[str] = "ILSVRC"
    default_subdirs: ClassVar[tuple[str, ...]] = ("ILSVRC", "imagenet", "ILSVRC2012")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.BOXES})
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 1281167, "val": 10000, "test": 50000}
    canonical_box_counts: ClassVar[dict[str, int]] = {"val": 18532, "test": 80477}
    multi_label: ClassVar[bool] = False
    config_key: ClassVar[str] = "ilsvrc"
    metadata_name: ClassVar[str] = "ILSVRC"

    def __init__(self, root: str | Path | None = None, split: str = "test", *, layout: str = "auto",
                 metadata_dir: str | Path | None = None, synset_mapping: str | Path | None = None,
                 xml_dir: str | Path | None = None, images_dir: str | Path | None = None,
                 on_error: str = "fail") -> None:
        root = resolve_root(type(self), root, LAYOUT_HELP)
        super().__init__(root, split, on_error=on_error)
        self.synsets, syns = self._load_mapping(synset_mapping)
        if layout == "auto":
            layout = self._detect_layout(metadata_dir, xml_dir)
        if layout not in ("wsol", "original"):
            raise DatasetError(f"ilsvrc: layout must be 'auto', 'wsol' or 'original', got {layout!r}")
        self.layout = layout
        if layout == "wsol":
            self._load_wsol(metadata_dir, images_dir)
        else:
            self._load_original(xml_dir, images_dir)
        n = max((s.labels[0] for s in self.samples), default=-1) + 1
        if syns is not None and len(syns) >= n:
            self._class_synonyms = syns
            self.class_names = [s[0] if s else w for s, w in zip(syns, self.synsets)]
        else:
            self._class_synonyms = None
            self.class_names = [f"class_{k}" for k in range(n)]

    # ---------------------------------------------------------------------------------- mapping
    def _load_mapping(self, synset_mapping):
        if synset_mapping is not None:
            path = Path(synset_mapping)
            if not path.is_file():
                raise DatasetError(f"ilsvrc: synset mapping missing: expected {path} ('<wnid> name, synonyms')")
        else:
            path = first_existing([self.root / n for n in MAPPING_NAMES] +
                                  [self.root.parent / n for n in MAPPING_NAMES])
        if path is not None:
            wnids, syns = parse_synset_mapping(path)
            order = sorted(range(len(wnids)), key=lambda i: wnids[i])  # class index = sorted synset order
            self.mapping_path = path
            return [wnids[i] for i in order], [syns[i] for i in order]
        self.mapping_path = None
        fallback = timm_imagenet_mapping()
        if fallback is not None:
            return fallback
        return [], None

    def _detect_layout(self, metadata_dir, xml_dir) -> str:
        try:
            wm.find_split_dir(self.metadata_name, self.split, self.root, metadata_dir)
            return "wsol"
        except DatasetError as exc:
            if self.split == "train" and (self.root / "train").is_dir():
                return "wsol"  # folder scan of train/<synset>/
            if self.split == "test" and (xml_dir is not None or self._find_xml_dir(None, quiet=True)):
                return "original"
            raise DatasetError(f"ilsvrc: {exc}. Alternatively the original val XMLs: {LAYOUT_HELP}") from None

    # ------------------------------------------------------------------------------------- wsol
    def _load_wsol(self, metadata_dir, images_dir) -> None:
        self.image_root = Path(images_dir) if images_dir else self.root
        try:
            split_dir = wm.find_split_dir(self.metadata_name, self.split, self.root, metadata_dir)
        except DatasetError:
            if self.split == "train" and (self.root / "train").is_dir():
                self._scan_train()
                return
            raise
        meta = wm.load_split(split_dir, "boxes")
        self.metadata_path = split_dir
        self.samples = wm.box_samples(meta, self.image_root)

    def _scan_train(self) -> None:
        """train/<synset>/<file>: the ImageFolder layout (used when no train metadata is given)."""
        if not self.synsets:
            raise DatasetError(f"ilsvrc train: scanning {self.root / 'train'} needs the synset list "
                               f"(LOC_synset_mapping.txt in {self.root})")
        index = {w: k for k, w in enumerate(self.synsets)}
        samples = []
        for d in sorted(p for p in (self.root / "train").iterdir() if p.is_dir()):
            if d.name not in index:
                raise DatasetError(f"ilsvrc train: folder {d} is not a synset of the mapping")
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    rel = f"train/{d.name}/{f.name}"
                    samples.append(Sample(image_id=rel, image_path=self.image_root / rel, size=None,
                                          labels=(index[d.name],)))
        self.metadata_path = self.root / "train"
        self.samples = samples

    # --------------------------------------------------------------------------------- original
    def _find_xml_dir(self, xml_dir, quiet: bool = False) -> Path | None:
        cands = [Path(xml_dir)] if xml_dir is not None else [
            self.root / "Annotations" / "CLS-LOC" / "val", self.root / "val_xml", self.root / "bbox_val",
            self.root / "val", self.root / "Annotations" / "val"]
        for c in cands:
            if c.is_dir() and next(c.glob("*.xml"), None) is not None:
                return c
        if quiet:
            return None
        raise DatasetError(f"ilsvrc: no val XML annotations (*.xml) found in {describe_candidates(cands)}")

    def _load_original(self, xml_dir, images_dir) -> None:
        if self.split != "test":
            raise DatasetError(f"ilsvrc: layout='original' provides the test split (ILSVRC 2012 val XMLs) only, "
                               f"not {self.split!r}; use the wsolevaluation metadata for val (ImageNetV2)")
        if not self.synsets:
            raise DatasetError(f"ilsvrc: the val XMLs name synsets; a synset mapping file is needed to number "
                               f"them (looked for {', '.join(MAPPING_NAMES)} in {self.root})")
        xdir = self._find_xml_dir(xml_dir)
        index = {w: k for k, w in enumerate(self.synsets)}
        img_dir = Path(images_dir) if images_dir else (first_existing(
            [self.root / "val", self.root / "Data" / "CLS-LOC" / "val"]) or self.root / "val")
        samples = []
        for xml in sorted(xdir.glob("*.xml")):
            ann = parse_annotation_xml(xml)
            fname = ann["filename"] or xml.stem
            if Path(fname).suffix.lower() not in IMAGE_EXTS:
                fname += ".JPEG"
            boxes, labels = [], []
            for i, obj in enumerate(ann["objects"]):
                wnid = obj["names"][0]
                if wnid not in index:
                    raise DatasetError(f"{xml}: object {i} names synset {wnid!r}, not in the synset mapping")
                if obj["box"] is not None:
                    boxes.append(obj["box"])
                    labels.append(index[wnid])
            if not labels:
                raise DatasetError(f"{xml}: no <object> with a <bndbox>")
            size = (ann["width"], ann["height"]) if ann["width"] else None
            samples.append(Sample(image_id=f"val/{fname}", image_path=img_dir / fname, size=size,
                                  labels=(labels[0],), boxes=np.asarray(boxes, np.float32),
                                  box_labels=np.asarray(labels, np.int64)))
        self.metadata_path = xdir
        self.samples = samples


@register_dataset("synthetic-ilsvrc")
class SyntheticILSVRC(ILSVRC):
    """The ILSVRC loader on the synthetic world (``make_synthetic("ilsvrc")``) in
    ``cache_dir()/synthetic/ilsvrc``: 200 train / 50 val / 100 test images, val XMLs and a synset mapping
    with synonyms; about a quarter of the images hold two instances (several boxes)."""

    synthetic_format: ClassVar[str] = "ilsvrc"
    default_subdirs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path | None = None, split: str = "test", **options) -> None:
        from .synthetic import ensure_synthetic, read_manifest

        root = Path(root) if root is not None else ensure_synthetic(self.synthetic_format)
        super().__init__(root, split, **options)
        manifest = read_manifest(self.root)
        self.canonical_counts = manifest["counts"]
        self.canonical_box_counts = manifest.get("box_counts", {})
