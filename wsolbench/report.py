"""``wsolbench show``: a static report of one run (or several side by side) — PNG grids of maps on images,
the metrics' threshold curves, and an ``index.html`` with the numbers and their provenance.

A grid row is one image: the image with its GT (boxes green, or the mask / label-map outline), then per run
the map over the image with the predicted box(es) at the protocol's chosen τ (red) and the map's argmax
(white cross). Images come from where the run read them (``per_image.jsonl``'s ``path``), maps from the
run's ``maps/`` (stored by the run, see ``wsolbench.records``). Nothing in the report needs a server or
JavaScript: every link is a relative file.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import records as rec_mod
from . import viz

ROWS_PER_PAGE = 6  # images per grid PNG
DEFAULT_WORST = 12


class ReportError(RuntimeError):
    """A report that cannot be made; the message is the one-line reason the CLI prints."""


@dataclass
class Run:
    """A finished run directory as the report reads it."""

    path: Path
    metrics: dict
    config_text: str
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.metrics.get('method')} / {self.metrics.get('dataset')}"

    def key(self, r: dict) -> str:
        """A record's identity: the image id, plus the entity for phrase records."""
        return f"{r['image_id']}#{r['entity']}" if "entity" in r else r["image_id"]

    def by_key(self) -> dict[str, dict]:
        return {self.key(r): r for r in self.records}


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics_path = path / "metrics.json"
    if not metrics_path.exists():
        raise ReportError(f"{metrics_path}: missing; {path} is not a finished run directory (run `wsolbench run` "
                          "to the end first)")
    if not (path / rec_mod.PER_IMAGE).exists() or not (path / rec_mod.CURVES).exists():
        raise ReportError(f"{path}: no {rec_mod.PER_IMAGE} / {rec_mod.CURVES}; the run predates per-image records "
                          "— run it again (`wsolbench run ... --resume` reuses its finished batches)")
    cfg = path / "config.yaml"
    return Run(path, json.loads(metrics_path.read_text(encoding="utf-8")),
               cfg.read_text(encoding="utf-8") if cfg.exists() else "", rec_mod.read(path))


def select(run: Run, worst: int | None, ids: Sequence[str] | None, variant: str) -> list[str]:
    """The record keys to show: ``ids`` (checked), else the ``worst`` failures of ``run``."""
    keys = run.by_key()
    if ids:
        wanted = []
        for i in ids:
            hit = [k for k in keys if k == i or k.split("#")[0] == i]
            if not hit:
                raise ReportError(f"--ids: {i!r} is not an image of {run.path} (see its {rec_mod.PER_IMAGE})")
            wanted.extend(h for h in hit if h not in wanted)
        return wanted
    return [run.key(r) for r in rec_mod.worst(run.records, worst or DEFAULT_WORST, variant)]


# --------------------------------------------------------------------------------------------- panels
def _image(path: str, shape: tuple[int, int] | None) -> np.ndarray:
    """The image resized to ``shape`` (H, W) — the map's resolution, as the evaluation resized it."""
    from PIL import Image

    if not Path(path).exists():
        raise ReportError(f"image file missing: {path} (the report reads images where the run found them; "
                          "restore the dataset or point WSOLBENCH_DATA back to it)")
    with Image.open(path) as im:
        im = im.convert("RGB")
        if shape is not None and im.size != (shape[1], shape[0]):
            im = im.resize((shape[1], shape[0]), Image.BILINEAR)
        return np.asarray(im)


def _map(run: Run, variant: str, r: dict) -> np.ndarray | None:
    """The stored map of record ``r``: the image's, an entity's, or the max over a dense image's classes."""
    root = run.path / rec_mod.MAPS_DIR
    if "entity" in r:
        return rec_mod.load_map(rec_mod.map_path(root, variant, r["image_id"], f"_e{r['entity']}"))
    classes = r.get("classes", r.get("labels") if "label" not in r else None)  # pointing game / dense
    if classes is not None:
        maps = [rec_mod.load_map(rec_mod.map_path(root, variant, r["image_id"], f"_c{c}")) for c in classes]
        maps = [m for m in maps if m is not None]
        return np.max(maps, axis=0) if maps else None
    return rec_mod.load_map(rec_mod.map_path(root, variant, r["image_id"]))


