"""make-synthetic → the REAL loader → the sample's boxes/masks/labels/phrases equal what the generator drew."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wsolbench.datasets import synthetic as syn
from wsolbench.datasets.base import DatasetError, Task
from wsolbench.datasets.coco import COCO2014
from wsolbench.datasets.cub import CUB200
from wsolbench.datasets.flickr30k import Flickr30kEntities, grounding_samples
from wsolbench.datasets.ilsvrc import ILSVRC
from wsolbench.datasets.openimages import OpenImages30k
from wsolbench.datasets.voc import VOC2012

SEED = 7


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    small = {"cub": 45, "wsol": 60, "ilsvrc": 60, "openimages": 60, "voc": 40, "coco": 40, "flickr30k": 40}
    return {fmt: syn.make_synthetic(fmt, base / fmt, n=n, seed=SEED) for fmt, n in small.items()}


def _boxes(objects):
    return np.asarray([o.box for o in objects], np.float32).reshape(-1, 4)


def _sorted_rows(a):
    a = np.asarray(a, np.float32).reshape(-1, 4)
    return a[np.lexsort(a.T[::-1])]


def _same_ids(ds, plan_split):
    assert [s.image_id for s in ds] and {s.image_id for s in ds} == set(plan_split)


def test_manifest_and_determinism(synth, tmp_path):
    m = syn.read_manifest(synth["cub"])
    assert m["format"] == "cub" and m["seed"] == SEED and m["class_names"] == list(syn.CLASS_NAMES)
    again = syn.make_synthetic("cub", tmp_path / "again", n=45, seed=SEED)
    for rel in ("images.txt", "bounding_boxes.txt", "metadata/CUB/test/localization.txt", "SYNTHETIC.json"):
        assert (again / rel).read_bytes() == (synth["cub"] / rel).read_bytes()
    other = syn.make_synthetic("cub", tmp_path / "other", n=45, seed=SEED + 1)
    assert (other / "bounding_boxes.txt").read_bytes() != (synth["cub"] / "bounding_boxes.txt").read_bytes()


def test_make_synthetic_refuses_nonempty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        syn.make_synthetic("wsol", tmp_path / "x", n=3)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    with pytest.raises(ValueError, match="unknown synthetic format"):
        syn.make_synthetic("nope", tmp_path / "y", n=3)


@pytest.mark.parametrize("layout,splits", [("wsol", ("train", "val", "test")), ("original", ("train", "test"))])
def test_cub_roundtrip(synth, layout, splits):
    root = synth["cub"]
    plan = syn.load_plan(root)
    for split in splits:
        ds = CUB200(root, split, layout=layout)
        assert ds.layout == layout
        _same_ids(ds, plan[split])
        assert ds.class_names == list(syn.CLASS_NAMES)
        for s in ds:
            p = plan[split][s.image_id]
            assert s.labels == (p.label,)
            np.testing.assert_array_equal(s.boxes, _boxes(p.scene.objects))
            assert s.box_labels.tolist() == [p.label]
            if layout == "wsol":
                assert s.size == p.scene.size
        if split == "val":  # CUBV2 analogue: no segmentations
            assert Task.MASKS not in ds.tasks
            continue
        assert Task.MASKS in ds.tasks
        for s in list(ds)[:8]:
            fg, ign = s.load_mask()
            np.testing.assert_array_equal(fg, plan[split][s.image_id].scene.objects[0].mask)
            assert not ign.any()


def test_wsol_multibox_roundtrip(synth):
    plan = syn.load_plan(synth["wsol"])
    n_multi = 0
    for split in ("train", "val", "test"):
        ds = CUB200(synth["wsol"], split)
        _same_ids(ds, plan[split])
        for s in ds:
            p = plan[split][s.image_id]
            np.testing.assert_array_equal(_sorted_rows(s.boxes), _sorted_rows(_boxes(p.scene.objects)))
            n_multi += len(s.boxes) > 1
    assert n_multi > 0


def test_ilsvrc_roundtrip_both_layouts(synth):
    root = synth["ilsvrc"]
    plan = syn.load_plan(root)
    for split in ("train", "val", "test"):
        ds = ILSVRC(root, split)
        assert ds.layout == "wsol"
        _same_ids(ds, plan[split])
        assert ds.class_names == list(syn.CLASS_NAMES)
        assert ds.class_synonyms == [syn.SYNONYMS[n] for n in syn.CLASS_NAMES]
        for s in ds:
            p = plan[split][s.image_id]
            assert s.labels == (p.label,)
            if split == "train":
                assert len(s.boxes) == 0  # like the real train metadata
            else:
                np.testing.assert_array_equal(_sorted_rows(s.boxes), _sorted_rows(_boxes(p.scene.objects)))
    xml = ILSVRC(root, "test", layout="original")
    wsol = {s.image_id: s for s in ILSVRC(root, "test")}
    assert len(xml) == len(wsol)
    assert any(len(s.boxes) > 1 for s in xml)
    for s in xml:
        w = wsol[s.image_id]
        assert s.labels == w.labels and s.size == w.size and s.image_path == w.image_path
        np.testing.assert_array_equal(_sorted_rows(s.boxes), _sorted_rows(w.boxes))
    problems = ILSVRC(root, "test").check()  # the real class holds the real canonical counts
    assert any("canonical count is 50000" in line for line in problems)
    assert any("canonical count is 80477" in line for line in problems)


def test_openimages_roundtrip_masks_and_ignore(synth):
    root = synth["openimages"]
    plan = syn.load_plan(root)
    assert OpenImages30k(root, "train").samples[0].mask_paths == ()
    n_multi = 0
    for split in ("val", "test"):
        ds = OpenImages30k(root, split)
        _same_ids(ds, plan[split])
        assert ds.class_names == list(syn.CLASS_NAMES)
        for s in ds:
            p = plan[split][s.image_id]
            assert s.labels == (p.label,) and s.size is None
            assert len(s.mask_paths) == len(p.scene.objects) and s.ignore_path is not None
            fg, ign = s.load_mask()
            np.testing.assert_array_equal(fg, p.scene.foreground())
            np.testing.assert_array_equal(ign, p.extra["ignore"] & ~p.scene.foreground())
            assert ign.any()
            n_multi += len(s.mask_paths) > 1
    assert n_multi > 0


def test_voc_roundtrip(synth, tmp_path):
    root = synth["voc"]
    plan = syn.load_plan(root)
    plan["train_aug"] = {**plan["train"], **plan["aug"]}
    for split in ("train", "val", "train_aug", "test"):
        ds = VOC2012(root, split)
        _same_ids(ds, plan[split])
        assert ds.class_names == list(syn.CLASS_NAMES) and ds.label_source.endswith("cls_labels.npy")
        for s in ds:
            p = plan[split][s.image_id]
            assert s.labels == tuple(sorted({o.class_index for o in p.scene.objects}))
            np.testing.assert_array_equal(s.load_label_map(), p.scene.label_map(syn.VOC_IGNORE_BORDER))
            np.testing.assert_array_equal(s.boxes, _boxes(p.scene.objects))  # 1-based XML → 0-based
            assert s.box_labels.tolist() == [o.class_index for o in p.scene.objects]
            assert s.difficult.tolist() == p.extra["difficult"]
            assert s.size == p.scene.size
    from PIL import Image

    s = VOC2012(root, "val")[0]
    with Image.open(s.label_map_path) as im:
        assert im.mode == "P" and s.label_map_path.parent.name == "SegmentationClass"
    # image labels derived from the XMLs, then from the label PNGs, when there is no cls_labels.npy
    copy = tmp_path / "voc"
    shutil.copytree(root, copy)
    (copy / "voc12" / "cls_labels.npy").unlink()
    ds = VOC2012(copy, "train")
    assert ds.label_source == "xml"
    assert [s.labels for s in ds] == [s.labels for s in VOC2012(root, "train")]
    shutil.rmtree(copy / "VOCdevkit" / "VOC2012" / "Annotations")
    ds = VOC2012(copy, "train")
    assert ds.label_source == "label_png"
    for s in ds:  # the 1-px ignore border can hide a tiny object entirely; labels ⊆ truth, usually equal
        assert set(s.labels) <= {o.class_index for o in plan["train"][s.image_id].scene.objects}


def test_coco_roundtrip_semantic_gt(synth):
    root = synth["coco"]
    plan = syn.load_plan(root)
    doc = json.loads((root / "annotations" / "instances_train2014.json").read_text())
    kinds = {("polygon" if isinstance(a["segmentation"], list) else
              "rle-list" if isinstance(a["segmentation"]["counts"], list) else "rle") for a in doc["annotations"]}
    assert {"polygon", "rle-list"} <= kinds or {"polygon", "rle"} <= kinds
    n_crowd = 0
    for split in ("train", "val"):
        ds = COCO2014(root, split)
        _same_ids(ds, plan[split])
        assert ds.class_names == list(syn.CLASS_NAMES)
        assert ds.category_ids == sorted(syn.COCO_CATEGORY_IDS)
        ids = [s.meta["coco_id"] for s in ds]
        assert ids == sorted(ids)
        for s in ds:
            p = plan[split][s.image_id]
            objs = p.scene.objects
            crowd = p.extra["crowd"]
            expected = np.zeros(p.scene.image.shape[:2], np.uint8)
            for j, o in enumerate(objs):
                if j != crowd:
                    expected[o.mask] = o.class_index + 1
            np.testing.assert_array_equal(s.load_label_map(), expected)
            assert s.labels == tuple(sorted({o.class_index for o in objs}))  # crowd classes count as labels
            np.testing.assert_array_equal(s.boxes, _boxes(objs))
            assert s.meta["iscrowd"].tolist() == [j == crowd for j in range(len(objs))]
            n_crowd += crowd is not None
            k = objs[0].class_index
            union = np.zeros_like(expected, bool)
            for o in objs:
                if o.class_index == k:
                    union |= o.mask
            np.testing.assert_array_equal(ds.class_mask(s, k), union)
    assert n_crowd > 0


def test_flickr30k_roundtrip_phrases_and_grounding(synth):
    root = synth["flickr30k"]
    plan = syn.load_plan(root)
    seen_multibox = seen_multiname = seen_nobox = 0
    for split in ("train", "val", "test"):
        ds = Flickr30kEntities(root, split)
        _same_ids(ds, plan[split])
        for s in ds:
            p = plan[split][s.image_id]
            ex = p.extra
            assert s.size == p.scene.size
            assert len(s.captions) == 5
            expected = []
            for si, sent in enumerate(ex["sentences"]):
                _, phrases = syn.flickr_sentence_text(sent)
                for text, chain, types, first in phrases:
                    objs = ex["chains"].get(chain, []) if chain != "0" else []
                    expected.append((si, text, chain, types, first, _boxes([p.scene.objects[j] for j in objs])))
            assert len(s.phrases) == len(expected)
            for ph, (si, text, chain, types, first, boxes) in zip(s.phrases, expected):
                assert (ph.sentence_index, ph.text, ph.entity_id, ph.types, ph.first_word_index) == \
                    (si, text, chain, types, first)
                np.testing.assert_array_equal(ph.boxes, boxes)
                seen_multibox += len(ph.boxes) > 1
            for ph in s.phrases:
                assert ph.text.lower() in s.captions[ph.sentence_index].lower()
            seen_multiname += bool(ex["groups"])
            seen_nobox += ex["nobox_chain"] is not None
            np.testing.assert_array_equal(s.boxes, _boxes(p.scene.objects))
    assert seen_multibox and seen_multiname and seen_nobox
    # grounding samples: one per (image, entity with boxes), first box > 5% of the image, union GT box
    ds = Flickr30kEntities(root, "test")
    got = {(g.image_id, g.entity_id): g for g in grounding_samples(ds)}
    want = {}
    for image_id, p in plan["test"].items():
        w, h = p.scene.size
        ex = p.extra
        for chain, members in ex["chains"].items():
            first = p.scene.objects[min(members)].box
            if not (first[2] - first[0]) * (first[3] - first[1]) > 0.05 * w * h:
                continue
            texts = tuple(t.lower() for sent in ex["sentences"] for t, c, _, _ in syn.flickr_sentence_text(sent)[1]
                          if c == chain)
            if texts:
                b = _boxes([p.scene.objects[j] for j in members])
                want[(image_id, chain)] = (texts, [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
    assert set(got) == set(want) and want
    for key, (texts, gt) in want.items():
        assert got[key].phrases == texts
        np.testing.assert_array_equal(got[key].gt_box, np.asarray(gt, np.float32))


def test_registered_synthetic_datasets_generate_once(isolated_env, monkeypatch):
    import wsolbench
    from wsolbench.datasets.check import check_dataset

    monkeypatch.setitem(syn.DEFAULT_COUNTS, "voc", {"train": 6, "val": 4, "aug": 3, "test": 2})
    monkeypatch.setitem(syn.DEFAULT_COUNTS, "cub", {"train": 10, "val": 5, "test": 6})
    ds = wsolbench.create_dataset("synthetic-voc", split="train")
    assert len(ds) == 6 and ds.config_key == "voc" and ds.check() == []
    manifest = isolated_env / "cache" / "synthetic" / "voc" / "SYNTHETIC.json"
    stamp = manifest.stat().st_mtime_ns
    assert len(wsolbench.create_dataset("synthetic-voc", split="train_aug")) == 9
    test = wsolbench.create_dataset("synthetic-voc")  # default split "test" (held out, labelled)
    assert test.split == "test" == test.eval_split and len(test) == 2
    assert manifest.stat().st_mtime_ns == stamp  # cached, not regenerated
    assert check_dataset("synthetic-cub") == []
    cub = wsolbench.create_dataset("synthetic-cub", split="val")
    assert cub.config_key == "cub" and cub.class_names == list(syn.CLASS_NAMES) and len(cub) == 5
    leftovers = [p.name for p in (isolated_env / "cache" / "synthetic").iterdir() if p.name.startswith(".")]
    assert leftovers == []
