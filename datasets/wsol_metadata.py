"""The wsolevaluation metadata format (clovaai/wsolevaluation ``metadata/<DATASET>/<split>/``), shared by the
CUB, ILSVRC and OpenImages loaders.

Files (comma separated, no header, usually no trailing newline):
  image_ids.txt     <path>
  class_labels.txt  <path>,<0-based label>
  image_sizes.txt   <path>,<W>,<H>            (empty for OpenImages: sizes come from the images)
  localization.txt  boxes: <path>,<x0>,<y0>,<x1>,<y1>   one line per box, several lines per image
                    masks: <path>,<mask path>,<ignore path>   ignore path only on an image's first line

Parsing is strict: a malformed line raises DatasetError naming the file and line number; labels, sizes or
localization for ids missing from image_ids.txt (or the reverse) are errors, never a silently smaller split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DatasetError, Sample, describe_candidates, read_text_lines

FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")


@dataclass
class WSOLMetadata:
    """One split's metadata, in image_ids.txt order."""

    directory: Path
    image_ids: list[str]
    labels: dict[str, int]
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    masks: dict[str, list[str]] = field(default_factory=dict)
    ignores: dict[str, str | None] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes.values())


def _bad(path: Path, lineno: int, expected: str, line: str) -> DatasetError:
    return DatasetError(f"{path}:{lineno}: malformed line, expected '{expected}', got {line!r}")


def parse_image_ids(path: Path) -> list[str]:
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in read_text_lines(path, "wsolevaluation image_ids.txt"):
        if "," in line:
            raise _bad(path, lineno, "<image path>", line)
        if line in seen:
            raise DatasetError(f"{path}:{lineno}: duplicate image id {line!r} (first on line {seen[line]})")
        seen[line] = lineno
        ids.append(line)
    return ids


