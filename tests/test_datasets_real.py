"""The loaders on the REAL annotation files in ../shared/fixtures: canonical counts and exact values."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from wsolbench.datasets.base import Task
from wsolbench.datasets.coco import COCO2014
from wsolbench.datasets.cub import CUB200
from wsolbench.datasets.flickr30k import Flickr30kEntities
from wsolbench.datasets.ilsvrc import ILSVRC
from wsolbench.datasets.openimages import OpenImages30k
from wsolbench.datasets.voc import VOC2012


@pytest.fixture(scope="module")
def meta(shared_fixtures):
    return shared_fixtures / "wsolevaluation-metadata"


@pytest.fixture
def empty_root(tmp_path):
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def test_cub_wsol_metadata_counts(meta, empty_root):
    counts = {}
    for split in ("train", "val", "test"):
        ds = CUB200(empty_root, split, metadata_dir=meta / "CUB")
        assert ds.layout == "wsol" and ds.tasks == frozenset({Task.BOXES})
        counts[split] = len(ds)
        assert sum(len(s.boxes) for s in ds) == CUB200.canonical_box_counts[split]
        # images are not in the fixtures: check() names the count and an expected path, nothing else
        problems = ds.check()
        assert len(problems) == 1 and "image file(s) missing" in problems[0] and str(empty_root) in problems[0]
    assert counts == {"train": 5994, "val": 1000, "test": 5794}
    ds = CUB200(empty_root, "test", metadata_dir=meta / "CUB")
    s = ds[0]
    assert s.image_id == "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert s.image_path == empty_root / s.image_id
    assert s.labels == (0,) and s.size == (500, 335)
    assert s.boxes.tolist() == [[60, 27, 385, 331]]
    assert len(ds.class_names) == 200 and ds.class_names[0] == "Black footed Albatross"
    assert ds.class_names[199] == "Common Yellowthroat"
    val = CUB200(empty_root, "val", metadata_dir=meta)  # the metadata/ folder itself works too
    assert val[0].image_id == "001.Black_footed_Albatross/30107316117.jpg" and val[0].size == (560, 419)


def test_ilsvrc_wsol_metadata_counts_and_speed(meta, empty_root):
    t = time.perf_counter()
    test = ILSVRC(empty_root, "test", metadata_dir=meta / "ILSVRC")
    elapsed = time.perf_counter() - t
    assert len(test) == 50000 and sum(len(s.boxes) for s in test) == 80477
    assert elapsed < 5.0, f"indexing 50k ILSVRC images took {elapsed:.2f}s"
    val = ILSVRC(empty_root, "val", metadata_dir=meta / "ILSVRC")
    assert len(val) == 10000 and sum(len(s.boxes) for s in val) == 18532
    assert test[0].image_id == "val/ILSVRC2012_val_00000001.JPEG" and test[0].labels == (65,)
    assert test[0].boxes.tolist() == [[111, 108, 441, 193]] and test[0].size == (500, 375)
    two = test[1]
    assert two.image_id == "val/ILSVRC2012_val_00000002.JPEG" and len(two.boxes) == 2
    assert two.box_labels.tolist() == [970, 970]
    assert val[0].image_id == "val2/0/0.jpeg" and val[0].labels == (0,)
    # class names with synonyms (no mapping file here → the standard table)
    assert test.num_classes == 1000
    assert test.class_names[0] == "tench" and test.class_synonyms[0] == ("tench", "Tinca tinca")


def test_ilsvrc_train_metadata_absent_names_expected_path(meta, empty_root):
    from wsolbench.datasets.base import DatasetError

    with pytest.raises(DatasetError, match=r"looked for image_ids\.txt in \S*ILSVRC/train"):
        ILSVRC(empty_root, "train", metadata_dir=meta / "ILSVRC")


def test_openimages_counts_and_masks(meta, shared_fixtures, empty_root):
    counts, masks = {}, {}
    for split in ("train", "val", "test"):
        ds = OpenImages30k(empty_root, split, metadata_dir=meta / "OpenImages")
        counts[split] = len(ds)
        masks[split] = sum(len(s.mask_paths) for s in ds)
        assert ds.tasks == frozenset({Task.MASKS}) and ds.num_classes == 100
        assert all(s.size is None for s in ds)
    assert counts == {"train": 29819, "val": 2500, "test": 5000}
    assert masks == {"train": 0, "val": 3854, "test": 7632}
    ds = OpenImages30k(empty_root, "test", metadata_dir=meta / "OpenImages")
    assert ds.class_mids[0] == "01226z"
    first = ds[0]
    assert first.image_id == "test/01226z/7af766bd43da900b.jpg" and len(first.mask_paths) == 2
    assert first.ignore_path == empty_root / "test/01226z/7af766bd43da900b_ignore.png"
    # real instance (1-bit) and ignore (8-bit / RGBA) PNGs from wsolevaluation's test data
    masks_root = shared_fixtures / "wsolevaluation-metadata" / "OpenImages-test-masks"
    val = OpenImages30k(empty_root, "val", metadata_dir=meta / "OpenImages", mask_root=masks_root)
    by_id = {s.image_id: s for s in val}
    s = by_id["val/0bt_c3/3a29f0b33894d4a6.jpg"]
    assert len(s.mask_paths) == 2
    fg, ign = s.load_mask()
    from PIL import Image

    expected = np.zeros_like(fg)
    for p in s.mask_paths:
        with Image.open(p) as im:
            expected |= np.asarray(im.convert("L")) > 127
    np.testing.assert_array_equal(fg, expected)
    assert fg.shape == (1063, 1600) and 0 < fg.mean() < 1 and not ign.any()


def _voc_skeleton(tmp_path):
    r = tmp_path / "VOCdevkit" / "VOC2012"
    (r / "JPEGImages").mkdir(parents=True)
    (r / "ImageSets" / "Segmentation").mkdir(parents=True)
    return tmp_path


def test_voc_lists_and_pickled_labels(shared_fixtures, tmp_path):
    root = _voc_skeleton(tmp_path)
    lists = shared_fixtures / "voc12"
    counts = {}
    for split in ("train", "val", "train_aug"):
        ds = VOC2012(root, split, list_dir=lists)
        counts[split] = len(ds)
        assert ds.label_source == str(lists / "cls_labels.npy")
        assert all(len(s.labels) >= 1 for s in ds)
    assert counts == {"train": 1464, "val": 1449, "train_aug": 10582}  # val_id.txt has no trailing newline
    raw = np.load(lists / "cls_labels.npy", allow_pickle=True).item()
    ds = VOC2012(root, "train", list_dir=lists)
    for s in list(ds)[:50]:
        assert s.labels == tuple(np.flatnonzero(raw[s.image_id]).tolist())
    assert ds.class_names[0] == "aeroplane" and ds.num_classes == 20 and ds.multi_label
    assert ds[0].image_path == root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000032.jpg"


def test_coco_id_list_order_and_count(shared_fixtures, tmp_path):
    ids = [line.strip() for line in (shared_fixtures / "coco14" / "val_id.txt").read_text().splitlines() if line]
    images = [{"id": int(n.rsplit("_", 1)[1]), "file_name": f"{n}.jpg", "width": 640, "height": 480} for n in ids]
    doc = {"images": images[::-1], "annotations": [], "categories": [
        {"id": i, "name": f"c{i}"} for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                                               23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
                                               44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
                                               63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85,
                                               86, 87, 88, 89, 90)]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(doc))
    ds = COCO2014(tmp_path, "val", list_file=shared_fixtures / "coco14" / "val_id.txt")
    assert len(ds) == 40504 and [s.image_id for s in ds[:3]] == ids[:3]
    assert ds.num_classes == 80 and ds.category_ids[-1] == 90 and ds.cat_to_index[90] == 79
    assert len(ds) == ds.canonical_counts["val"]  # (default order = sorted image id: see the synthetic round trip)


def test_flickr_split_lists(shared_fixtures, tmp_path):
    src = shared_fixtures / "flickr30k-entities"
    for sub in ("Sentences", "Annotations"):
        (tmp_path / sub).mkdir()
    for split in ("val", "test"):
        (tmp_path / f"{split}.txt").write_bytes((src / f"{split}.txt").read_bytes())
    for split in ("test",):
        for image_id in (src / f"{split}.txt").read_text().split():
            (tmp_path / "Sentences" / f"{image_id}.txt").write_text("[/EN#1/people A man] runs .\n")
            (tmp_path / "Annotations" / f"{image_id}.xml").write_text(
                "<annotation><size><width>10</width><height>10</height><depth>3</depth></size><object>"
                "<name>1</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
                "</object></annotation>")
    ds = Flickr30kEntities(tmp_path, "test")
    assert len(ds) == 1000 and [c for c in ds.check() if "canonical" in c] == []
    assert ds[0].image_id == "1016887272"
    assert ds[0].phrases[0].boxes.tolist() == [[0, 0, 4, 4]]  # 1-based → 0-based
    from wsolbench.datasets.base import read_text_lines

    for split in ("train", "val"):  # the loader's own line reader on the real split lists
        assert len(read_text_lines(src / f"{split}.txt")) == Flickr30kEntities.canonical_counts[split]
