"""`wsolbench show`: the report of a tiny run writes PNG grids, curves and an index.html whose links resolve;
--compare, --ids, bad input; a slow check renders index.html in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsolbench import records
from wsolbench import cli
from wsolbench.cli import main
from wsolbench.harness import RunSpec, run
from wsolbench.report import ReportError, show


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny `center` and `random` runs on the same 10 synthetic-cub images."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("WSOLBENCH_DATA", "data"), ("WSOLBENCH_CACHE", "cache"), ("WSOLBENCH_WEIGHTS", "w"),
                         ("WSOLBENCH_CONFIG", "config.yaml")):
            mp.setenv(var, str(tmp / sub))
        yield [run(RunSpec(method=m, dataset="synthetic-cub", profile="tiny", limit=10, out=tmp / "runs",
                           progress=False, overrides=("harness.batch_size=5",))).run_dir
               for m in ("center", "random")]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v and not v.startswith(("data:", "#")):
                self.links.append(v)


def _links(index: Path) -> list[str]:
    p = _Links()
    p.feed(index.read_text(encoding="utf-8"))
    return p.links


def test_show_writes_grids_curves_and_an_index_whose_links_resolve(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["show", str(runs[0]), "--out", str(out), "--worst", "7"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    links = _links(out / "index.html")
    assert {"grid-01.png", "grid-02.png", "curves-1-default.png"} <= set(links)  # 7 images: 6 + 1 rows
    for link in links:
        assert (out / link).is_file(), link
        with Image.open(out / link) as im:
            arr = np.asarray(im.convert("L"))
        assert arr.std() > 10  # a drawn figure, not a blank page
    text = (out / "index.html").read_text()
    for fact in ("center", "synthetic-cub", "maxboxacc", "protocol", "oracle", "torch", "config.yaml"):
        assert fact in text
    # the worst-localised image comes first in the table of shown images
    recs = records.read(runs[0])
    worst_id = records.worst(recs, 1)[0]["image_id"]
    assert text.index(worst_id) < min(text.index(r["image_id"]) for r in recs
                                      if r["image_id"] != worst_id and r["image_id"] in text)


def test_compare_shows_the_same_images_side_by_side(runs, tmp_path):
    ids = [r["image_id"] for r in records.read(runs[0])[:2]]
    index = show(runs, tmp_path / "cmp", ids=ids)
    text = index.read_text()
    assert "center / synthetic-cub vs random / synthetic-cub" in text
    side = text[text.index("Side by side"):text.index("</table>", text.index("Side by side"))]
    for run_dir in runs:  # each run's MaxBoxAcc in the side-by-side table
        value = json.loads((run_dir / "metrics.json").read_text())["results"]["default"]["maxboxacc"]
        assert f"<td>{value:.2f}</td>" in side
    assert set(_links(index)) == {"grid-01.png", "curves-1-default.png", "curves-2-default.png"}
    with Image.open(tmp_path / "cmp" / "grid-01.png") as im:
        w, h = im.size
    assert w > 1.3 * h  # 2 rows × 3 columns (image + GT, center, random)
    for i in ids:
        assert text.count(i) == 2  # one row per run in the tables of shown images


def test_show_refuses_bad_input_with_one_line(runs, tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == getattr(cli, "EXIT_BAD_INPUT", 2)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.json" in err
    with pytest.raises(ReportError, match="--ids: 'no-such-image'"):
        show([runs[0]], tmp_path / "o", ids=["no-such-image"])
    with pytest.raises(ReportError, match="--variant 'cls_map'"):
        show([runs[0]], tmp_path / "o", variant="cls_map")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


PROBE = ("<script>window.addEventListener('load', () => { for (const im of document.images) "
         "{ if (!im.complete || im.naturalWidth === 0) console.error('broken image ' + im.src); } });</script>")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_index_renders_in_headless_chromium_without_console_errors(runs, tmp_path):
    out = tmp_path / "report"
    index = show(runs, out, worst=4)
    probe = out / "probe.html"  # the page plus a check that reports every image that failed to load
    probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    res = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", f"--screenshot={shot}", "--window-size=1280,1800", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr.shape[:2] == (1800, 1280)
    assert arr.std() > 20 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 1000  # text, tables and figures
    assert re.search(r"\bwsolbench report\b", index.read_text())


def test_demo_ends_with_a_report_of_its_runs(runs, tmp_path, monkeypatch, capsys):
    """`wsolbench demo` writes one compared report per dataset and says where (runs cut to 6 images; the
    ``runs`` fixture's environment, so the synthetic set is not generated again)."""
    from dataclasses import replace

    from wsolbench import demo, harness

    real = harness.run
    monkeypatch.setattr(harness, "run", lambda spec: real(replace(spec, limit=6, progress=False)))
    demo.run_demo(out=tmp_path / "runs", leaderboard_dir=tmp_path / "lb", methods=["center", "random"],
                  datasets=("synthetic-cub",))
    top = tmp_path / "runs" / "report" / "index.html"
    assert f"report (maps on the worst-localised images, curves) written to {top}" in capsys.readouterr().out
    assert _links(top) == ["synthetic-cub/index.html"]
    sub = top.parent / "synthetic-cub" / "index.html"
    assert "center / synthetic-cub vs random / synthetic-cub" in sub.read_text()
    assert all((sub.parent / link).is_file() for link in _links(sub))
