"""Per-image records of a run (``per_image.jsonl``) and the small maps the report draws (``maps/``).

While a batch is scored, each evaluator calls ``image_records`` (or ``dense_records`` / ``phrase_record``):
it returns one JSON-able record per image (prediction, map health, pointing point, GT at the evaluation
size) and writes every variant's map as an 8-bit PNG ``maps/<variant>/<image id>.png``. The PNG holds
u = uint8(map · 255), exactly the values MaxBoxAcc binarises (``u > int(τ · max u)``), so boxes recomputed
from it at any τ are the metric's boxes; a CUB-like 224×224 map takes a few kB. Records travel through
the cache shards with the metric states, so a resumed run has them too.

The τ a protocol reads a metric at is known only after the last batch (oracle τ), so ``finish`` runs once
the metrics are computed: per image and variant it adds the box(es) at the chosen τ, the IoU there and
hit / miss per δ (MaxBoxAcc), the pixel IoU at the chosen τ (PxAP), the mIoU at the chosen background
threshold (dense), then writes ``per_image.jsonl`` and ``curves.json`` (the metrics' per-τ
curves) for the report; under several processes each rank completes its share. The hit counts of the
records equal the metric's counts (tested).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .io import write_text

MAPS_DIR = "maps"
PER_IMAGE = "per_image.jsonl"
CURVES = "curves.json"


# ------------------------------------------------------------------------------------------ map files
def map_path(root: Path, variant: str, image_id: str, suffix: str = "") -> Path:
    """Where the map of ``image_id`` (``suffix``: a class or entity) lives under ``root`` (the run's
    ``maps/``); ids with path separators keep them as folders, anything else odd becomes '_'."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in str(image_id).replace("\\", "/").split("/")
             if p not in ("", ".", "..")]
    return Path(root, variant, *parts[:-1], parts[-1] + suffix + ".png")


def quantize(scoremap: np.ndarray) -> np.ndarray:
    """u = uint8(map · 255) with the map in float64: MaxBoxAcc's binarisation input (truncation)."""
    return (np.asarray(scoremap, np.float64) * 255.0).astype(np.uint8)


