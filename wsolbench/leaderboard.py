"""Leaderboard tables that cannot mislead, built on ``wsolbench.results`` (one row per run × variant × metric).

- One table per (dataset, split, protocol). A measured row stands beside the papers' rows only there, so a
  number is only ever next to one with the same dataset, split, metric (column) and protocol. A run whose
  protocol was overridden has the protocol label ``name*`` and never meets a paper row.
- Measured rows are keyed by method, variant, dataset, split, profile, protocol, limit and overrides; per key
  the newest run wins, so a ``--limit`` or ``--set`` run is a row of its own (column ``run``) and never
  replaces a full default run.
- Synthetic-world tables never hold paper rows. The papers' numbers for the real dataset of the same format
  follow in their own tables ("reported" only); with no measured run at all, every paper table is shown.

Reported numbers come from ``paper_numbers.csv`` (package data, a copy of the reference table).
"""
from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from typing import Any

from .io import write_text
from .results import read_records, runs_frame

COLUMNS = ("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls", "pxap", "piou",
           "miou", "miou_sweep_best", "pointing_game", "pointing_game_difficult", "bbox_acc")
ARROW = {True: "↑", False: "↓"}
ROW_COLUMNS = ["method", "split", "profile", "protocol", "run", "n", "policy", "source"]


def default_paper_csv() -> Path:
    """The shipped table of paper-reported numbers (package data ``wsolbench/leaderboards/paper_numbers.csv``)."""
    return Path(str(resources.files("wsolbench.leaderboards") / "paper_numbers.csv"))


def load_runs(runs_dir: str | Path) -> list[dict]:
    """Every finished run's metrics.json under ``runs_dir``, newest first (``wsolbench.results.read_records``)."""
    return read_records(runs_dir)


def _run_kind(row: Any) -> str:
    parts = []
    if row["limited"]:
        parts.append(f"limit {int(row['limit'])}")
    if row["overridden"]:
        parts.append(f"overridden: {row['overrides'] or row['protocol']}")
    return ", ".join(parts) or "full"


def measured_rows(records: list[dict]) -> list[dict]:
    """One row per (method, variant, dataset, split, profile, protocol, limit, overrides), the newest run's."""
    frame = runs_frame(records)
    frame = frame[frame["metric"].isin(COLUMNS)]
    key = ["method", "variant", "dataset", "split", "profile", "protocol", "limit", "overrides"]
    rows: dict[tuple, dict] = {}
    for rec in frame.itertuples(index=False):
        r = rec._asdict()
        k = tuple("" if v is None else str(v) for v in (r[c] for c in key))
        if k in rows and rows[k]["_run_id"] != r["run_id"]:
            continue  # an older run of the same setting
        row = rows.setdefault(k, {
            "_run_id": r["run_id"], "dataset": r["dataset"], "dataset_key": r["dataset_key"],
            "synthetic": bool(r["synthetic"]), "protocol": r["protocol"] or "(unrecorded)",
            "method": r["method"] if r["variant"] == "default" else f"{r['method']}/{r['variant']}",
            "split": r["split"], "profile": r["profile"], "run": _run_kind(r), "n": r["n_images"],
            "policy": r["threshold_policy"], "source": "measured"})
        row[r["metric"]] = r["value"]
    return [{k: v for k, v in row.items() if k != "_run_id"} for row in rows.values()]


def paper_rows(csv_path: str | Path | None = None) -> list[dict]:
    """Reported numbers, one row per (method, variant, dataset, split, protocol, source)."""
    path = Path(csv_path) if csv_path else default_paper_csv()
    rows: dict[tuple, dict] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for line_no, rec in enumerate(csv.DictReader(fh), start=2):
            missing = [k for k in ("method", "dataset", "metric", "value") if not rec.get(k)]
            if missing:
                raise ValueError(f"{path}:{line_no}: empty field(s) {', '.join(missing)}")
            if rec["metric"] not in COLUMNS:
                continue  # parameters, latency: not a localisation number
            protocol = rec.get("protocol") or "(unrecorded)"
            key = (rec["method"], rec.get("variant", ""), rec["dataset"], rec.get("split", ""), protocol,
                   rec.get("source", ""))
            row = rows.setdefault(key, {
                "dataset": rec["dataset"], "dataset_key": rec["dataset"], "synthetic": False, "protocol": protocol,
                "method": f"{rec['method']} ({rec['variant']})" if rec.get("variant") else rec["method"],
                "split": rec.get("split", ""), "profile": "paper", "run": "", "n": None, "policy": "",
                "source": f"reported: {rec.get('source', '')}"})
            try:
                row[rec["metric"]] = float(rec["value"])
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: value {rec['value']!r} is not a number") from exc
    return list(rows.values())


def build_tables(records: list[dict], paper_csv: str | Path | None = None, with_paper: bool = True) -> dict:
    """{table title: DataFrame}: a table per measured (dataset, split, protocol), with the papers' rows only where
    all three match on real data; then the papers' tables for the real datasets measured (all, with no runs)."""
    import pandas as pd

    measured = measured_rows(records)
    reported = paper_rows(paper_csv) if with_paper else []
    tables: dict[str, Any] = {}
    used: set[tuple] = set()
    for key in sorted({(r["dataset"], r["split"], r["protocol"]) for r in measured}):
        rows = [r for r in measured if (r["dataset"], r["split"], r["protocol"]) == key]
        synthetic = rows[0]["synthetic"]
        beside = [] if synthetic else [r for r in reported if (r["dataset"], r["split"], r["protocol"]) == key]
        used.update({key} if beside else set())
        note = " (synthetic world: no paper number applies)" if synthetic else ""
        tables[f"{key[0]} · {key[1]} · protocol {key[2]}{note}"] = _frame(pd, rows + beside)
    wanted = {r["dataset_key"] for r in measured}
    for key in sorted({(r["dataset"], r["split"], r["protocol"]) for r in reported} - used):
        if measured and key[0] not in wanted:
            continue
        rows = [r for r in reported if (r["dataset"], r["split"], r["protocol"]) == key]
        tables[f"{key[0]} · {key[1]} · protocol {key[2]} (reported by the papers)"] = _frame(pd, rows)
    return tables


def _frame(pd: Any, rows: list[dict]) -> Any:
    frame = pd.DataFrame(rows)
    metrics = [c for c in COLUMNS if c in frame.columns and frame[c].notna().any()]
    return frame[ROW_COLUMNS + metrics]


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