def _gt(run: Run, r: dict) -> Any:
    if "gt_boxes" in r:
        return np.asarray(r["gt_boxes"])
    if "gt_boxes_by_class" in r:
        return np.concatenate([np.asarray(b).reshape(-1, 4) for b in r["gt_boxes_by_class"].values()])
    root = run.path / rec_mod.MAPS_DIR
    suffixes = [f"_c{c}" for c in r["classes"]] if "classes" in r else [""]
    masks = [g for g in (rec_mod.load_map(rec_mod.map_path(root, "gt", r["image_id"], x)) for x in suffixes)
             if g is not None]
    if not masks:
        return None
    return np.any([(g > 0) & (g != 255) for g in masks], axis=0)  # masks (255) or a label map: foreground


def _caption(r: dict, v: dict) -> str:
    """A panel's title: how the image fared at the chosen τ."""
    parts = []
    o = rec_mod.box_result(v)
    if o is not None:
        hit = "hit" if o["hit"].get("50", False) else "miss"
        parts.append(f"IoU {o['best_iou']:.2f} {hit} τ={o['tau'].get('50', 0):.2f}")
    if "piou" in v:
        parts.append(f"pIoU {v['piou']:.1f}")
    if "miou" in v:
        parts.append(f"mIoU {v['miou']:.1f}")
    if "point_hit" in v and o is None:
        parts.append("point hit" if v["point_hit"] else "point miss")
    if v.get("point_hits"):
        parts.append(f"points hit {sum(v['point_hits'].values())}/{len(v['point_hits'])}")
    if "pred_class" in r:
        parts.append(f"pred {r['pred_class']} ({r['pred_score']:.2f})")
    if v.get("health", {}).get("constant") or v.get("health", {}).get("nonfinite"):
        parts.append("BAD MAP")
    return "\n".join([", ".join(parts[:2]), ", ".join(parts[2:])]).strip()


def row(runs: Sequence[Run], key: str, variant: str) -> list[dict]:
    """One grid row: the image with GT, then each run's map, boxes and point (``viz.draw`` arguments)."""
    first = next((run.by_key()[key] for run in runs if key in run.by_key()), None)
    if first is None:
        raise ReportError(f"{key!r} is in none of the runs")
    anchor = next(run for run in runs if key in run.by_key())
    m0 = _map(anchor, variant, first)
    img = _image(first["path"], m0.shape if m0 is not None else None)
    label = first.get("label", first.get("labels", "; ".join(dict.fromkeys(first.get("phrases", [])))))
    cells = [dict(image=img, gt=_gt(anchor, first), title=f"{key}\nGT {str(label)[:36]}")]
    for run in runs:
        r = run.by_key().get(key)
        if r is None:
            cells.append(dict(image=np.full_like(img, 255), title="not in this run"))
            continue
        v = r.get("variants", {}).get(variant, {})
        box = rec_mod.box_result(v)
        boxes = box["boxes"] if box is not None else v.get("boxes")
        cells.append(dict(image=img, scoremap=_map(run, variant, r), boxes=boxes, gt=_gt(run, r),
                          point=v.get("point"), title=_caption(r, v)))
    return cells