def save_map(path: Path, u8: np.ndarray, binary: bool = False) -> None:
    """Write an 8-bit map as PNG at zlib level 1 (level 9 made the map writes most of the harness's CPU on
    noisy maps and masks for a few percent less disk) with the Sub filter on every row (OpenCV's default tries
    all five per row: twice the encoding time, 0.77 vs 0.39 ms for a 224 px map, and 7% larger files on the
    tiny methods' maps); ``binary`` (a 0/255 GT mask): 1 bit per pixel, a quarter of the encoding time, read
    back as the same 0/255 uint8."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    flags = [cv2.IMWRITE_PNG_BILEVEL, 1] if binary else \
        [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    if not cv2.imwrite(str(path), np.ascontiguousarray(u8), flags):
        raise OSError(f"cannot write map {path}")


def load_map(path: Path) -> np.ndarray | None:
    """The 8-bit map stored at ``path`` (None when the run did not store it)."""
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if Path(path).exists() else None


# ------------------------------------------------------------------------------------ box rule at one τ
def boxes_at(u: np.ndarray, tau: float, multi_contour: bool) -> np.ndarray:
    """The box(es) MaxBoxAcc takes at τ (wsolevaluation's rule, see metrics/boxes.py): contours of
    u > int(τ · max u) (RETR_TREE, CHAIN_APPROX_SIMPLE), boundingRect clipped to W−1/H−1; the largest
    contour (first on ties, v1) or all of them (V2); no contour gives [0, 0, 0, 0]."""
    import cv2

    t = int(np.float64(tau) * np.float64(u.max()))
    binary = ((u > min(t, 255)) * 255).astype(np.uint8)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if not contours:
        return np.zeros((1, 4), np.int64)
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    h, w = u.shape
    rects = [cv2.boundingRect(c) for c in contours]
    return np.array([(x, y, min(x + bw, w - 1), min(y + bh, h - 1)) for x, y, bw, bh in rects], np.int64)


# ------------------------------------------------------------------------------- records during a batch
def _prediction(logits: Any, i: int) -> dict[str, Any]:
    if logits is None:
        return {}
    import torch

    row = logits[i].detach().float().cpu()
    probs = torch.softmax(row, dim=0)
    top5 = row.topk(min(5, row.numel())).indices.tolist()
    return {"top5": top5, "pred_class": top5[0], "pred_score": round(float(probs[top5[0]]), 6)}


def _health(raw: np.ndarray) -> dict[str, bool]:
    """The map's health flags, by the rule the run's counts use (``MapHealth``)."""
    from wsolbench.metrics import MapHealth

    h = MapHealth()
    h.update([raw])
    c = h.compute()
    return {"nonfinite": bool(c["nonfinite_maps"]), "constant": bool(c["constant_maps"])}


def _min_max(m: np.ndarray) -> np.ndarray:
    """A raw map scaled to [0, 1] for storing (a constant map gives zeros)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _point(m: np.ndarray) -> list[int]:
    """The pointing point: the map's argmax (first in row-major order) as [x, y]."""
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    return [int(x), int(y)]


def image_records(samples: Sequence[Any], out: Any, raw: dict[str, np.ndarray],
                  prepared: dict[str, list[np.ndarray]], maps_dir: Path | None,
                  gt_boxes: Sequence[np.ndarray] | None = None, masks: Sequence[np.ndarray] | None = None,
                  pxap_hists: dict[str, list[np.ndarray]] | None = None) -> list[dict]:
    """One record per image of a boxes/masks batch: id, label, path, prediction (top-5, class, softmax
    score), GT boxes at the evaluation size, and per variant the health flags, the pointing point (and
    whether it falls in a GT box), and, with masks, the image's PxAP histograms (``pxap_hists[variant][i]``,
    as the metric binned them: for its pIoU at the chosen τ). Writes each variant's map (and the GT mask)
    under ``maps_dir`` when given."""
    records = []
    for i, s in enumerate(samples):
        rec: dict[str, Any] = {"image_id": s.image_id, "label": s.label, "path": str(s.image_path),
                               **_prediction(getattr(out, "logits", None), i)}
        if gt_boxes is not None:
            rec["gt_boxes"] = np.asarray(gt_boxes[i], np.int64).tolist()
        variants = {}
        for variant, maps in prepared.items():
            v: dict[str, Any] = {"health": _health(raw[variant][i, 0]), "point": _point(maps[i])}
            if gt_boxes is not None:
                x, y = v["point"]
                b = np.asarray(gt_boxes[i]).reshape(-1, 4)
                v["point_hit"] = bool(((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])).any())
            if pxap_hists is not None:
                v["pxap_hist"] = _encode_hist(pxap_hists[variant][i])
            if maps_dir is not None:
                save_map(map_path(maps_dir, variant, s.image_id), quantize(maps[i]))
            variants[variant] = v
        if masks is not None and maps_dir is not None:
            save_map(map_path(maps_dir, "gt", s.image_id), masks[i].astype(np.uint8) * 255, binary=True)
        rec["variants"] = variants
        records.append(rec)
    return records


def _encode_hist(hist: np.ndarray) -> str:
    """An image's PxAP histograms (foreground then background counts per bin) as base64 of zlib'd int32 (a
    third of the JSON list's size: ~2 kB at the 0.001 grid), to travel in the shard."""
    import base64
    import zlib

    return base64.b64encode(zlib.compress(np.asarray(hist).astype("<i4").tobytes(), 1)).decode("ascii")


