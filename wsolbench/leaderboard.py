"""Merge run results into per-dataset tables beside the numbers the papers report.

Measured rows come from ``runs/*/metrics.json`` (newest run wins per method/variant/dataset/split/profile);
reported rows come from ``leaderboards/paper_numbers.csv``. Every row says which it is.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from .io import write_text

COLUMNS = ("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls", "pxap", "piou",
           "miou", "pointing_game", "bbox_acc")
ARROW = {True: "↑", False: "↓"}


def default_paper_csv() -> Path:
    """The shipped table of paper-reported numbers (a copy of the reference CSV)."""
    return Path(__file__).resolve().parent.parent / "leaderboards" / "paper_numbers.csv"


def load_runs(runs_dir: str | Path) -> list[dict]:
    """Every finished run's metrics.json under ``runs_dir`` (newest first per identical setting)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise FileNotFoundError(f"runs directory not found: {runs_dir} (create runs with `wsolbench run`)")
    records = []
    for path in sorted(runs_dir.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); delete the run or re-run it") from exc
        rec["_path"] = str(path)
        records.append(rec)
    return records


def measured_rows(records: Iterable[dict]) -> list[dict]:
    rows, seen = [], set()
    for rec in records:
        for variant, metrics in rec["results"].items():
            key = (rec["method"], variant, rec["dataset"], rec["split"], rec["profile"])
            if key in seen:
                continue
            seen.add(key)
            name = rec["method"] if variant == "default" else f"{rec['method']}/{variant}"
            row = {"dataset": rec["dataset"], "dataset_key": rec.get("dataset_key", rec["dataset"]),
                   "method": name, "split": rec["split"], "profile": rec["profile"], "n": rec.get("n_images"),
                   "policy": rec.get("threshold_policy", ""), "source": "measured"}
            row.update({c: metrics.get(c) for c in COLUMNS})
            rows.append(row)
    return rows


def paper_rows(csv_path: str | Path | None = None) -> list[dict]:
    """Reported numbers, one row per (method, variant, dataset, split, source)."""
    path = Path(csv_path) if csv_path else default_paper_csv()
    rows: dict[tuple, dict] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for line_no, rec in enumerate(csv.DictReader(fh), start=2):
            missing = [k for k in ("method", "dataset", "metric", "value") if not rec.get(k)]
            if missing:
                raise ValueError(f"{path}:{line_no}: empty field(s) {', '.join(missing)}")
            key = (rec["method"], rec.get("variant", ""), rec["dataset"], rec.get("split", ""), rec.get("source", ""))
            row = rows.setdefault(key, {"dataset": rec["dataset"], "dataset_key": rec["dataset"],
                                        "method": f"{rec['method']} ({rec['variant']})" if rec.get("variant")
                                        else rec["method"], "split": rec.get("split", ""), "profile": "paper",
                                        "n": None, "policy": "", "source": f"reported: {rec.get('source', '')}"})
            if rec["metric"] in COLUMNS:
                try:
                    row[rec["metric"]] = float(rec["value"])
                except ValueError as exc:
                    raise ValueError(f"{path}:{line_no}: value {rec['value']!r} is not a number") from exc
    return [r for r in rows.values() if any(r.get(c) is not None for c in COLUMNS)]


def build_tables(records: list[dict], paper_csv: str | Path | None = None, with_paper: bool = True) -> dict:
    """{table title: list of rows}: one table per measured dataset, followed by the papers' rows for its kind."""
    import pandas as pd

    measured = measured_rows(records)
    reported = paper_rows(paper_csv) if with_paper else []
    tables = {}
    for dataset in sorted({r["dataset"] for r in measured}):
        rows = [r for r in measured if r["dataset"] == dataset]
        key = rows[0]["dataset_key"]
        extra = [r for r in reported if r["dataset_key"] == key]
        title = dataset if key == dataset else f"{dataset} ({key} format; paper rows are on the real {key})"
        frame = pd.DataFrame(rows + extra)
        cols = ["method", "split", "profile", "n", "policy", "source"] + [c for c in COLUMNS if frame.get(c) is not None and frame[c].notna().any()]
        tables[title] = frame[cols]
    return tables


def render(tables: dict, fmt: str = "md") -> str:
    """Markdown (headers carry ↑/↓) or CSV text of the tables."""
    if fmt not in ("md", "csv"):
        raise ValueError(f"unknown leaderboard format {fmt!r}; use md or csv")
    parts = []
    for title, frame in tables.items():
        frame = frame.rename(columns={c: f"{c} {ARROW[True]}" for c in COLUMNS if c in frame.columns})
        if fmt == "md":
            # counts print as integers and missing cells stay empty (tabulate would print "nan")
            cells = frame.astype(object).where(frame.notna(), None)
            if "n" in cells.columns:
                cells["n"] = [("" if v is None else str(int(v))) for v in cells["n"]]
            text_cols = [i for i, c in enumerate(cells.columns) if c == "n"]
            body = cells.to_markdown(index=False, floatfmt=".2f", missingval="", disable_numparse=text_cols)
            parts.append(f"### {title}\n\n{body}\n")
        else:
            parts.append(frame.assign(table=title).to_csv(index=False))
    return "\n".join(parts)


def write(tables: dict, out_dir: str | Path, fmt: str = "md", name: str = "leaderboard") -> Path:
    out = Path(out_dir) / f"{name}.{fmt}"
    write_text(out, render(tables, fmt))
    return out