# --------------------------------------------------------------------------------------------- the report
def show(runs: Sequence[Path], out: Path, worst: int | None = None, ids: Sequence[str] | None = None,
         variant: str = "default") -> Path:
    """Write the report of ``runs`` (one run, or several compared on the same images) under ``out``;
    returns the path of ``index.html``."""
    loaded = [load_run(p) for p in runs]
    if not loaded:
        raise ReportError("show: name at least one run directory")
    for run in loaded:
        have = set(run.metrics.get("results", {}))
        if variant not in have:
            raise ReportError(f"--variant {variant!r}: {run.path} has variants {sorted(have)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = select(loaded[0], worst, ids, variant)
    grids = []
    heads = ["image + GT"] + [run.name for run in loaded]
    for page, start in enumerate(range(0, len(keys), ROWS_PER_PAGE)):
        fig = viz.grid([row(loaded, k, variant) for k in keys[start:start + ROWS_PER_PAGE]], heads)
        name = f"grid-{page + 1:02d}.png"
        fig.savefig(out / name)
        grids.append(name)
    curves = []
    for i, run in enumerate(loaded):
        name = f"curves-{i + 1}-{variant}.png"
        try:
            viz.curves(run.path, variant).savefig(out / name)
        except ValueError:  # a run whose metrics have no curve (e.g. phrase pointing): nothing to draw
            continue
        curves.append((run, name))
    index = out / "index.html"
    how = "the ones asked for (--ids)" if ids else "the worst localised first (lowest IoU / score at the chosen τ)"
    index.write_text(_html(loaded, keys, variant, grids, curves, how), encoding="utf-8")
    return index


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    e = lambda x: html.escape(f"{x:.2f}" if isinstance(x, float) else str(x))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + f"</tr>{body}</table>"


def _provenance(run: Run) -> list[tuple[str, Any]]:
    m = run.metrics
    opts = m.get("metric_options", {})
    rules = "; ".join(f"{k}: {v.get('box_rule') or v.get('metric')}" for k, v in opts.items()
                      if isinstance(v, dict) and (v.get("box_rule") or v.get("metric")))
    return [("run", run.path.name), ("method", m.get("method")), ("dataset", f"{m.get('dataset')} ({m.get('split')})"),
            ("profile", m.get("profile")), ("task", m.get("task")),
            ("protocol", _protocol_line(m)),
            ("metrics", rules), ("map preparation", m.get("map_preparation")),
            ("images", f"{m.get('n_images')} scored, {m.get('skipped', {}).get('count', 0)} skipped"),
            ("eval size", m.get("eval_size")), ("seed", m.get("seed")), ("git", m.get("git")),
            ("device", f"{m.get('device')}, {m.get('torch_threads')} torch threads"),
            ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())),
            ("wall time", f"{m.get('wall_time_s')} s")]


def _side_by_side(runs: Sequence[Run], variant: str) -> tuple[list[list[Any]], list[str]]:
    """(rows, header) of the leaderboard metrics every compared run has, one column per run."""
    from .harness import LEADERBOARD_METRICS

    res = [run.metrics.get("results", {}).get(variant, {}) for run in runs]
    keys = [k for k in LEADERBOARD_METRICS if any(isinstance(r.get(k), (int, float)) for r in res)]
    rows = [["protocol"] + [_protocol_line(run.metrics).split(";")[0] for run in runs]]
    rows += [[k] + [r.get(k, "") if r.get(k) is not None else "" for r in res] for k in keys]
    return rows, ["metric"] + [run.name for run in runs]


def _protocol_line(m: dict) -> str:
    """The scoring protocol in one line: its name (``*`` when overridden), τ policy, box rule, IoU test."""
    p = m.get("protocol")
    if not isinstance(p, dict):  # a run from before named protocols
        return f"{p or 'unnamed'}; threshold policy {m.get('threshold_policy')}"
    parts = [m.get("protocol_label") or p.get("name"), f"τ: {p.get('threshold')}", f"map {p.get('map_size')} px",
             f"box: {p.get('box_rule')}", f"IoU: {p.get('iou')}"]
    return "; ".join(str(x) for x in parts if x)


