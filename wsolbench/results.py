"""Results as data: every finished run as rows of a pandas DataFrame, one per run × variant × metric.

    from wsolbench.results import load_runs
    df = load_runs("runs")                      # every runs/*/metrics.json
    df[(df.metric == "maxboxacc") & ~df.limited].pivot_table(index="method", columns="protocol", values="value")

Each row carries its provenance: the protocol (``protocol`` is its label, with ``*`` when harness settings
overrode it), whether the run was limited (``--limit``) or overridden (``--set`` of anything that can change a
number), the overrides, git hash, library versions, and whether the data was the synthetic world. The
leaderboard (``wsolbench.leaderboard``) is built on this frame.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .protocols import OVERRIDABLE

if TYPE_CHECKING:
    import pandas as pd

# ``--set`` keys that never change a number (batches are sums; a skipped image is counted): not an override.
# The protocol's own keys (harness.eval_size, ...) count only when they changed the protocol (label ``name*``).
NEUTRAL_OVERRIDES = ("harness.batch_size", "harness.on_error") + tuple(f"harness.{k}" for k in OVERRIDABLE)
FRAME_COLUMNS = ("run_id", "method", "variant", "dataset", "dataset_key", "split", "train_split", "profile", "task",
                 "protocol", "protocol_name", "metric", "value", "n_images", "limit", "limited", "overrides",
                 "overridden", "threshold_policy", "synthetic", "checkpoint", "git", "versions", "finished",
                 "run_dir")


def read_records(path: str | Path) -> list[dict]:
    """Every run's ``metrics.json`` under ``path`` (a runs directory, or one run directory), newest first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"runs directory not found: {path} (create runs with `wsolbench run`)")
    files = [path / "metrics.json"] if (path / "metrics.json").is_file() else list(path.glob("*/metrics.json"))
    records = []
    for f in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f}: not valid JSON ({exc}); delete the run or re-run it") from exc
        rec["_path"] = str(f)
        rec.setdefault("_finished", f.stat().st_mtime)
        records.append(rec)
    return records


def is_overridden(overrides: Iterable[str]) -> bool:
    """Whether a run's ``--set`` items can change its numbers (anything but batch size / error policy)."""
    return any(item.split("=", 1)[0].strip() not in NEUTRAL_OVERRIDES for item in overrides)


def record_rows(rec: dict) -> list[dict[str, Any]]:
    """The frame rows of one run record: one per variant × numeric metric."""
    proto = rec.get("protocol")
    name = proto.get("name", "") if isinstance(proto, dict) else (proto or "")
    label = rec.get("protocol_label", name)
    overrides = list(rec.get("overrides") or [])
    finished = rec.get("_finished")
    base = {
        "run_id": rec.get("run_id", Path(rec.get("_path", "?")).parent.name), "method": rec["method"],
        "dataset": rec["dataset"], "dataset_key": rec.get("dataset_key", rec["dataset"]), "split": rec.get("split"),
        "train_split": rec.get("train_split"), "profile": rec.get("profile"), "task": rec.get("task"),
        "protocol": label, "protocol_name": name, "n_images": rec.get("n_images"), "limit": rec.get("limit"),
        "limited": rec.get("limit") is not None, "overrides": "; ".join(overrides),
        "overridden": is_overridden(overrides) or label.endswith("*"),
        "threshold_policy": rec.get("threshold_policy", ""),
        "synthetic": bool(rec.get("synthetic", str(rec["dataset"]).startswith("synthetic-"))),
        "checkpoint": (rec.get("checkpoint") or None), "git": rec.get("git"),
        "versions": json.dumps(rec.get("versions", {}), sort_keys=True),
        "finished": datetime.fromtimestamp(finished, timezone.utc).isoformat() if finished else None,
        "run_dir": str(Path(rec["_path"]).parent) if "_path" in rec else None,
    }
    rows = []
    for variant, metrics in (rec.get("results") or {}).items():
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            rows.append({**base, "variant": variant, "metric": metric, "value": float(value)})
    return rows


def runs_frame(records: Iterable[dict]) -> "pd.DataFrame":
    """The DataFrame of ``records`` (as ``read_records`` returns them, newest first)."""
    import pandas as pd

    rows = [row for rec in records for row in record_rows(rec)]
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def load_runs(path: str | Path) -> "pd.DataFrame":
    """One row per run × variant × metric of every run under ``path``, with provenance (module docstring)."""
    return runs_frame(read_records(path))
