"""Bad input: missing roots/files name the expected path, malformed lines name file:line, corrupt images follow
the on_error policy and are reported, line-ending and id quirks are handled. Never a silent partial dataset."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from wsolbench.datasets import synthetic as syn
from wsolbench.datasets.base import DatasetError, read_text_lines
from wsolbench.datasets.cub import CUB200
from wsolbench.datasets.flickr30k import Flickr30kEntities, parse_sentence
from wsolbench.datasets.ilsvrc import ILSVRC
from wsolbench.datasets.openimages import OpenImages30k
from wsolbench.datasets.voc import VOC2012


@pytest.fixture(scope="module")
def wsol_root(tmp_path_factory):
    return syn.make_synthetic("wsol", tmp_path_factory.mktemp("w") / "wsol", n=20, seed=1)


@pytest.fixture
def wsol_copy(wsol_root, tmp_path):
    dst = tmp_path / "wsol"
    shutil.copytree(wsol_root, dst)
    return dst


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError) as e:
        CUB200(tmp_path / "nowhere", "test")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "images.txt" in msg and "metadata/CUB" in msg
    with pytest.raises(DatasetError, match="VOCdevkit/VOC2012"):
        VOC2012(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"unknown split 'tset'"):
        CUB200(tmp_path, "tset")
    with pytest.raises(DatasetError, match="on_error"):
        CUB200(tmp_path, "test", on_error="ignore")


def test_missing_metadata_file_names_expected_path(wsol_copy):
    (wsol_copy / "metadata" / "CUB" / "test" / "class_labels.txt").unlink()
    with pytest.raises(DatasetError, match=r"class_labels\.txt missing: expected .*metadata/CUB/test/class_labels"):
        CUB200(wsol_copy, "test")
    with pytest.raises(DatasetError, match="wsolevaluation metadata not found"):
        CUB200(wsol_copy, "test", metadata_dir=wsol_copy / "elsewhere")


@pytest.mark.parametrize("fname,bad,match", [
    ("localization.txt", "xx,1,2,three,4", r"localization\.txt:2: malformed line"),
    ("localization.txt", "xx,1,2", r"localization\.txt:2: malformed line"),
    ("class_labels.txt", "oops", r"class_labels\.txt:2: malformed line"),
    ("image_sizes.txt", "a,1", r"image_sizes\.txt:2: malformed line"),
])
def test_malformed_line_names_file_and_line(wsol_copy, fname, bad, match):
    path = wsol_copy / "metadata" / "CUB" / "test" / fname
    lines = path.read_text().splitlines()
    lines.insert(1, bad)
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=match):
        CUB200(wsol_copy, "test")


def test_inconsistent_metadata_is_an_error_not_a_smaller_split(wsol_copy):
    d = wsol_copy / "metadata" / "CUB" / "test"
    lines = (d / "class_labels.txt").read_text().splitlines()
    (d / "class_labels.txt").write_text("\n".join(lines[:-1]))
    with pytest.raises(DatasetError, match=r"class labels missing for 1 image"):
        CUB200(wsol_copy, "test")
    (d / "class_labels.txt").write_text("\n".join(lines + ["ghost/x.jpg,0"]))
    with pytest.raises(DatasetError, match=r"not listed in image_ids\.txt, e\.g\. 'ghost/x\.jpg'"):
        CUB200(wsol_copy, "test")


def test_line_endings_trailing_newlines_and_ids_with_spaces(wsol_copy, tmp_path):
    ref = {s.image_id: s for s in CUB200(wsol_copy, "test")}
    d = wsol_copy / "metadata" / "CUB" / "test"
    for f in d.iterdir():  # CRLF + trailing newline + a BOM
        text = f.read_text()
        f.write_bytes(b"\xef\xbb\xbf" + (text.replace("\n", "\r\n") + "\r\n").encode())
    got = {s.image_id: s for s in CUB200(wsol_copy, "test")}
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k].boxes, ref[k].boxes)
    # ids with spaces
    p = tmp_path / "ids.txt"
    p.write_bytes(b"a b/c d.jpg\r\n\r\nsecond one.jpg")
    assert read_text_lines(p) == [(1, "a b/c d.jpg"), (3, "second one.jpg")]
    space = tmp_path / "space"
    (space / "metadata" / "CUB" / "test").mkdir(parents=True)
    m = space / "metadata" / "CUB" / "test"
    m.joinpath("image_ids.txt").write_text("001.my class/an image 1.jpg\n")
    m.joinpath("class_labels.txt").write_text("001.my class/an image 1.jpg,0\n")
    m.joinpath("image_sizes.txt").write_text("001.my class/an image 1.jpg,50,40\n")
    m.joinpath("localization.txt").write_text("001.my class/an image 1.jpg,1,2,30,20\n")
    ds = CUB200(space, "test")
    assert ds[0].image_id == "001.my class/an image 1.jpg" and ds[0].boxes.tolist() == [[1, 2, 30, 20]]
    assert ds.class_names == ["my class"]


def test_cub_original_ids_with_spaces_and_bad_lines(tmp_path):
    r = tmp_path / "CUB_200_2011"
    r.mkdir()
    (r / "images.txt").write_text("1 001.A b/with space.jpg\n2 001.A b/two.jpg")
    (r / "image_class_labels.txt").write_text("1 1\r\n2 1\r\n")
    (r / "train_test_split.txt").write_text("1 0\n2 0\n")
    (r / "bounding_boxes.txt").write_text("1 10.0 20.0 30.5 40.0\n2 1 2 3 4\n")
    ds = CUB200(r, "test")
    assert ds.layout == "original"
    assert ds[0].image_id == "001.A b/with space.jpg" and ds[0].boxes.tolist() == [[10, 20, 40.5, 60]]
    assert ds.class_names == ["A b"]
    (r / "bounding_boxes.txt").write_text("1 10.0 20.0 30.5\n")
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt:1: malformed line"):
        CUB200(r, "test")
    with pytest.raises(DatasetError, match="no val split"):
        CUB200(r, "val", layout="original")


def test_corrupt_image_fail_or_skip_and_reported(wsol_copy):
    ds = CUB200(wsol_copy, "test")
    victim = ds[2].image_path
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DatasetError, match=str(victim).replace(".", r"\.")):
        list(CUB200(wsol_copy, "test").iter_images())
    skip = CUB200(wsol_copy, "test", on_error="skip")
    got = list(skip.iter_images())
    assert len(got) == len(skip) - 1
    assert [p for p, _ in skip.bad_images] == [victim]
    report = skip.error_report()
    assert "1 image(s) could not be decoded" in report[0] and str(victim) in report[1]
    problems = CUB200(wsol_copy, "test").check(verify=True)
    assert any("1 corrupt image(s)" in p for p in problems) and any(str(victim) in p for p in problems)
    # a missing image is reported by check() with its path
    ds[3].image_path.unlink()
    problems = CUB200(wsol_copy, "test").check()
    assert any("1 image file(s) missing" in p and str(ds[3].image_path) in p for p in problems)


def test_openimages_ignore_repeated_is_error(tmp_path):
    root = syn.make_synthetic("openimages", tmp_path / "oi", n=12, seed=2)
    loc = root / "metadata" / "OpenImages" / "test" / "localization.txt"
    first = loc.read_text().splitlines()[0]
    image, mask, ignore = first.split(",")
    loc.write_text(loc.read_text() + f"\n{image},{mask},{ignore}")
    with pytest.raises(DatasetError, match=r"localization\.txt:\d+: ignore mask given again"):
        OpenImages30k(root, "test")


def test_flickr_malformed_sentence_and_xml(tmp_path):
    with pytest.raises(DatasetError, match="never closed"):
        parse_sentence("[/EN#1/people A man runs .", "f.txt:1")
    p = parse_sentence("[/EN#12/people/other Two men] see [/EN#0/notvisual something] .")
    assert p.text == "Two men see something ."
    assert [(x.text, x.chain, x.types, x.first_word_index) for x in p.phrases] == [
        ("Two men", "12", ("people", "other"), 0), ("something", "0", ("notvisual",), 3)]
    root = syn.make_synthetic("flickr30k", tmp_path / "f", n=6, seed=3)
    image_id = (root / "test.txt").read_text().split()[0]
    sent = root / "Sentences" / f"{image_id}.txt"
    lines = sent.read_text().splitlines()
    lines[2] = "[/EN#x/other broken marker] ."
    sent.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=rf"{image_id}\.txt:3: malformed phrase marker"):
        Flickr30kEntities(root, "test")
    lines[2] = "fine ."
    sent.write_text("\n".join(lines))
    (root / "Annotations" / f"{image_id}.xml").write_text("<annotation><size>")
    with pytest.raises(DatasetError, match=rf"{image_id}\.xml:\d+: malformed XML"):
        Flickr30kEntities(root, "test")
    (root / "Annotations" / f"{image_id}.xml").unlink()
    with pytest.raises(DatasetError, match=rf"annotation XML missing: expected .*{image_id}\.xml"):
        Flickr30kEntities(root, "test")


def test_voc_missing_labels_and_lists(tmp_path):
    root = syn.make_synthetic("voc", tmp_path / "voc", n=9, seed=4)
    labels = np.load(root / "voc12" / "cls_labels.npy", allow_pickle=True).item()
    victim = sorted(labels)[0]
    del labels[victim]
    np.save(root / "voc12" / "cls_labels.npy", labels, allow_pickle=True)
    split = "train" if victim.startswith("2008") else "val"
    with pytest.raises(DatasetError, match=rf"no image labels for '{victim}'"):
        VOC2012(root, split)
    with pytest.raises(DatasetError, match=r"split list for 'trainval' not found.*ImageSets/Segmentation/trainval"):
        shutil.rmtree(root / "VOCdevkit" / "VOC2012" / "ImageSets")
        VOC2012(root, "trainval")


def test_cub_partial_segmentations_is_an_error(tmp_path):
    root = syn.make_synthetic("cub", tmp_path / "cub", n=9, seed=5)
    next((root / "segmentations").rglob("*.png")).unlink()
    errors = 0
    for split in ("train", "test"):
        try:
            CUB200(root, split)
        except DatasetError as exc:
            assert "segmentation masks" in str(exc) and "missing e.g." in str(exc)
            errors += 1
    assert errors == 1


def test_ilsvrc_xml_unknown_synset(tmp_path):
    root = syn.make_synthetic("ilsvrc", tmp_path / "il", n=6, seed=6)
    xml = next((root / "Annotations" / "CLS-LOC" / "val").glob("*.xml"))
    xml.write_text(xml.read_text().replace("<name>n9", "<name>n8"))
    with pytest.raises(DatasetError, match=rf"{xml.name}: object 0 names synset 'n8"):
        ILSVRC(root, "test", layout="original")
