"""Figures of localization maps and of a run's threshold curves (matplotlib, no display needed).

``overlay(image, map, boxes=None, gt=None)`` draws a map over an image with predicted boxes (red), GT
boxes or a GT mask (green) and the map's argmax (white cross); ``curves(run)`` draws the curves a run's
metrics were read from: box accuracy vs τ per δ (MaxBoxAcc v1 and V2, the chosen τ marked),
precision–recall (PxAP), mIoU vs background threshold (dense), pointing accuracy per class. Both return a
``matplotlib.figure.Figure`` built without pyplot (so no GUI backend is touched; Jupyter shows it, and
``fig.savefig`` writes it with Agg).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PRED_COLOR, GT_COLOR, POINT_COLOR = "#ff3030", "#30ff30", "white"
CMAP = "jet"  # the colormap of WSOL papers' overlay figures
DPI = 100


def _figure(width: float, height: float) -> Any:
    """A figure on an Agg canvas (renders and saves anywhere; pyplot's GUI backends are never loaded)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def as_rgb(image: Any) -> np.ndarray:
    """An H×W×3 uint8 array from a PIL image, a path, or an array (gray, RGB, RGBA, float in [0, 1])."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            image = im.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype.kind == "f":
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be H×W, H×W×3 or H×W×4, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def fit_map(scoremap: Any, shape: tuple[int, int]) -> np.ndarray:
    """The map as float in [0, 1] (min-max; a constant map is all zeros), resized bilinearly to (H, W)."""
    import cv2

    m = np.asarray(scoremap.detach().cpu() if hasattr(scoremap, "detach") else scoremap, np.float32)
    m = np.squeeze(m)
    if m.ndim != 2:
        raise ValueError(f"map must be 2-D (H×W), got shape {m.shape}")
    m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if m.shape != tuple(shape):
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(m, 0, 1)


def draw(ax: Any, image: Any, scoremap: Any = None, boxes: Any = None, gt: Any = None, point: Any = None,
         title: str | None = None, alpha: float = 0.5) -> None:
    """Draw one panel on ``ax``: the image, the map over it, GT (boxes (N, 4) x0y0x1y1 or an H×W mask) and
    predicted boxes, in the image's pixel coordinates."""
    from matplotlib.patches import Rectangle

    rgb = as_rgb(image)
    ax.imshow(rgb)
    if scoremap is not None:
        ax.imshow(fit_map(scoremap, rgb.shape[:2]), cmap=CMAP, alpha=alpha, vmin=0, vmax=1)
    if gt is not None:
        g = np.asarray(gt)
        if g.ndim == 2 and g.shape == rgb.shape[:2] and g.shape[1] != 4:  # a mask (not N boxes)
            ax.contour(g.astype(float), levels=[0.5], colors=[GT_COLOR], linewidths=1.2)
        else:
            for x0, y0, x1, y1 in g.reshape(-1, 4):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=GT_COLOR, lw=1.5))
    for x0, y0, x1, y1 in (np.asarray(boxes).reshape(-1, 4) if boxes is not None else ()):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=PRED_COLOR, lw=1.5))
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="x", color=POINT_COLOR, markersize=8, mew=2)
    if title:
        ax.set_title(title, fontsize=8)
    ax.set_xlim(-0.5, rgb.shape[1] - 0.5)
    ax.set_ylim(rgb.shape[0] - 0.5, -0.5)
    ax.axis("off")


def overlay(image: Any, map: Any, boxes: Any = None, gt: Any = None, *, point: Any = None,
            title: str | None = None, alpha: float = 0.5) -> Any:
    """A figure of ``map`` (any size, resized to the image) over ``image`` with predicted ``boxes`` and
    ``gt`` (boxes or a mask), all in the image's pixels."""
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    fig = _figure(4.0 * w / max(h, w) + 0.2, 4.0 * h / max(h, w) + (0.4 if title else 0.2))
    draw(fig.add_subplot(), rgb, map, boxes, gt, point, title, alpha)
    return fig


