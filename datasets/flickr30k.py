"""Flickr30k Entities: phrases grounded to boxes, and the grounding evaluation samples.

Layout (BryanPlummer/flickr30k_entities + the Flickr30k images)::

    <root>/Sentences/<id>.txt     5 lines; phrases written [/EN#<chain>/<type>[/<type2>...] words]
                                  chain 0 = notvisual (never annotated)
    <root>/Annotations/<id>.xml   <size>; <object>s with one or more <name>chain</name> and either a
                                  <bndbox> (1-based, inclusive xmin..ymax) or <nobndbox>/<scene> flags
    <root>/{train,val,test}.txt   image-id splits (29,783 / 1,000 / 1,000)
    images: ``images_dir=``, or the first of <root>/flickr30k_images, <root>/flickr30k-images,
            <root>/flickr30k_images/flickr30k_images, <root>/../flickr30k_images, <root>/../flickr30k-images

A ``Sample`` has the 5 plain sentences as ``captions`` and one ``Phrase`` per annotated phrase occurrence
(text as written, the boxes of its chain — 0-based, all boxes of the chain, empty for notvisual / nobndbox /
scene chains — chain id, types, sentence index, first word index). ``Sample.boxes`` holds every XML box once
(``box_labels`` = -1: Flickr30k has no classes). An object naming several chains gives its box to each.

``grounding_samples`` builds the WWbL evaluation set, ``phrase_queries`` the per-phrase pointing queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from wsolbench.registry import register_dataset

from .base import (DatasetError, Phrase, Sample, Task, WSOLDataset, first_existing, parse_annotation_xml,
                   read_text_lines, resolve_root)

LAYOUT_HELP = ("<root>/Sentences/<id>.txt, <root>/Annotations/<id>.xml, <root>/{train,val,test}.txt and the "
               "images in <root>/flickr30k_images/<id>.jpg (or images_dir=)")


@dataclass
class ParsedPhrase:
    text: str
    chain: str
    types: tuple[str, ...]
    first_word_index: int


@dataclass
class ParsedSentence:
    text: str  # the sentence without markup
    phrases: list[ParsedPhrase]


def parse_sentence(line: str, where: str = "") -> ParsedSentence:
    """One Sentences/<id>.txt line → plain text + phrases (the reference parser's tokenisation)."""
    words: list[str] = []
    phrases: list[ParsedPhrase] = []
    current: list[str] | None = None
    head: tuple[str, tuple[str, ...], int] | None = None
    for token in line.split():
        if current is not None:
            end = token.endswith("]")
            tok = token[:-1] if end else token
            if tok:
                current.append(tok)
                words.append(tok)
            if end:
                chain, types, first = head
                phrases.append(ParsedPhrase(" ".join(current), chain, types, first))
                current, head = None, None
        elif token.startswith("[/EN#"):
            parts = token[1:].split("/")
            chain = parts[1][3:]
            if not chain or not chain.isdigit():
                raise DatasetError(f"{where}: malformed phrase marker {token!r}; expected [/EN#<chain>/<type> ...]")
            types = tuple(t for t in parts[2:] if t)
            current, head = [], (chain, types, len(words))
            if token.endswith("]"):  # "[/EN#1/other]" — empty phrase
                raise DatasetError(f"{where}: empty phrase {token!r}")
        else:
            words.append(token)
    if current is not None:
        raise DatasetError(f"{where}: phrase opened with '[/EN#{head[0]}...' is never closed with ']'")
    return ParsedSentence(" ".join(words), phrases)


def parse_sentences_file(path: Path) -> list[ParsedSentence]:
    return [parse_sentence(line, f"{path}:{lineno}") for lineno, line in read_text_lines(path, "Flickr30k sentences")]


def parse_flickr_annotation(path: Path) -> dict:
    """{"width", "height", "boxes": {chain: [(x0,y0,x1,y1) 0-based]}, "chain_order": [chains with boxes, in
    XML order], "nobox": set, "scene": set, "all_boxes": [(x0,y0,x1,y1)] one per object with a box}."""
    ann = parse_annotation_xml(path)
    boxes: dict[str, list[tuple[float, ...]]] = {}
    order: list[str] = []
    nobox, scene, all_boxes = set(), set(), []
    for obj in ann["objects"]:
        if obj["box"] is not None:
            b = tuple(v - 1 for v in obj["box"])  # 1-based inclusive → 0-based
            all_boxes.append(b)
            for chain in obj["names"]:
                if chain not in boxes:
                    boxes[chain] = []
                    order.append(chain)
                boxes[chain].append(b)
        else:
            for chain in obj["names"]:
                if obj["nobndbox"]:
                    nobox.add(chain)
                if obj["scene"]:
                    scene.add(chain)
    return {"width": ann["width"], "height": ann["height"], "boxes": boxes, "chain_order": order,
            "nobox": nobox, "scene": scene, "all_boxes": all_boxes}


@register_dataset("flickr30k", aliases=("flickr30k-entities", "flickr30k_entities"))
class Flickr30kEntities(WSOLDataset):
    """Flickr30k Entities (phrase grounding)."""

    default_subdir: ClassVar[str] = "flickr30k_entities"
    default_subdirs: ClassVar[tuple[str, ...]] = ("flickr30k_entities", "flickr30k", "Flickr30k")
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.PHRASES})
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    canonical_counts: ClassVar[dict[str, int]] = {"train": 29783, "val": 1000, "test": 1000}
    multi_label: ClassVar[bool] = True
    config_key: ClassVar[str] = "flickr30k"

    def __init__(self, root: str | Path | None = None, split: str = "test", *,
                 images_dir: str | Path | None = None, split_file: str | Path | None = None,
                 on_error: str = "fail") -> None:
        root = resolve_root(type(self), root, LAYOUT_HELP)
        super().__init__(root, split, on_error=on_error)
        r = self.root
        split_path = Path(split_file) if split_file else r / f"{split}.txt"
        ids = []
        seen: dict[str, int] = {}
        for lineno, line in read_text_lines(split_path, f"Flickr30k {split} split list"):
            image_id = line.strip()
            if image_id in seen:
                raise DatasetError(f"{split_path}:{lineno}: duplicate image id {image_id!r}")
            seen[image_id] = lineno
            ids.append(image_id)
        self.split_path = split_path
        for sub in ("Sentences", "Annotations"):
            if not (r / sub).is_dir():
                raise DatasetError(f"flickr30k: {r / sub} does not exist; expected {LAYOUT_HELP} (unzip "
                                   f"annotations.zip of flickr30k_entities into {r})")
        img_cands = [r / "flickr30k_images", r / "flickr30k-images", r / "flickr30k_images" / "flickr30k_images",
                     r.parent / "flickr30k_images", r.parent / "flickr30k-images"]
        if images_dir is not None:
            self.image_root = Path(images_dir)
        else:
            found = first_existing([c for c in img_cands if c.is_dir() and any(c.glob("*.jpg"))] or img_cands)
            self.image_root = found if found is not None else img_cands[0]
        samples = []
        for image_id in ids:
            sentences = parse_sentences_file(r / "Sentences" / f"{image_id}.txt")
            ann = parse_flickr_annotation(r / "Annotations" / f"{image_id}.xml")
            phrases = []
            for si, sent in enumerate(sentences):
                for p in sent.phrases:
                    b = ann["boxes"].get(p.chain, []) if p.chain != "0" else []
                    phrases.append(Phrase(text=p.text, boxes=np.asarray(b, np.float32).reshape(-1, 4),
                                          entity_id=p.chain, types=p.types, sentence_index=si,
                                          first_word_index=p.first_word_index))
            all_boxes = np.asarray(ann["all_boxes"], np.float32).reshape(-1, 4)
            size = (ann["width"], ann["height"]) if ann["width"] else None
            samples.append(Sample(image_id=image_id, image_path=self.image_root / f"{image_id}.jpg", size=size,
                                  boxes=all_boxes, box_labels=np.full(len(all_boxes), -1, np.int64),
                                  captions=tuple(s.text for s in sentences), phrases=tuple(phrases),
                                  meta={"chain_boxes": {k: np.asarray(v, np.float32) for k, v in ann["boxes"].items()},
                                        "chain_order": ann["chain_order"], "nobox": ann["nobox"],
                                        "scene": ann["scene"]}))
        self.samples = samples
        self.class_names = []


