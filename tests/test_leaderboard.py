"""The leaderboard cannot mislead: limited runs never shadow full ones, numbers meet paper rows only under the
same dataset, split, metric and protocol, synthetic tables hold no paper rows; results as a DataFrame."""
from __future__ import annotations

import json
import os

import pytest

from wsolbench.leaderboard import build_tables, default_paper_csv, load_runs, paper_rows, render
from wsolbench.results import is_overridden, load_runs as load_frame


def _write_run(root, run_id, value, *, dataset="cub", protocol="tedloc", limit=None, overrides=(), mtime=0,
               metric="maxboxacc", label=None):
    d = root / run_id
    d.mkdir(parents=True)
    rec = {"run_id": run_id, "method": "tedloc", "dataset": dataset, "dataset_key": "cub", "split": "test",
           "profile": "paper", "task": "boxes", "n_images": 5794 if limit is None else limit, "limit": limit,
           "protocol": {"name": protocol}, "protocol_label": label or protocol, "overrides": list(overrides),
           "synthetic": dataset.startswith("synthetic-"), "threshold_policy": "oracle", "git": "abc",
           "versions": {"torch": "x"}, "results": {"default": {metric: value, "nonfinite_maps": 0}}}
    (d / "metrics.json").write_text(json.dumps(rec))
    os.utime(d / "metrics.json", (1_700_000_000 + mtime, 1_700_000_000 + mtime))
    return d


def _table(tables, start):
    hits = [t for title, t in tables.items() if title == start or title.startswith(start + " (")]
    assert len(hits) == 1, list(tables)
    return hits[0]


def test_a_limited_run_never_replaces_the_full_run(tmp_path):
    _write_run(tmp_path, "full", 97.0, mtime=0)
    _write_run(tmp_path, "smoke", 100.0, limit=1, mtime=10)  # newer, but a --limit 1 smoke run
    _write_run(tmp_path, "full-again", 98.1, mtime=20)  # a newer full run replaces the older full one
    table = _table(build_tables(load_runs(tmp_path), with_paper=False), "cub · test · protocol tedloc")
    measured = table[table["source"] == "measured"].set_index("run")
    assert measured.loc["full", "maxboxacc"] == 98.1 and measured.loc["limit 1", "maxboxacc"] == 100.0
    assert len(measured) == 2


def test_measured_and_reported_rows_meet_only_under_the_same_protocol(tmp_path):
    _write_run(tmp_path, "ted", 98.0, protocol="tedloc")
    _write_run(tmp_path, "ws", 96.0, protocol="wsolevaluation", mtime=1)
    _write_run(tmp_path, "coarse", 95.0, protocol="tedloc", label="tedloc*", mtime=2,
               overrides=("harness.cam_curve_interval=0.01",))
    tables = build_tables(load_runs(tmp_path))
    ted = _table(tables, "cub · test · protocol tedloc")
    assert set(ted["source"]) == {"measured", "reported: TeD-Loc Table 1", "reported: TeD-Loc Section 4.2"}
    assert 98.7 in set(ted["maxboxacc"])  # TeD-Loc's own number, same dataset, split, metric, protocol
    ws = _table(tables, "cub · test · protocol wsolevaluation")
    assert set(ws["source"]) == {"measured"}  # no paper reports CUB under wsolevaluation: alone
    star = _table(tables, "cub · test · protocol tedloc*")
    assert set(star["source"]) == {"measured"} and star["run"].iloc[0].startswith("overridden")
    # the GenPromp and literature rows of CUB stay in their own reported-only tables
    genpromp = _table(tables, "cub · test · protocol genpromp")
    assert set(genpromp["source"]) == {"reported: GenPromp (ICCV 2023) Table 1"}


def test_synthetic_tables_hold_no_paper_rows(tmp_path):
    _write_run(tmp_path, "syn", 61.5, dataset="synthetic-cub", protocol="tedloc")
    tables = build_tables(load_runs(tmp_path))
    syn = _table(tables, "synthetic-cub · test · protocol tedloc")
    assert set(syn["source"]) == {"measured"}
    assert any("(reported by the papers)" in title for title in tables)  # the real CUB numbers, apart
    md = render(tables)
    assert "synthetic world: no paper number applies" in md and "nan" not in md


def test_with_no_runs_every_paper_table_is_shown(tmp_path):
    tables = build_tables([])
    assert "flickr30k · test · protocol wwbl-open (reported by the papers)" in tables
    assert "voc · train · protocol mctformer-miou (reported by the papers)" in tables


def test_the_shipped_paper_table_is_the_reference(shared_fixtures):
    reference = shared_fixtures.parent / "reference" / "paper-numbers.csv"
    assert default_paper_csv().read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")
    assert {r["protocol"] for r in paper_rows()} >= {"genpromp", "tedloc", "wwbl-cub", "mctformer-miou"}


def test_results_frame_has_one_row_per_run_variant_metric_with_provenance(tmp_path):
    _write_run(tmp_path, "full", 97.0)
    _write_run(tmp_path, "smoke", 100.0, limit=1, mtime=10, overrides=("harness.batch_size=4",))
    df = load_frame(tmp_path)
    assert len(df) == 4 and set(df["metric"]) == {"maxboxacc", "nonfinite_maps"}
    smoke = df[(df.run_id == "smoke") & (df.metric == "maxboxacc")].iloc[0]
    assert smoke["limited"] and not smoke["overridden"] and smoke["value"] == 100.0 and smoke["protocol"] == "tedloc"
    assert smoke["git"] == "abc" and json.loads(smoke["versions"]) == {"torch": "x"} and not smoke["synthetic"]
    assert list(df["run_id"].unique()) == ["smoke", "full"]  # newest first
    assert is_overridden(["train.lr=1e-4"]) and not is_overridden(["harness.batch_size=8", "harness.tau=0.23"])


def test_unreadable_metrics_json_names_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match="bad/metrics.json: not valid JSON"):
        load_frame(tmp_path)