def _shown_rows(run: Run, keys: Sequence[str], variant: str) -> list[list[Any]]:
    by = run.by_key()
    out = []
    for k in keys:
        r = by.get(k)
        if r is None:
            continue
        v = r.get("variants", {}).get(variant, {})
        box = rec_mod.box_result(v)
        score = box["best_iou"] if box is not None else v.get("piou", v.get("miou", ""))
        hits = " ".join(f"δ{d}:{'✓' if h else '✗'}" for d, h in box["hit"].items()) if box is not None else ""
        health = ", ".join(f for f, bad in v.get("health", {}).items() if bad) or "ok"
        out.append([k, r.get("label", r.get("labels", "")), r.get("pred_class", ""), score, hits,
                    v.get("point_hit", ""), health])
    return out


def _html(runs: Sequence[Run], keys: Sequence[str], variant: str, grids: Sequence[str],
          curves: Sequence[tuple[Run, str]], how: str) -> str:
    e = html.escape
    title = " vs ".join(run.name for run in runs)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
             f"<title>wsolbench report: {e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>wsolbench report: {e(title)}</h1>",
             f"<p>Variant <b>{e(variant)}</b>. {len(keys)} image(s) shown: {e(how)}."
             " Green: ground truth; red: predicted box(es) at the protocol's τ; white cross: the map's maximum.</p>"]
    if len(runs) > 1:
        parts.append("<h2>Side by side</h2>" + _table(*_side_by_side(runs, variant)))
    for i, run in enumerate(runs):
        res = run.metrics.get("results", {}).get(variant, {})
        scalars = [(k, v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        parts.append(f"<h2 id='run-{i + 1}'>{e(run.name)}</h2>")
        parts.append("<div class='cols'><div>" + _table(scalars, ("metric", "value")) + "</div><div>"
                     + _table(_provenance(run), ("provenance", "")) + "</div></div>")
        parts.append(f"<details><summary>config.yaml</summary><pre>{e(run.config_text)}</pre></details>")
        if isinstance(run.metrics.get("protocol"), dict):
            parts.append(f"<details><summary>protocol</summary><pre>"
                         f"{e(json.dumps(run.metrics['protocol'], indent=1, ensure_ascii=False))}</pre></details>")
        for r, name in curves:
            if r is run:
                parts.append(f"<h3>Curves</h3><a href='{e(name)}'>"
                             f"<img src='{e(name)}' alt='curves of {e(run.name)}'></a>")
    parts.append("<h2>Images</h2>")
    for name in grids:
        parts.append(f"<a href='{e(name)}'><img class='grid' src='{e(name)}' alt='{e(name)}'></a>")
    for run in runs:
        parts.append(f"<h3>{e(run.name)}: shown images</h3>")
        parts.append(_table(_shown_rows(run, keys, variant),
                            ("image", "GT", "predicted", "IoU / pIoU / mIoU", "hit per δ", "point hit", "map")))
    parts.append("</body></html>\n")
    return "\n".join(parts)


_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%;border:1px solid #ddd}.cols{display:flex;gap:2em;flex-wrap:wrap}"
        "pre{background:#f6f6f6;padding:.5em;font-size:12px}")


def show_groups(groups: dict[str, Sequence[Path]], out: Path, worst: int | None = None) -> Path | None:
    """One compared report per group of runs (e.g. the demo's runs per dataset) under ``out/<group>/``, and
    ``out/index.html`` linking them; None when there is no run."""
    groups = {g: list(r) for g, r in groups.items() if r}
    if not groups:
        return None
    out = Path(out)
    links = []
    for group, runs in groups.items():
        index = show(runs, out / group, worst=worst)
        links.append(f"<li><a href='{html.escape(group)}/index.html'>{html.escape(group)}</a>: "
                     f"{html.escape(', '.join(load_run(r).name for r in runs))}</li>")
    top = out / "index.html"
    top.write_text(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
                   f"<title>wsolbench reports</title><style>{_CSS}</style></head><body><h1>wsolbench reports</h1>"
                   f"<ul>{''.join(links)}</ul></body></html>\n", encoding="utf-8")
    return top