def parse_class_labels(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for lineno, line in read_text_lines(path, "wsolevaluation class_labels.txt"):
        image_id, sep, lab = line.rpartition(",")
        if not sep or not image_id:
            raise _bad(path, lineno, "<image path>,<class label>", line)
        try:
            out[image_id] = int(lab)
        except ValueError:
            raise _bad(path, lineno, "<image path>,<integer class label>", line) from None
    return out


def parse_image_sizes(path: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    if not path.exists():
        return out
    for lineno, line in read_text_lines(path, "wsolevaluation image_sizes.txt"):
        parts = line.rsplit(",", 2)
        try:
            if len(parts) != 3 or not parts[0]:
                raise ValueError
            w, h = int(parts[1]), int(parts[2])
        except ValueError:
            raise _bad(path, lineno, "<image path>,<width>,<height>", line) from None
        out[parts[0]] = (w, h)
    return out


def parse_box_localization(path: Path) -> dict[str, list[tuple[float, float, float, float]]]:
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    if not path.exists():
        return out
    for lineno, line in read_text_lines(path, "wsolevaluation localization.txt"):
        parts = line.rsplit(",", 4)
        try:
            if len(parts) != 5 or not parts[0]:
                raise ValueError
            box = (float(parts[1]), float(parts[2]), float(parts[3]), float(parts[4]))
        except ValueError:
            raise _bad(path, lineno, "<image path>,<x0>,<y0>,<x1>,<y1>", line) from None
        if box[2] < box[0] or box[3] < box[1]:
            raise DatasetError(f"{path}:{lineno}: box has x1 < x0 or y1 < y0 (expected x0,y0,x1,y1): {line!r}")
        out.setdefault(parts[0], []).append(box)
    return out


def parse_mask_localization(path: Path) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    masks: dict[str, list[str]] = {}
    ignores: dict[str, str | None] = {}
    if not path.exists():
        return masks, ignores
    for lineno, line in read_text_lines(path, "wsolevaluation localization.txt"):
        parts = line.split(",")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _bad(path, lineno, "<image path>,<mask path>,<ignore path or empty>", line)
        image_id, mask, ignore = parts
        if image_id in masks:
            if ignore:
                raise DatasetError(f"{path}:{lineno}: ignore mask given again for {image_id!r}; the format has "
                                   f"it only on an image's first line")
            masks[image_id].append(mask)
        else:
            masks[image_id] = [mask]
            ignores[image_id] = ignore or None
    return masks, ignores


def load_split(directory: Path, kind: str = "boxes") -> WSOLMetadata:
    """Parse one ``metadata/<DATASET>/<split>`` directory; ``kind`` is "boxes" or "masks"."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"wsolevaluation metadata directory missing: expected {directory} holding "
                           f"{', '.join(FILES)}")
    ids = parse_image_ids(directory / "image_ids.txt")
    labels = parse_class_labels(directory / "class_labels.txt")
    sizes = parse_image_sizes(directory / "image_sizes.txt")
    meta = WSOLMetadata(directory, ids, labels, sizes)
    loc = directory / "localization.txt"
    if kind == "boxes":
        meta.boxes = parse_box_localization(loc)
        annotated = meta.boxes
    elif kind == "masks":
        meta.masks, meta.ignores = parse_mask_localization(loc)
        annotated = meta.masks
    else:
        raise ValueError(f"kind must be 'boxes' or 'masks', got {kind!r}")
    id_set = set(ids)
    _require_same(directory / "class_labels.txt", "class labels", id_set, labels.keys(), required=True)
    if sizes:
        _require_same(directory / "image_sizes.txt", "sizes", id_set, sizes.keys(), required=True)
    if annotated:
        _require_same(loc, "localization entries", id_set, annotated.keys(), required=True)
    return meta


def _require_same(path: Path, what: str, ids: set[str], keys, required: bool) -> None:
    keys = set(keys)
    extra = keys - ids
    if extra:
        ex = sorted(extra)[0]
        raise DatasetError(f"{path}: {len(extra)} id(s) not listed in image_ids.txt, e.g. {ex!r}")
    if required:
        missing = ids - keys
        if missing:
            ex = sorted(missing)[0]
            raise DatasetError(f"{path}: {what} missing for {len(missing)} image(s) of image_ids.txt, e.g. {ex!r}")


def metadata_candidates(dataset_name: str, split: str, root: Path, metadata_dir: str | Path | None,
                        data_root: Path | None = None) -> list[Path]:
    """Where ``metadata/<dataset_name>/<split>`` may be. ``metadata_dir`` may name the ``metadata`` folder,
    its ``<dataset_name>`` folder, or the split folder itself."""
    if metadata_dir is not None:
        m = Path(metadata_dir).expanduser()
        return [m / split, m / dataset_name / split, m]
    cands = [root / "metadata" / dataset_name / split, root / "metadata" / split,
             root.parent / "metadata" / dataset_name / split, root.parent.parent / "metadata" / dataset_name / split]
    if data_root is not None:
        cands.append(data_root / "metadata" / dataset_name / split)
    return cands


def find_split_dir(dataset_name: str, split: str, root: Path, metadata_dir: str | Path | None) -> Path:
    from wsolbench.paths import data_root

    cands = metadata_candidates(dataset_name, split, root, metadata_dir, data_root())
    for c in cands:
        if (c / "image_ids.txt").is_file():
            return c
    raise DatasetError(f"{dataset_name} {split}: wsolevaluation metadata not found; looked for "
                       f"image_ids.txt in {describe_candidates(cands)}. Expected metadata/{dataset_name}/{split}/"
                       f"{{{','.join(FILES)}}} (from clovaai/wsolevaluation), or pass metadata_dir=...")


def box_samples(meta: WSOLMetadata, image_root: Path) -> list[Sample]:
    """Samples for a box dataset (CUB/ILSVRC); boxes x0,y0,x1,y1 as in localization.txt. The per-sample
    box arrays are views into one array (fast for the 50k-image ILSVRC index)."""
    sizes, boxes, labels = meta.sizes, meta.boxes, meta.labels
    ids = meta.image_ids
    flat: list = []
    counts = []
    for image_id in ids:
        b = boxes.get(image_id, ())
        flat.extend(b)
        counts.append(len(b))
    all_boxes = np.asarray(flat, np.float32).reshape(-1, 4)
    label_list = [labels[i] for i in ids]
    all_labels = np.repeat(np.asarray(label_list, np.int64), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    root = str(image_root)
    samples = []
    for k, image_id in enumerate(ids):
        o0, o1 = offsets[k], offsets[k + 1]
        samples.append(Sample(image_id=image_id, image_path=Path(root, image_id), size=sizes.get(image_id),
                              labels=(label_list[k],), boxes=all_boxes[o0:o1], box_labels=all_labels[o0:o1]))
    return samples


def write_split(directory: Path, rows: Sequence[dict], kind: str = "boxes", write_sizes: bool = True) -> None:
    """Write one split in the wsolevaluation format (no trailing newline, like the originals).

    rows: dicts with ``id``, ``label`` and ``size`` (W, H), plus ``boxes`` [(x0,y0,x1,y1), ...] (kind "boxes")
    or ``masks`` [path, ...] and ``ignore`` (path or None) (kind "masks").
    """
    directory.mkdir(parents=True, exist_ok=True)
    ids = [r["id"] for r in rows]
    (directory / "image_ids.txt").write_text("\n".join(ids), encoding="utf-8")
    (directory / "class_labels.txt").write_text("\n".join(f"{r['id']},{r['label']}" for r in rows),
                                                encoding="utf-8")
    sizes = "\n".join(f"{r['id']},{r['size'][0]},{r['size'][1]}" for r in rows) if write_sizes else ""
    (directory / "image_sizes.txt").write_text(sizes, encoding="utf-8")
    lines = []
    for r in rows:
        if kind == "boxes":
            for b in r.get("boxes", ()):
                lines.append(f"{r['id']}," + ",".join(str(int(round(v))) for v in b))
        else:
            for j, m in enumerate(r.get("masks", ())):
                ign = (r.get("ignore") or "") if j == 0 else ""
                lines.append(f"{r['id']},{m},{ign}")
    (directory / "localization.txt").write_text("\n".join(lines), encoding="utf-8")


def labels_of_all_splits(split_dir: Path, this_split: dict[str, int]) -> dict[str, int]:
    """class_labels of this split and of its sibling split folders (train/val/test), so that the class list
    does not depend on which classes one (small) split happens to contain."""
    out = dict(this_split)
    parent = Path(split_dir).parent
    for sib in ("train", "val", "test"):
        f = parent / sib / "class_labels.txt"
        if f.is_file() and parent / sib != Path(split_dir):
            for k, v in parse_class_labels(f).items():
                out.setdefault(k, v)
    return out