def grid(rows: Sequence[Sequence[dict]], col_titles: Sequence[str] = (), cell: float = 2.4) -> Any:
    """A figure of panels: ``rows[r][c]`` holds ``draw``'s keyword arguments (image, scoremap, boxes, gt,
    point, title); columns may be headed by ``col_titles``."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = _figure(cell * n_cols, cell * n_rows + 0.3)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            if c < len(row):
                draw(axes[r][c], **row[c])
            else:
                axes[r][c].axis("off")
    for c, t in enumerate(col_titles):
        axes[0][c].set_title(f"{t}\n{axes[0][c].get_title()}".strip(), fontsize=8)
    return fig


# -------------------------------------------------------------------------------------------- curves
def _load_run(run: Any) -> tuple[dict, dict, list]:
    """(curves per variant, metrics.json, records) of a run directory."""
    from . import records

    run = Path(run)
    path = run / records.CURVES
    if not path.exists():
        raise FileNotFoundError(f"{path}: no curves here; is {run} a finished wsolbench run directory?")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    recs = records.read(run) if (run / records.PER_IMAGE).exists() else []
    return json.loads(path.read_text(encoding="utf-8")), metrics, recs


def pointing_per_class(recs: Sequence[dict], variant: str = "default") -> dict[int, float]:
    """Pointing accuracy (%) per class: the share of a class's images whose map argmax hits its GT (a GT box
    of the labelled class, or the pointing game's rule per class in the image)."""
    hits: dict[int, list[bool]] = {}
    for r in recs:
        v = r.get("variants", {}).get(variant, {})
        if "point_hit" in v and "label" in r:
            hits.setdefault(int(r["label"]), []).append(bool(v["point_hit"]))
        for c, h in v.get("point_hits", {}).items():  # the pointing game: one entry per (image, class)
            hits.setdefault(int(c), []).append(bool(h))
    return {k: 100.0 * sum(h) / len(h) for k, h in sorted(hits.items())}


def curves(run_or_dataframe: Any, variant: str = "default") -> Any:
    """A figure of the curves behind a run's numbers (a run directory), or of a DataFrame's columns
    against its index (one line per column)."""
    if hasattr(run_or_dataframe, "columns"):  # a pandas DataFrame
        df = run_or_dataframe
        fig = _figure(5, 3.5)
        ax = fig.add_subplot()
        for col in df.columns:
            ax.plot(np.asarray(df.index, float), np.asarray(df[col], float), label=str(col))
        ax.set_xlabel(str(df.index.name or "τ"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return fig
    data, metrics, recs = _load_run(run_or_dataframe)
    results = metrics.get("results", {})
    if variant not in data and variant not in results:
        raise KeyError(f"{run_or_dataframe}: no variant {variant!r}; the run has {sorted(set(data) | set(results))}")
    panels = _panels(data.get(variant, {}), results.get(variant, {}), recs, variant)
    if not panels:
        raise ValueError(f"{run_or_dataframe}: the run's metrics have no threshold curves or per-class pointing")
    fig = _figure(4.2 * len(panels), 3.4)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        panel(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics.get('method')} on {metrics.get('dataset')} ({metrics.get('split')}, "
                 f"{metrics.get('n_images')} images) — {variant}", fontsize=9)
    return fig


def _panels(cur: dict, results: dict, recs: list, variant: str) -> list:
    """One drawing function per curve kind the run has."""
    panels = []
    for name, label in (("v1", "MaxBoxAcc (largest contour)"), ("v2", "MaxBoxAccV2 (all contours)")):
        if name in cur:
            panels.append(lambda ax, c=cur[name], n=name, lab=label: _box_curve(ax, c, results, n, lab))
    if "pxap" in cur:
        panels.append(lambda ax, c=cur["pxap"]: _pr_curve(ax, c, results))
    if "miou" in cur:
        panels.append(lambda ax, c=cur["miou"]: _miou_curve(ax, c, results))
    per_class = pointing_per_class(recs, variant)
    if per_class:
        panels.append(lambda ax: _pointing_bars(ax, per_class))
    return panels


def _box_curve(ax: Any, c: dict, results: dict, name: str, label: str) -> None:
    tau = np.asarray(c["tau"])
    for key in sorted(k for k in c if k.startswith("iou")):
        line, = ax.plot(tau, c[key], label=f"δ={key[3:]}")
        best = results.get(f"{name}_best_tau_{key}")
        if best is not None:
            k = int(np.argmin(np.abs(tau - best)))
            ax.plot([tau[k]], [c[key][k]], "o", color=line.get_color())
    ax.set(xlabel="τ (map threshold)", ylabel="box accuracy (%)", title=label, ylim=(0, 100))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)


def _pr_curve(ax: Any, c: dict, results: dict) -> None:
    ax.plot(np.nan_to_num(c["recall"]), np.nan_to_num(c["precision"]))
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"pixel precision–recall (PxAP {results.get('pxap', float('nan')):.1f})")
    ax.title.set_fontsize(9)


def _miou_curve(ax: Any, c: dict, results: dict) -> None:
    ax.plot(c["bg_threshold"], c["miou"])
    best = results.get("best_bg_threshold")
    if best is not None:
        k = int(np.argmin(np.abs(np.asarray(c["bg_threshold"]) - best)))
        ax.plot([c["bg_threshold"][k]], [c["miou"][k]], "o")
    ax.set(xlabel="background threshold", ylabel="mIoU (%)", title="mIoU vs background threshold")
    ax.title.set_fontsize(9)


def _pointing_bars(ax: Any, per_class: dict[int, float]) -> None:
    ax.bar([str(k) for k in per_class], list(per_class.values()))
    ax.set(xlabel="class", ylabel="pointing accuracy (%)", ylim=(0, 100), title="pointing accuracy per class")
    ax.title.set_fontsize(9)
    ax.tick_params(axis="x", labelsize=6)