def dense_records(samples: Sequence[Any], per_class: dict[str, list[np.ndarray]], raw: dict[str, np.ndarray],
                  present: Sequence[Sequence[int]], label_maps: Sequence[np.ndarray], metric_factory: Any,
                  maps_dir: Path | None) -> list[dict]:
    """One record per image of a dense (VOC/COCO) batch: the present classes, and per variant the health
    flags, each present class's pointing point and the image's own mIoU per background threshold (from
    a one-image ``DenseMIoU``: ``metric_factory()``); each class map is written as ``<id>_c<k>.png``."""
    records = []
    for i, s in enumerate(samples):
        variants = {}
        for variant, maps in per_class.items():
            one = metric_factory()
            one.update([maps[i]], [present[i]], [label_maps[i]])
            flags = [_health(raw[variant][i, k]) for k in range(raw[variant].shape[1])]
            variants[variant] = {
                "health": {k: any(f[k] for f in flags) for k in ("nonfinite", "constant")},
                "points": {str(c): _point(maps[i][j]) for j, c in enumerate(present[i])},
                "miou_curve": np.round(_image_miou_curve(one.state_dict()), 4).tolist()}
            if maps_dir is not None:
                for j, c in enumerate(present[i]):
                    save_map(map_path(maps_dir, variant, s.image_id, f"_c{c}"), quantize(maps[i][j]))
        if maps_dir is not None:  # the GT label map (0 = background, k + 1 = class k, 255 = ignore)
            save_map(map_path(maps_dir, "gt", s.image_id), np.asarray(label_maps[i]).astype(np.uint8))
        records.append({"image_id": s.image_id, "labels": list(s.labels), "path": str(s.image_path),
                        "variants": variants})
    return records


def _image_miou_curve(state: dict[str, np.ndarray]) -> np.ndarray:
    """An image's own mIoU (%) per background threshold, over the classes (background included) that its
    GT or its prediction holds — the split's mIoU averages every class, which on one image would count
    each absent class as IoU 0."""
    tp, pred, gt = (np.asarray(state[k], np.float64) for k in ("tp", "pred", "gt"))
    union = gt[None, :] + pred - tp
    iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    return 100 * np.nanmean(iou, axis=1)


def pointing_records(samples: Sequence[Any], pairs: Sequence[tuple[int, int]], scored: dict[str, dict[int, tuple]],
                     metric_factory: Any, maps_dir: Path | None) -> list[dict]:
    """One record per image of a pointing-game batch: its classes, and per variant and scored class the
    pointing point and whether the game counts it a hit (a one-pair ``PointingGame``: ``metric_factory()``).
    ``scored[variant][k]`` = (map at the image's size, GT) of pair ``k`` = (image index, class); pairs the
    game skips are absent. GT boxes are kept per class; a GT mask (COCO) is written as ``gt/<id>_c<k>.png``."""
    out = []
    for i, s in enumerate(samples):
        mine = [(k, c) for k, (j, c) in enumerate(pairs) if j == i]
        rec: dict[str, Any] = {"image_id": s.image_id, "classes": [c for _, c in mine], "path": str(s.image_path),
                               "variants": {}}
        for variant, by_pair in scored.items():
            v: dict[str, Any] = {"points": {}, "point_hits": {}}
            for k, c in mine:
                if k not in by_pair:
                    continue
                m, gt = by_pair[k]
                game = metric_factory()
                game.update([m], [gt], [c])
                v["points"][str(c)] = _point(m)
                v["point_hits"][str(c)] = bool(game.state_dict()["hits"].sum())
                if maps_dir is not None:
                    save_map(map_path(maps_dir, variant, s.image_id, f"_c{c}"), quantize(_min_max(m)))
                g = np.asarray(gt)
                if g.ndim == 2 and g.shape == m.shape:
                    if maps_dir is not None:
                        save_map(map_path(maps_dir, "gt", s.image_id, f"_c{c}"), g.astype(np.uint8) * 255,
                                 binary=True)
                else:
                    rec.setdefault("gt_boxes_by_class", {})[str(c)] = g.reshape(-1, 4).tolist()
            rec["variants"][variant] = v
        out.append(rec)
    return out


def phrase_record(sample: Any, entity: Any, maps: dict[str, np.ndarray], maps_dir: Path | None) -> dict:
    """One record per (image, entity): the phrases, GT boxes (original pixels), and per variant the pointing
    point, whether it hits the entity's union box (``PhrasePointing`` as the evaluator scores it) and WWbL's
    predicted box."""
    from wsolbench.metrics import PhrasePointing, union_box
    from wsolbench.metrics.grounding import generate_box

    variants = {}
    for variant, m in maps.items():
        pp = PhrasePointing()
        pp.update([m], [union_box(entity.boxes)])
        health = _health(m)
        finite = not health["nonfinite"]
        variants[variant] = {"health": health, "point": _point(m), "point_hit": bool(int(pp.state_dict()["hits"])),
                             "boxes": [[round(float(c), 2) for c in generate_box(m)]] if finite else []}
        if maps_dir is not None and finite:
            save_map(map_path(maps_dir, variant, sample.image_id, f"_e{entity.entity_id}"), quantize(_min_max(m)))
    return {"image_id": sample.image_id, "entity": entity.entity_id, "phrases": list(entity.phrases),
            "path": str(sample.image_path), "gt_boxes": np.asarray(entity.boxes).tolist(), "variants": variants}