@dataclass
class GroundingSample:
    """One (test image, entity) of the grounding evaluation: all phrases of the 5 sentences referring to
    the entity (lower-cased), its boxes and their union (the GT box)."""

    image_id: str
    image_path: Path
    size: tuple[int, int] | None
    entity_id: str
    phrases: tuple[str, ...]
    boxes: np.ndarray  # (N, 4) 0-based x0,y0,x1,y1
    gt_box: np.ndarray  # (4,) union of ``boxes``
    types: tuple[str, ...] = ()


def union_box(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()], np.float32)


def _area(b) -> float:
    return float((b[2] - b[0]) * (b[3] - b[1]))


def grounding_samples(dataset: Sequence[Sample], min_area_frac: float = 0.05) -> list[GroundingSample]:
    """The WWbL Flickr30k grounding set (datasets/flicker.py ``get_test_data``): one sample per (image,
    entity with boxes), entities in XML order, keeping entities whose FIRST box covers more than
    ``min_area_frac`` of the image ((x1−x0)·(y1−y0) > frac·W·H on 0-based boxes), with the lower-cased
    phrases of all sentences referring to it; GT = the union box of all the entity's boxes. WWbL prefixes
    each phrase with "image of " when it feeds a text encoder; that prompt is the method's business."""
    out = []
    for s in dataset:
        if s.size is None:
            raise DatasetError(f"flickr30k {s.image_id}: image size missing from the annotation XML")
        w, h = s.size
        chain_boxes = s.meta.get("chain_boxes", {})
        for chain in s.meta.get("chain_order", list(chain_boxes)):
            boxes = chain_boxes[chain]
            if not _area(boxes[0]) > min_area_frac * w * h:
                continue
            refs = [p for p in s.phrases if p.entity_id == chain]
            if not refs:
                continue
            types = tuple(dict.fromkeys(t for p in refs for t in p.types))
            out.append(GroundingSample(s.image_id, s.image_path, s.size, chain,
                                       tuple(p.text.lower() for p in refs), boxes, union_box(boxes), types))
    return out