# --------------------------------------------------------------------------------- after the last batch
def finish(run_dir: Path, evaluator: Any, records: list[dict], policies: Any = None) -> list[dict]:
    """Complete the run's per-image ``records`` (dataset order, from the shards) with what depends on the
    chosen τ, then write ``per_image.jsonl`` and ``curves.json``. ``policies`` is what ``evaluator.compute``
    was given ({variant: per-metric policy} or None). Under several processes every rank (each holding the
    merged metrics) completes its round-robin share and the main rank gathers and writes them: on one
    process this was the longest serial step after the evaluation (1.4 ms of CPU per image: boxes re-traced
    at τ from the stored maps). Returns the completed records (every rank holds them all)."""
    from .distributed import current as current_world, gather_from_ranks

    run_dir = Path(run_dir)
    world = current_world()
    chosen: dict[str, dict[str, dict]] = {}
    curves: dict[str, dict[str, dict]] = {}
    for variant, mets in evaluator.metrics.items():
        policy = (policies or {}).get(variant)
        for name, m in mets.items():
            if not getattr(m, "count", 0):  # not a metric (health counts), or no image scored
                continue
            chosen.setdefault(variant, {})[name] = m.compute(policy.for_metric(name) if policy else None)
            if hasattr(m, "curves"):
                curves.setdefault(variant, {})[name] = {k: np.round(np.asarray(v, np.float64), 6).tolist()
                                                       for k, v in m.curves().items()}  # 6 decimals: plots
    maps_root = run_dir / MAPS_DIR
    mine = world.share(len(records))
    for i in mine:
        rec = records[i]
        for variant, v in rec.get("variants", {}).items():
            stored = functools.cache(functools.partial(load_map, map_path(maps_root, variant, rec["image_id"])))
            for name, result in chosen.get(variant, {}).items():  # v1 and V2 read the map once (its PNG
                _complete(v, rec, name, evaluator.metrics[variant][name], result, stored)  # decode was 2/5 of this)
            v.pop("pxap_hist", None)
            v.pop("miou_curve", None)
    if world.parallel:
        shares = gather_from_ranks([records[i] for i in mine])  # a collective: every rank calls it
        records = [shares[i % world.size][i // world.size] for i in range(len(records))]  # share() is round robin
    if world.is_main:
        write_text(run_dir / PER_IMAGE, "".join(json.dumps(r) + "\n" for r in records))
        write_text(run_dir / CURVES, json.dumps(curves))
    return records


def _complete(v: dict, rec: dict, name: str, metric: Any, result: dict, stored: Callable[[], Any]) -> None:
    """Add to one variant's record ``v`` what metric ``name`` decided at its chosen τ (``stored()``: the
    variant's stored 8-bit map of the image, or None)."""
    if "gt_boxes" in rec and (hasattr(metric, "multi_contour") or hasattr(metric, "gt_known_op")):
        u = stored()
        if u is None:
            return
        gt = np.asarray(rec["gt_boxes"])
        v[name] = box_outcome(u, gt, result, metric.multi_contour) if hasattr(metric, "multi_contour") \
            else fixed_box_outcome(u, gt, metric)
    elif "pxap_hist" in v and hasattr(metric, "edges"):  # PxAP
        v["piou"] = _image_piou(v["pxap_hist"], metric, result["best_tau_piou"])
    elif "miou_curve" in v and hasattr(metric, "bg_thresholds"):  # DenseMIoU: the reported threshold
        t = result.get("bg_threshold", result.get("best_tau_miou"))
        v["miou"] = v["miou_curve"][int(np.argmin(np.abs(metric.bg_thresholds - t)))]
        v["bg_threshold"] = t


def fixed_box_outcome(u: np.ndarray, gt: np.ndarray, metric: Any) -> dict[str, Any]:
    """A fixed-τ box protocol (``FixedBoxAccuracy``: GenPromp, WWbL-CUB): its one box at its τ, the best IoU
    over the GT boxes and GT-known hit. Exact for the uint8 gray rule (the stored map is that gray image);
    the cubehelix rule is recomputed from the 8-bit map."""
    from wsolbench.metrics import box_iou
    from wsolbench.metrics.fixed_box import _passes, contour_box

    box = np.asarray([contour_box((u + 0.5) / 255.0, metric.tau, metric.gray)])  # (u + .5)/255·255 → u
    iou = float(box_iou(box, gt).max())
    return {"tau": {"50": metric.tau}, "iou": {"50": round(iou, 6)}, "hit": {"50": _passes(iou, metric.gt_known_op)},
            "boxes": box.tolist(), "best_iou": round(iou, 6)}


def box_outcome(u: np.ndarray, gt: np.ndarray, result: dict, multi_contour: bool) -> dict[str, Any]:
    """Per δ of a MaxBoxAcc result: τ_δ (the chosen τ), the best IoU of the box(es) at τ_δ over the GT
    boxes, and hit = IoU ≥ δ/100; ``boxes`` are those at the τ of δ=50 (or the first δ)."""
    from wsolbench.metrics import box_iou

    deltas = result["iou_thresholds"]
    head = 50 if 50 in deltas else deltas[0]
    out: dict[str, Any] = {"tau": {}, "iou": {}, "hit": {}}
    by_tau: dict[float, tuple[np.ndarray, float]] = {}
    for d in deltas:
        key = f"iou{int(d)}" if float(d).is_integer() else f"iou{d:g}"
        tau = float(result[f"best_tau_{key}"])
        if tau not in by_tau:
            boxes = boxes_at(u, tau, multi_contour)
            by_tau[tau] = (boxes, float(box_iou(boxes, gt).max()))
        boxes, iou = by_tau[tau]
        out["tau"][str(d)], out["iou"][str(d)], out["hit"][str(d)] = tau, round(iou, 6), bool(iou >= d / 100)
        if d == head:
            out["boxes"] = boxes.tolist()
            out["best_iou"] = round(iou, 6)
    return out


def _image_piou(packed: str, metric: Any, tau: float) -> float:
    """The image's own pixel IoU (%) at τ, by the metric's rule on its one-image histograms."""
    import base64
    import zlib

    from wsolbench.metrics import ThresholdPolicy

    hist = np.frombuffer(zlib.decompress(base64.b64decode(packed)), "<i4").reshape(2, -1)
    one = type(metric)(metric.cam_curve_interval, allow_empty_gt=True)
    one.load_state_dict({"fg_hist": hist[0], "bg_hist": hist[1], "count": np.asarray(1)})
    if not one.state_dict()["fg_hist"].any():
        return 0.0
    return round(float(one.compute(ThresholdPolicy.fixed({"piou": tau}))["piou"]), 4)


def read(run_dir: Path) -> list[dict]:
    """The records of a finished run."""
    path = Path(run_dir) / PER_IMAGE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def box_result(v: dict) -> dict | None:
    """A variant record's headline box outcome: MaxBoxAcc v1, a fixed-τ box protocol, or V2 (None: none)."""
    return next((v[k] for k in ("v1", "fixed", "v2") if k in v), None)


def failure_key(record: dict, variant: str = "default") -> float:
    """Sort key putting the worst-localised images first: the best IoU at the chosen τ (boxes), the pixel
    IoU (masks), the mIoU (dense), pointing hit (phrases) or share of hits (pointing game); records without a
    score sort last."""
    v = record.get("variants", {}).get(variant, {})
    box = box_result(v)
    if box is not None:
        return float(box["best_iou"])
    for key in ("piou", "miou"):
        if key in v:
            return float(v[key])
    if "point_hit" in v:
        return float(v["point_hit"])
    if v.get("point_hits"):
        return float(np.mean(list(v["point_hits"].values())))
    return float("inf")


def worst(records: Iterable[dict], n: int, variant: str = "default") -> list[dict]:
    """The ``n`` records with the lowest ``failure_key`` (stable: ties keep run order)."""
    return sorted(records, key=lambda r: failure_key(r, variant))[:n]