def phrase_queries(dataset: Sequence[Sample], min_area_frac: float = 0.05) -> list[tuple[Sample, Phrase]]:
    """Per-phrase pointing queries as Akbari et al.'s evaluator keeps them: phrases with boxes, not of type
    notvisual, whose union box covers at least ``min_area_frac`` of the image."""
    out = []
    for s in dataset:
        w, h = s.size if s.size is not None else (0, 0)
        for p in s.phrases:
            if len(p.boxes) == 0 or "notvisual" in p.types:
                continue
            if _area(union_box(p.boxes)) < min_area_frac * w * h:
                continue
            out.append((s, p))
    return out


@register_dataset("synthetic-flickr30k")
class SyntheticFlickr30k(Flickr30kEntities):
    """The Flickr30k Entities loader on the synthetic world (``make_synthetic("flickr30k")``) in
    ``cache_dir()/synthetic/flickr30k``: train 100 / val 20 / test 60 multi-object images with 5 captions
    each naming objects by attributes ("a red striped star"), multi-box chains, scene and notvisual phrases."""

    synthetic_format: ClassVar[str] = "flickr30k"
    default_subdirs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | Path | None = None, split: str = "test", **options) -> None:
        from .synthetic import ensure_synthetic, read_manifest

        root = Path(root) if root is not None else ensure_synthetic(self.synthetic_format)
        super().__init__(root, split, **options)
        self.canonical_counts = read_manifest(self.root)["counts"]
