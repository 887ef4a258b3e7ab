"""Run one method on one dataset split: build, train if needed, localize in batches, score, write the run.

A run directory ``runs/<run-id>/`` holds ``config.yaml`` (fully resolved), ``metrics.json`` (metrics per
variant + threshold policy + map preparation + versions + git hash + seed), ``per_image.jsonl`` and
``cache/`` — one shard per finished batch with that batch's image ids and metric states. Metric states are
sums, batches are fixed slices of the split, and shards are written atomically, so ``--resume`` after a crash
or Ctrl-C skips finished batches and ends with exactly the numbers of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from .checkpoint import CheckpointError, load_foreign_method, load_record
from .config import load_harness_config, load_method_config, split_overrides
from .distributed import DistributedError, World, barrier, current as current_world, fit_and_save
from .distributed import describe as describe_parallel, init as init_world, rank_device, training_mode
from .io import atomic_path, write_json, write_text
from .pipeline import EvalOptions, check_amp, default_workers, scored_batches
from .records import MAPS_DIR, dense_records, image_records, phrase_record, pointing_records
from .records import finish as finish_records
from .registry import DATASETS, METHODS, create_dataset, get_method_class


class HarnessError(RuntimeError):
    """A run that cannot go on; the message is the one-line reason the CLI prints."""


@dataclass
class RunSpec:
    """Everything that identifies a run (the CLI's flags)."""

    method: str
    dataset: str
    split: str | None = None  # None: the dataset's benchmark split (VOC: train, COCO: val, else test)
    profile: str = "tiny"
    limit: int | None = None
    out: Path = Path("runs")
    resume: bool = False
    device: str = "cpu"
    checkpoint: Path | None = None
    overrides: tuple[str, ...] = ()
    data_root: Path | None = None
    run_id: str | None = None
    progress: bool = True
    workers: int | None = None  # image-decoding processes per rank (None: pipeline.default_workers)
    amp: str | None = None  # bf16 | fp16: localize under torch.autocast (changes the numbers; recorded)
    train_split: str | None = None  # None: the protocol's training split for the dataset, else "train"
    protocol: str | None = None  # None: the method config's protocol.<task>, else the task's default


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, dict[str, Any]]  # variant -> metric -> value
    record: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Evaluators: one per ground-truth task. Each keeps, per map variant, a dict of metric objects whose states
# are sums; ``batch_states`` / ``absorb`` move those states through the cache shards.
# ---------------------------------------------------------------------------------------------------------
class _Evaluator:
    task: str = ""
    capability: str = "single"
    maps_dir: Path | None = None  # where records.py writes each image's map for the report (None: not kept)

    def __init__(self, hcfg: dict, dataset: Any, method: Any, protocol: Any = None) -> None:
        from .protocols import TASK_DEFAULTS, get_protocol

        self.protocol = protocol if protocol is not None else get_protocol(TASK_DEFAULTS[self.task])
        self.hcfg = protocol_harness(hcfg, self.protocol)
        self.dataset = dataset
        self.method = method
        self.metrics: dict[str, dict[str, Any]] = {}

    def new_metrics(self) -> dict[str, Any]:
        raise NotImplementedError

    def _variant(self, name: str) -> dict[str, Any]:
        from wsolbench.metrics import MapHealth

        if name not in self.metrics:
            self.metrics[name] = {**self.new_metrics(), "health": MapHealth()}
        return self.metrics[name]

    def process(self, samples: Sequence[Any], images: list) -> tuple[dict[str, dict[str, Any]], list[dict]]:
        """Localize and score one batch into FRESH metric objects (the batch's shard); return them + records."""
        raise NotImplementedError

    def fresh(self, raw: np.ndarray) -> dict[str, Any]:
        """New metric objects for one variant of one batch, with the raw maps' health already counted."""
        from wsolbench.metrics import MapHealth

        mets = self.new_metrics()
        mets["health"] = MapHealth()
        mets["health"].update([raw[i, k] for i in range(raw.shape[0]) for k in range(raw.shape[1])])
        return mets

    def absorb(self, batch_metrics: dict[str, dict[str, Any]]) -> None:
        for variant, mets in batch_metrics.items():
            target = self._variant(variant)
            for name, m in mets.items():
                target[name].merge(m)

    def compute(self, policies: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        return {v: {**self.summarize(mets, (policies or {}).get(v)), **mets["health"].compute()}
                for v, mets in self.metrics.items()}

    def summarize(self, mets: dict[str, Any], policy: Any) -> dict[str, Any]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        any_variant = next(iter(self.metrics.values()), None) or self.new_metrics()
        return {name: m.options() for name, m in any_variant.items() if name != "health"}


def localize(method: Any, images: list, samples: Sequence[Any], **queries: Any) -> Any:
    """``method.localize`` with each image's ``ImageMeta``; a plugin whose ``localize`` predates the ``meta``
    argument is called without it."""
    import inspect

    params = inspect.signature(method.localize).parameters
    if "meta" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        queries["meta"] = image_meta(samples, images)
    return method.localize(images, **queries)


def image_meta(samples: Sequence[Any], images: Sequence[Any]) -> list:
    """The ``ImageMeta`` of each sample (id, path, original size) that ``localize`` receives."""
    from wsolbench.localizer import ImageMeta

    return [ImageMeta(image_id=s.image_id, path=str(s.image_path) if s.image_path else None,
                      size=tuple(s.size) if s.size else tuple(im.size)) for s, im in zip(samples, images)]


def _maps_by_variant(out: Any) -> dict[str, np.ndarray]:
    maps = {"default": out.maps}
    maps.update(out.extras or {})
    return {k: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
            for k, v in maps.items()}


class _BoxEvaluator(_Evaluator):
    """CUB/ILSVRC: MaxBoxAcc v1 (largest contour) and V2 (all contours), Top-1/Top-5 Loc, classification."""

    task = "boxes"

    def new_metrics(self) -> dict[str, Any]:
        from wsolbench.metrics import ClassificationAccuracy, MaxBoxAcc

        kw = dict(iou_thresholds=tuple(self.hcfg["iou_thresholds"]),
                  cam_curve_interval=self.hcfg["cam_curve_interval"])
        mets: dict[str, Any] = {"v1": MaxBoxAcc(multi_contour=False, **kw),
                                "v2": MaxBoxAcc(multi_contour=True, **kw),
                                "cls": ClassificationAccuracy()}
        if self.with_masks:
            from wsolbench.metrics import PxAP

            mets["pxap"] = PxAP(cam_curve_interval=self.hcfg["cam_curve_interval"])
        return mets

    @property
    def with_masks(self) -> bool:
        return bool(self.dataset.samples and self.dataset.samples[0].mask_paths)

    def process(self, samples, images):
        from wsolbench.metrics import prepare_map, scale_boxes

        size = int(self.hcfg["eval_size"])
        labels = [s.label for s in samples]
        out = localize(self.method, images, samples, classes=labels)
        top5 = _top5(out)
        gt = [scale_boxes(s.boxes, s.size or images[i].size, (size, size)) for i, s in enumerate(samples)]
        masks = ignores = None
        if self.with_masks:
            masks, ignores = zip(*(_resize_mask_pair(s.load_mask(), size) for s in samples))
        batch: dict[str, dict[str, Any]] = {}
        prepared: dict[str, list] = {}
        hists: dict[str, list] = {}
        for variant, arr in _maps_by_variant(out).items():
            maps = prepared[variant] = [prepare_map(arr[i, 0], (size, size), dtype=np.float64)
                                        for i in range(len(samples))]
            mets = self.fresh(arr[:, :1])
            mets["v1"].update(maps, gt, pred_top5=top5, labels=labels if top5 else None)
            mets["v2"].update(maps, gt)
            if top5 is not None:
                mets["cls"].update(top5, labels)
            if masks is not None:
                hists[variant] = _pxap_update(mets["pxap"], maps, masks, ignores)
            batch[variant] = mets
        records = image_records(samples, out, _maps_by_variant(out), prepared, self.maps_dir, gt, masks,
                                hists if masks is not None else None)
        return batch, records

    def summarize(self, mets, policy):
        v1 = mets["v1"].compute(_p(policy, "v1"))
        v2 = mets["v2"].compute(_p(policy, "v2"))
        res = {"maxboxacc": v1["maxboxacc"], "gt_known_loc": v1["maxboxacc"],
               "maxboxacc_v2": v2["maxboxacc_v2"]}
        for delta in self.hcfg["iou_thresholds"]:
            res[f"v1_maxboxacc_iou{delta}"] = v1[f"maxboxacc_iou{delta}"]
            res[f"v1_best_tau_iou{delta}"] = v1[f"best_tau_iou{delta}"]
            res[f"v2_maxboxacc_iou{delta}"] = v2[f"maxboxacc_iou{delta}"]
            res[f"v2_best_tau_iou{delta}"] = v2[f"best_tau_iou{delta}"]
        for key in ("top1_loc", "top5_loc"):
            if v1.get(key) is not None:
                res[key] = v1[key]
        res.update(mets["cls"].compute())
        if "pxap" in mets:
            px = mets["pxap"].compute(_p(policy, "pxap"))
            res.update({"pxap": px["pxap"], "piou": px["piou"]})
        res["threshold_policy"] = v1.get("threshold_policy", "oracle")
        return res


def _pxap_update(metric: Any, maps: list, masks: Sequence[np.ndarray], ignores: Sequence[Any]) -> list[np.ndarray]:
    """``metric.update`` (PxAP) that also returns each image's histograms, for its per-image record: each map
    is binned once (it was binned twice: PxAP took 1.13 ms of the harness's ~8 ms of CPU per CUB image, 0.63
    once; bench/harness_bench.py's stages)."""
    hists = metric.image_histograms(maps, list(masks), list(ignores))
    metric.add_histograms(hists)
    return hists


def _top5(out: Any) -> list[list[int]] | None:
    """The top-5 classes of each image from the method's logits (None: the method gave no class scores)."""
    if out.logits is None:
        return None
    return out.logits.detach().float().cpu().topk(min(5, out.logits.shape[1]), dim=1).indices.tolist()


def _missing_classifier(res: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Metrics the protocol lists but the method could not give are named with the reason, never dropped."""
    missing = [k for k in keys if res.get(k) is None]
    if missing:
        res["not_reported"] = {k: "the method returned no class scores (logits)" for k in missing}
    return res


class _FixedBoxEvaluator(_BoxEvaluator):
    """CUB/ILSVRC under a fixed-τ box protocol (genpromp, wwbl-cub): one box per map at the protocol's τ;
    GT-known, Top-1 and Top-5 Loc and classification accuracy."""

    def new_metrics(self) -> dict[str, Any]:
        from wsolbench.metrics import ClassificationAccuracy, FixedBoxAccuracy

        p = self.protocol
        return {"fixed": FixedBoxAccuracy(p.tau, gray=p.gray, gt_known_op=p.gt_known_op),
                "cls": ClassificationAccuracy()}

    def process(self, samples, images):
        from wsolbench.metrics import prepare_map_linear, scale_boxes, scale_boxes_clamped

        size = int(self.protocol.map_size)
        labels = [s.label for s in samples]
        out = localize(self.method, images, samples, classes=labels)
        top5 = _top5(out)
        sizes = [s.size or images[i].size for i, s in enumerate(samples)]
        gt = [scale_boxes_clamped(s.boxes, wh, size) if self.protocol.gt_scaling == "clamped"
              else scale_boxes(s.boxes, wh, (size, size)) for s, wh in zip(samples, sizes)]
        raw = _maps_by_variant(out)
        batch: dict[str, dict[str, Any]] = {}
        prepared: dict[str, list] = {}
        for variant, arr in raw.items():
            maps = prepared[variant] = [prepare_map_linear(arr[i, 0], (size, size)) for i in range(len(samples))]
            mets = self.fresh(arr[:, :1])
            mets["fixed"].update(maps, gt, pred_top5=top5, labels=labels if top5 else None)
            if top5 is not None:
                mets["cls"].update(top5, labels)
            batch[variant] = mets
        return batch, image_records(samples, out, raw, prepared, self.maps_dir, gt)

    def summarize(self, mets, policy):
        r = mets["fixed"].compute()
        res = {"gt_known_loc": r["gt_known_loc"], "top1_loc": r.get("top1_loc"), "top5_loc": r.get("top5_loc"),
               **mets["cls"].compute(), "threshold_policy": f"fixed(tau={r['tau']})"}
        return _missing_classifier(res, ("top1_loc", "top5_loc"))


class _MaskEvaluator(_Evaluator):
    """OpenImages30k: PxAP and pIoU on pixel masks with ignore regions."""

    task = "masks"

    def new_metrics(self):
        from wsolbench.metrics import EmptyForeground, PxAP

        return {"pxap": PxAP(cam_curve_interval=self.hcfg["cam_curve_interval"], allow_empty_gt=True),
                "empty_fg": EmptyForeground()}

    def process(self, samples, images):
        from wsolbench.metrics import prepare_map

        size = int(self.hcfg["eval_size"])
        out = localize(self.method, images, samples, classes=[s.label for s in samples])
        masks, ignores = zip(*(_resize_mask_pair(s.load_mask(), size) for s in samples))
        batch, prepared, hists = {}, {}, {}
        for variant, arr in _maps_by_variant(out).items():
            mets = self.fresh(arr[:, :1])
            prepared[variant] = [prepare_map(arr[i, 0], (size, size), dtype=np.float64) for i in range(len(samples))]
            hists[variant] = _pxap_update(mets["pxap"], prepared[variant], masks, ignores)
            mets["empty_fg"].update(masks)
            batch[variant] = mets
        return batch, image_records(samples, out, _maps_by_variant(out), prepared, self.maps_dir, masks=masks,
                                    pxap_hists=hists)

    def summarize(self, mets, policy):
        px = mets["pxap"].compute(_p(policy, "pxap"))
        return {"pxap": px["pxap"], "piou": px["piou"], "threshold_policy": px.get("threshold_policy", "oracle"),
                **mets["empty_fg"].compute()}


class _DenseEvaluator(_Evaluator):
    """VOC/COCO: mIoU of per-class maps for the GT-present classes (MCTformer protocol)."""

    task = "dense"
    capability = "multi"

    def new_metrics(self):
        from wsolbench.metrics import DenseMIoU

        start, stop, step = self.hcfg["miou_bg_thresholds"]
        return {"miou": DenseMIoU(num_classes=self.dataset.num_classes + 1,
                                  bg_thresholds=np.arange(start, stop, step))}

    def process(self, samples, images):
        from itertools import groupby

        from wsolbench.metrics import normalize_per_class

        runs = [list(g) for _, g in groupby(range(len(images)), key=lambda i: images[i].size)]
        if len(runs) > 1 and getattr(self.method, "maps_at_image_size", False):  # one image size per call
            parts = [self.process([samples[i] for i in r], [images[i] for i in r]) for r in runs]
            for part, _ in parts[1:]:
                for variant, mets in part.items():
                    for name, m in mets.items():
                        parts[0][0][variant][name].merge(m)
            return parts[0][0], [rec for _, recs in parts for rec in recs]
        out = localize(self.method, images, samples, classes=None)
        batch, dense_maps = {}, {}
        label_maps = [s.load_label_map() for s in samples]
        present = [sorted(set(int(c) for c in s.labels)) for s in samples]
        for variant, arr in _maps_by_variant(out).items():
            per_class = []
            for i, s in enumerate(samples):
                channel = {c: k for k, c in enumerate(out.classes[i])} if out.classes else None
                idx = [channel[c] if channel else c for c in present[i]]
                h, w = label_maps[i].shape
                per_class.append(normalize_per_class(arr[i, idx], (w, h)))
            mets = self.fresh(arr)
            mets["miou"].update(per_class, present, label_maps)
            batch[variant], dense_maps[variant] = mets, per_class
        return batch, dense_records(samples, dense_maps, _maps_by_variant(out), present, label_maps,
                                    lambda: self.new_metrics()["miou"], self.maps_dir)

    def summarize(self, mets, policy):
        r = mets["miou"].compute(_p(policy, "miou"))
        return {"miou": r["miou"], "bg_threshold": r["bg_threshold"], "best_bg_threshold": r.get("best_tau_miou"),
                "miou_sweep_best": r["miou_sweep_best"], "sweep_best_bg_threshold": r["sweep_best_bg_threshold"],
                "threshold_policy": r.get("threshold_policy", "oracle")}


class _PhraseEvaluator(_Evaluator):
    """Flickr30k Entities: phrase pointing accuracy and grounding box accuracy per (image, entity)."""

    task = "phrases"
    capability = "phrase"

    def new_metrics(self):
        from wsolbench.metrics import GroundingBoxAccuracy, PhrasePointing

        return {"pointing": PhrasePointing(), "box": GroundingBoxAccuracy()}

    def process(self, samples, images):
        """One query per (image, entity with boxes) as WWbL builds them: the maps of all the entity's
        phrases are averaged, resized (bilinear) to the original image, and scored against its boxes."""
        import cv2

        from wsolbench.datasets.flickr30k import grounding_samples
        from wsolbench.metrics import MapHealth, union_box

        batch: dict[str, dict[str, Any]] = {}
        records = []
        for s, img in zip(samples, images):
            w, h = img.size
            for g in grounding_samples([s]):
                out = localize(self.method, [img], [s], texts=[list(g.phrases)])
                entity_maps = {}
                for variant, arr in _maps_by_variant(out).items():
                    mets = batch.setdefault(variant, {**self.new_metrics(), "health": MapHealth()})
                    mets["health"].update(list(arr[0]))
                    if np.isnan(arr[0]).all():  # no prediction (wwbl-open: no caption cluster): skipped, as the
                        continue  # official metric; counted in nonfinite_maps
                    m = entity_maps[variant] = cv2.resize(arr[0].mean(axis=0).astype(np.float32), (w, h),
                                                          interpolation=cv2.INTER_LINEAR)
                    mets["pointing"].update([m], [union_box(g.boxes)])  # WWbL: the entity's union box
                    mets["box"].update([m], [g.boxes])
                records.append(phrase_record(s, g, entity_maps, self.maps_dir))
        if not batch:  # a batch with no gradable phrase still leaves an (empty) shard
            batch["default"] = {**self.new_metrics(), "health": MapHealth()}
        return batch, records

    def summarize(self, mets, policy):
        if mets["pointing"].count == 0:  # every entity of the variant was skipped (all-NaN maps)
            return {"pointing_game": None, "bbox_acc": None}
        return {"pointing_game": mets["pointing"].compute()["pointing_acc"],
                "bbox_acc": mets["box"].compute()["box_acc"]}


class _PointingEvaluator(_Evaluator):
    """VOC 2007 test / COCO 2014 val: the TorchRay pointing game, one map per (image, class in the image)."""

    task = "pointing"

    @property
    def flags(self) -> dict[str, Any] | None:
        return getattr(self.dataset, "difficult_flags", None)

    def new_metrics(self) -> dict[str, Any]:
        from wsolbench.metrics import PointingGame, PointingSkips

        n, tol = self.dataset.num_classes, int(self.protocol.tolerance)
        mets: dict[str, Any] = {"all": PointingGame(n, tol, allow_empty_gt=True), "skips": PointingSkips()}
        if self.flags is not None:  # an empty class mask is a miss, as in TorchRay
            mets["difficult"] = PointingGame(n, tol, allow_empty_gt=True)
        return mets

    def process(self, samples, images):
        from wsolbench.metrics import MapHealth, resize_bilinear

        pairs = [(i, c) for i, s in enumerate(samples) for c in pointing_classes(s)]
        records = [{"image_id": s.image_id, "classes": pointing_classes(s)} for s in samples]
        if not pairs:
            return {"default": {**self.new_metrics(), "health": MapHealth()}}, records
        out = localize(self.method, [images[i] for i, _ in pairs], [samples[i] for i, _ in pairs],
                       classes=[c for _, c in pairs])
        batch: dict[str, dict[str, Any]] = {}
        scored: dict[str, dict[int, tuple]] = {}  # variant -> pair -> (map, GT), for the per-image records
        for variant, arr in _maps_by_variant(out).items():
            mets = self.fresh(arr[:, :1])
            for k, (i, c) in enumerate(pairs):
                s = samples[i]
                w, h = s.size or images[i].size
                gt = pointing_gt(self.dataset, s, c, (h, w))
                if gt is None:
                    mets["skips"].update(all_difficult=1)
                    continue
                m = resize_bilinear(arr[k, 0], (w, h))
                mets["all"].update([m], [gt], [c])
                scored.setdefault(variant, {})[k] = (m, gt)
                if self.flags is not None:
                    if s.image_id in self.flags and not self.flags[s.image_id][c]:
                        mets["skips"].update(easy=1)
                    else:
                        mets["difficult"].update([m], [gt], [c])
            batch[variant] = mets
        return batch, pointing_records(samples, pairs, scored, lambda: self.new_metrics()["all"], self.maps_dir)

    def summarize(self, mets, policy):
        res: dict[str, Any] = {"pointing_game": None, "pointing_game_difficult": None}
        if mets["all"].count:
            r = mets["all"].compute()
            res.update(pointing_game=r["pointing_acc"], pointing_classes_evaluated=r["classes_evaluated"],
                       pointing_pairs=r["count"])
        if "difficult" in mets and mets["difficult"].count:
            res["pointing_game_difficult"] = mets["difficult"].compute()["pointing_acc"]
        res.update(mets["skips"].compute())
        res["threshold_policy"] = "none (argmax)"
        if self.flags is None:
            res["not_reported"] = {"pointing_game_difficult": "no EBP difficult-flag file beside the data "
                                                              "(pointing_game_ebp_<voc07|coco>_difficult.txt)"}
        return res


def pointing_classes(sample: Any) -> list[int]:
    """The classes TorchRay queries for an image: every class with an object (difficult ones too)."""
    if len(sample.box_labels):
        return sorted({int(c) for c in sample.box_labels})
    return sorted({int(c) for c in sample.labels})


def pointing_gt(dataset: Any, sample: Any, c: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The class's GT for the pointing game: COCO the union of its instance masks (``class_mask``), VOC its
    boxes (0-based inclusive); None when every box of the class is "difficult" (TorchRay skips the pair)."""
    if hasattr(dataset, "class_mask"):
        return dataset.class_mask(sample, c)
    sel = np.asarray(sample.box_labels) == c
    if sample.difficult is not None and bool(np.asarray(sample.difficult)[sel].all()):
        return None
    return np.asarray(sample.boxes)[sel]


EVALUATORS = {"boxes": _BoxEvaluator, "masks": _MaskEvaluator, "dense": _DenseEvaluator,
              "phrases": _PhraseEvaluator, "pointing": _PointingEvaluator}


def evaluator_class(task: str, protocol: Any) -> type:
    """The evaluator of ``task`` under ``protocol`` (a fixed-τ box protocol has its own)."""
    if task == "boxes" and protocol.box_scorer == "fixed-box":
        return _FixedBoxEvaluator
    return EVALUATORS[task]


def protocol_harness(hcfg: dict, protocol: Any) -> dict:
    """The harness settings with the protocol's map size, τ grid and δs filled in (what the evaluators read)."""
    return {**hcfg, "eval_size": protocol.map_size, "cam_curve_interval": protocol.interval,
            "iou_thresholds": list(protocol.iou_thresholds),
            "miou_bg_thresholds": list(protocol.bg_thresholds) if protocol.bg_thresholds else None}


def _resize_mask_pair(pair: tuple[np.ndarray, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resize of (foreground, ignore) to size×size (the wsolevaluation mask rule)."""
    import cv2

    fg, ign = pair
    r = lambda m: cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    fg2 = r(fg)
    return fg2, r(ign) & ~fg2


def choose_task(dataset: Any, method: Any) -> str:
    """The evaluation task for (dataset, method): the first dataset task the method can serve."""
    from wsolbench.localizer import Capability

    caps = {c.value if isinstance(c, Capability) else str(c) for c in method.capabilities}
    tasks = [t.value if hasattr(t, "value") else str(t) for t in dataset.tasks]
    order = [t for t in ("boxes", "masks", "dense", "phrases", "pointing") if t in tasks]
    for task in order:
        if EVALUATORS[task].capability in caps:
            return task
    raise HarnessError(f"method {method.registry_name!r} (capabilities: {', '.join(sorted(caps))}) cannot be "
                       f"scored on {dataset.registry_name!r} (tasks: {', '.join(order)})")


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def run(spec: RunSpec) -> RunResult:
    """Execute ``spec`` end to end and return the results (also written under ``spec.out``)."""
    t0 = time.time()
    world, spec = _join_world(spec)  # one process, or one rank of torchrun / accelerate / srun torchrun
    method_name = METHODS.canonical(spec.method)
    dataset_name = DATASETS.canonical(spec.dataset)
    m_over, h_over = split_overrides(spec.overrides)
    hcfg = load_harness_config(h_over)
    dataset_cls = DATASETS.get(dataset_name)
    dataset_key = getattr(dataset_cls, "config_key", "") or dataset_name
    if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():  # a saved directory: its own
        cfg = checkpoint_config(method_name, spec.checkpoint, m_over)  # config, with this run's --set on top
    else:
        cfg = load_method_config(method_name, spec.profile, dataset_key, m_over)
    task, protocol, spec = _task_protocol_splits(spec, dataset_name, dataset_cls, method_name, cfg)
    dataset = _open_dataset(dataset_name, spec.split, spec.data_root, hcfg)
    protocol = _resolve_protocol(protocol, hcfg, cfg, dataset_key)
    if spec.limit is not None:
        dataset = dataset.subset(range(min(spec.limit, len(dataset))))

    resolved = {"method": method_name, "dataset": dataset_name, "split": spec.split, "profile": spec.profile,
                "limit": spec.limit, "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
                "method_config": cfg, "harness": hcfg, "protocol": protocol.name, "train_split": spec.train_split,
                "data_root": _data_root(dataset)}  # two worlds (or copies of a dataset) never share a run
    tiny_zoo = tuple(getattr(METHODS.get(method_name), "tiny_zoo", ()) or ())
    if spec.profile == "tiny" and tiny_zoo:  # a rebuilt zoo is a new run, never a resumed one
        from wsolbench.zoo import zoo_fingerprint

        resolved["zoo"] = zoo_fingerprint(tiny_zoo)
    if spec.amp is not None:  # mixed precision changes the numbers: another run
        resolved["amp"] = spec.amp
    run_id = spec.run_id or _run_id(resolved)
    run_dir = Path(spec.out) / run_id
    if world.is_main:
        _prepare_run_dir(run_dir, resolved, spec.resume)
    barrier()

    _seed(int(hcfg["seed"]))
    method = _build_method(method_name, cfg, dataset, spec, hcfg, run_dir)
    _check_serves(method, task)
    evaluator = evaluator_class(task, protocol)(hcfg, dataset, method, protocol)
    policies = _protocol_policies(protocol, spec, hcfg, method, run_dir, task)
    evaluator.maps_dir = run_dir / MAPS_DIR if hcfg["store_maps"] else None
    t_eval = time.time()
    skipped, per_image = _evaluate(evaluator, dataset, run_dir / "cache", hcfg, _eval_options(spec),
                                   f"{method_name}/{dataset_name}")
    eval_time = time.time() - t_eval
    results = evaluator.compute(_policy_map(policies, evaluator))
    finish_records(run_dir, evaluator, per_image, _policy_map(policies, evaluator))  # every rank its share
    record = {
        "run_id": run_id, "method": method_name, "dataset": dataset_name, "dataset_key": dataset_key,
        "split": spec.split, "profile": spec.profile, "task": task, "n_images": len(dataset) - len(skipped),
        "skipped": {"count": len(skipped), "items": skipped},
        "results": results, "higher_is_better": _higher_is_better(evaluator),
        "threshold_policy": protocol.threshold if protocol.threshold != "fixed" else f"fixed(tau={protocol.tau})",
        "protocol": protocol.as_record(), "protocol_label": protocol.label(), "train_split": spec.train_split,
        "overrides": list(spec.overrides), "synthetic": is_synthetic(dataset_cls),
        "map_preparation": _preparation(), "metric_options": evaluator.options(),
        "eval_size": protocol.map_size, "seed": hcfg["seed"], "limit": spec.limit,
        "versions": _versions(), "git": _git_hash(), "wall_time_s": round(time.time() - t0, 2),
        # trained weights depend on the float summation order: tiny CAM on synthetic-cub gave MaxBoxAcc 52.0
        # with 2 threads and 47.0 with 1, so a run records what it ran with
        "device": spec.device, "torch_threads": _torch_threads(),
        "checkpoint_load": load_record(method),  # what a --checkpoint FILE gave the model (LoadReport)
        "eval_time_s": round(eval_time, 3), "eval_images_per_s": round(len(dataset) / max(eval_time, 1e-9), 2),
        "parallel": describe_parallel(world, workers=_eval_options(spec).workers, amp=spec.amp,
                                      trained=training_mode(get_method_class(method_name), world)
                                      if get_method_class(method_name).needs_training and spec.checkpoint is None
                                      else None),
    }
    if world.is_main:  # every rank holds the same merged results; one writes them
        write_json(run_dir / "metrics.json", record)
    barrier()
    return RunResult(run_dir=run_dir, results=results, record=record)


def _task_protocol_splits(spec: RunSpec, dataset_name: str, dataset_cls: Any, method_name: str,
                          cfg: dict) -> tuple[str, Any, RunSpec]:
    """(task, protocol, spec with its splits filled in): ``--protocol`` chooses the task among the dataset's,
    else the first task the method can serve names the protocol in the method config (else the task default).
    Splits: ``--split`` / ``--train-split``, else the protocol's for this real dataset, else the dataset's."""
    from dataclasses import replace

    from .protocols import ProtocolError, choose_task_for, configured_protocol, get_protocol

    method_cls = get_method_class(method_name)
    try:
        if spec.protocol is not None:
            protocol = get_protocol(spec.protocol)
            tasks = [t.value if hasattr(t, "value") else str(t) for t in dataset_cls.tasks]
            task = choose_task_for(protocol, tasks, lambda t: _serves(method_cls, t))
        else:
            task = choose_task(dataset_cls, method_cls)
            protocol = get_protocol(configured_protocol(cfg, task))
            if task not in protocol.tasks:
                raise ProtocolError(f"method config protocol.{task} = {protocol.name!r} scores "
                                    f"{', '.join(protocol.tasks)}, not {task}: fix the config or pass --protocol")
    except ProtocolError as exc:
        raise HarnessError(str(exc)) from exc
    paper = protocol.split_for(dataset_name)
    split = spec.split or (paper[1] if paper else dataset_cls.eval_split)
    train_split = spec.train_split or (paper[0] if paper else "train")
    return task, protocol, replace(spec, split=split, train_split=train_split)


def _resolve_protocol(protocol: Any, hcfg: dict, cfg: dict, dataset_key: str) -> Any:
    from .protocols import ProtocolError, resolve

    try:
        return resolve(protocol, hcfg, cfg, dataset_key)
    except ProtocolError as exc:
        raise HarnessError(str(exc)) from exc


def _serves(method: Any, task: str) -> bool:
    from wsolbench.localizer import Capability

    caps = {c.value if isinstance(c, Capability) else str(c) for c in method.capabilities}
    return EVALUATORS[task].capability in caps


def _check_serves(method: Any, task: str) -> None:
    if not _serves(method, task):
        raise HarnessError(f"method {method.registry_name!r} as configured cannot serve the {task!r} task "
                           f"(it needs the {EVALUATORS[task].capability!r} capability)")


def is_synthetic(dataset_cls: Any) -> bool:
    """Whether a dataset is the synthetic world (its rows never share a table with real-dataset paper rows)."""
    return bool(getattr(dataset_cls, "synthetic_format", None)) or \
        str(getattr(dataset_cls, "registry_name", "")).startswith("synthetic-")


def _protocol_policies(protocol: Any, spec: RunSpec, hcfg: dict, method: Any, run_dir: Path, task: str) -> Any:
    """The threshold policies the protocol asks for (None: the metrics' oracle / their own rule)."""
    from wsolbench.metrics import ThresholdPolicy

    if protocol.threshold == "val":
        return _val_policies(spec, hcfg, method, run_dir, task, protocol)
    if protocol.threshold == "fixed" and protocol.box_scorer != "fixed-box":
        return {"*": ThresholdPolicy.fixed(float(protocol.tau))}
    if protocol.threshold == "early-stop":
        return {"*": ThresholdPolicy("early-stop")}
    return None


def _open_dataset(name: str, split: str, root: Path | None, hcfg: dict) -> Any:
    from wsolbench.datasets.base import DatasetError

    try:
        return create_dataset(name, root=root, split=split, on_error=hcfg["on_error"])
    except DatasetError as exc:
        raise HarnessError(str(exc)) from exc


def _run_id(resolved: dict) -> str:
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{resolved['method']}-{resolved['dataset']}-{resolved['split']}-{resolved['profile']}-{digest}"


def _prepare_run_dir(run_dir: Path, resolved: dict, resume: bool) -> None:
    cfg_path = run_dir / "config.yaml"
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    if resume and cfg_path.exists():
        before = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        if before != json.loads(json.dumps(resolved, default=str)):
            raise HarnessError(f"{cfg_path}: the config differs from this invocation's; resume needs the same "
                               "flags (or drop --resume to start over)")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), sort_keys=False))


def checkpoint_config(method: str, checkpoint: Path, overrides: Sequence[str]) -> dict:
    """The config saved with ``checkpoint``, with ``overrides`` (``--set``) merged on top and checked against
    the method's keys: evaluating a trained checkpoint under another inference setting (an ablation)."""
    from .checkpoint import read_saved_meta
    from .config import apply_overrides, method_schema

    try:
        saved = read_saved_meta(Path(checkpoint), method)["config"]
    except (FileNotFoundError, ValueError) as exc:
        raise HarnessError(str(exc)) from exc
    if not overrides:
        return saved
    return apply_overrides(saved, overrides, method_schema(method))


def _data_root(dataset: Any) -> str | None:
    """The dataset's resolved root folder, part of a run's identity."""
    root = getattr(dataset, "root", None)
    return str(Path(root).resolve()) if root else None


def _seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_method(name: str, cfg: dict, dataset: Any, spec: RunSpec, hcfg: dict, run_dir: Path) -> Any:
    cls = get_method_class(name)
    if spec.checkpoint is not None and Path(spec.checkpoint).is_file():  # a foreign file (e.g. the authors')
        try:
            return load_foreign_method(cls, spec.checkpoint, cfg, dataset.class_names, spec.device)
        except CheckpointError as exc:
            raise HarnessError(str(exc)) from exc
    if spec.checkpoint is not None:
        return cls.load(spec.checkpoint, device=spec.device, config=cfg)
    ckpt = run_dir / "checkpoint"
    if cls.needs_training and (ckpt / "model.safetensors").exists():
        return cls.load(ckpt, device=spec.device)  # training finished in an earlier (interrupted) run
    import inspect  # a method that reads every name of a class (GenPromp's meta token) gets the dataset's

    train = _open_dataset(DATASETS.canonical(spec.dataset), spec.train_split, spec.data_root, hcfg) \
        if cls.needs_training else None
    if train is not None and not trains_on(cls, train):
        raise HarnessError(f"{name} trains from one class label per image, and {spec.dataset} {spec.train_split} "
                           f"is multi-label; score it with --checkpoint <a {name} trained on a single-label set>")
    wants = "class_synonyms" in inspect.signature(cls.from_config).parameters
    method = cls.from_config(cfg, class_names=dataset.class_names, device=spec.device,
                             **({"class_synonyms": dataset.class_synonyms} if wants else {}))
    if train is not None:
        val = None
        if "val" in type(train).splits and spec.split != "val":
            try:
                val = _open_dataset(DATASETS.canonical(spec.dataset), "val", spec.data_root, hcfg)
            except HarnessError:
                val = None
        method = fit_and_save(method, train, val, out_dir=run_dir / "train", checkpoint=ckpt,
                              resume=spec.resume, progress=spec.progress)  # data-parallel under torchrun
    return method


def trains_on(method_cls: Any, dataset: Any) -> bool:
    """Whether ``method_cls`` can train on ``dataset``: a single-label trainer cannot use a multi-label set."""
    return not (method_cls.single_label_training and getattr(dataset, "multi_label", False))


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _evaluate(evaluator: _Evaluator, dataset: Any, cache: Path, hcfg: dict, opts: EvalOptions,
              desc: str) -> tuple[list, list]:
    """Score every fixed batch of ``dataset``, reusing finished shards in ``cache``; return the skipped images
    and the per-image records, in dataset order.

    Under several processes each rank scores its share of the batches (``World.share``) into shards; after a
    barrier every rank merges all shards in batch order, so every rank ends with the single-process sums."""
    world = current_world()
    if world.is_main:
        cache.mkdir(parents=True, exist_ok=True)
    barrier()
    spans = list(_batches(len(dataset), int(hcfg["batch_size"])))
    shards = [cache / f"batch-{start:08d}.npz" for start, _ in spans]
    todo = [j for j in world.share(len(spans)) if not shards[j].exists()]
    for k, result in scored_batches(evaluator, dataset, [spans[j] for j in todo], hcfg["on_error"], opts, desc):
        _write_shard(shards[todo[k]], _span_ids(dataset, spans[todo[k]]), *result)
    barrier()  # every shard is on disk; merged from there (a batch's metric objects, which may hold
    # MaxBoxAcc's threads, are not kept: 50k images would be 3k batches of them)
    skipped: list[dict] = []
    records_all: list[dict] = []
    for j, span in enumerate(spans):
        batch_metrics, records, skip = _read_shard(shards[j], _span_ids(dataset, span), evaluator)
        evaluator.absorb(batch_metrics)
        records_all.extend(records)
        skipped.extend(skip)
    return skipped, records_all


def _span_ids(dataset: Any, span: tuple[int, int]) -> list[str]:
    return [dataset[i].image_id for i in range(*span)]


def _join_world(spec: RunSpec) -> tuple[World, RunSpec]:
    """Join the launcher's process group (if any); a bare ``cuda`` device becomes this rank's GPU."""
    from dataclasses import replace

    check_amp(spec.amp)
    try:
        world = init_world(spec.device)
    except DistributedError as exc:
        raise HarnessError(str(exc)) from exc
    return world, replace(spec, device=rank_device(spec.device, world))


def _eval_options(spec: RunSpec) -> EvalOptions:
    workers = spec.workers if spec.workers is not None else default_workers(current_world())
    if workers < 0:
        raise HarnessError(f"--workers must be 0 or more, got {workers}")
    return EvalOptions(workers=workers, amp=spec.amp, device=spec.device,
                       progress=spec.progress and current_world().is_main)


def _json_scalar(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else str(x)


def _write_shard(path: Path, ids: list[str], batch_metrics: dict, records: list, skip: list) -> None:
    arrays: dict[str, np.ndarray] = {}
    for variant, mets in batch_metrics.items():
        for name, m in mets.items():
            for key, value in m.state_dict().items():
                arrays[f"{variant}/{name}/{key}"] = np.asarray(value)
    meta = json.dumps({"ids": ids, "records": records, "skipped": skip}, default=_json_scalar)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)


def _read_shard(path: Path, ids: list[str], evaluator: _Evaluator) -> tuple[dict, list, list]:
    from wsolbench.metrics import MapHealth

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        if meta["ids"] != ids:
            raise HarnessError(f"{path}: cached batch holds other images than the dataset now lists; the data "
                               "changed since the run started — drop --resume to start over")
        grouped: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for key in z.files:
            if key == "__meta__":
                continue
            variant, name, state_key = key.split("/", 2)
            grouped.setdefault(variant, {}).setdefault(name, {})[state_key] = z[key]
    batch: dict[str, dict[str, Any]] = {}
    for variant, by_name in grouped.items():
        mets = evaluator.new_metrics()
        mets["health"] = MapHealth()
        for name, state in by_name.items():
            mets[name].load_state_dict(state)
        batch[variant] = mets
    return batch, meta["records"], meta["skipped"]


def _val_policies(spec: RunSpec, hcfg: dict, method: Any, run_dir: Path, task: str,
                  protocol: Any = None) -> dict[str, Any]:
    """Score the val split with the same method; each variant's τ is then the one best on val."""
    from wsolbench.metrics import ThresholdPolicy

    if spec.split == "val":
        raise HarnessError("threshold_policy 'val' chooses τ on the val split; evaluate a different split")
    val = _open_dataset(DATASETS.canonical(spec.dataset), "val", spec.data_root, hcfg)
    evaluator = EVALUATORS[task](hcfg, val, method, protocol)
    _evaluate(evaluator, val, run_dir / "val_cache", hcfg, _eval_options(spec), "val (choosing τ)")
    return {variant: {name: ThresholdPolicy.from_val(m) for name, m in mets.items() if hasattr(m, "thresholds")}
            for variant, mets in evaluator.metrics.items()}


def _policy_map(policies: dict | None, evaluator: _Evaluator) -> dict | None:
    """Expand the policy spec into {variant: {metric name: policy}} for ``summarize``."""
    if not policies:
        return None
    if "*" in policies:
        return {v: _PerMetric(policies["*"]) for v in evaluator.metrics}
    return {v: _PerMetric(None, p) for v, p in policies.items()}


class _PerMetric:
    """A policy lookup that gives one policy to every metric, or each metric its own (val policy)."""

    def __init__(self, shared: Any, per_name: dict | None = None) -> None:
        self.shared, self.per_name = shared, per_name or {}

    def for_metric(self, name: str) -> Any:
        return self.per_name.get(name, self.shared)


def _p(policy: "_PerMetric | None", name: str) -> Any:
    return policy.for_metric(name) if policy is not None else None


def _higher_is_better(evaluator: _Evaluator) -> dict[str, bool]:
    """Direction of every reported number (all of this field's metrics are higher-is-better)."""
    return {key: True for key in LEADERBOARD_METRICS}


LEADERBOARD_METRICS = ("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls",
                       "top5_cls", "pxap", "piou", "miou", "miou_sweep_best", "pointing_game",
                       "pointing_game_difficult", "bbox_acc")


def _preparation() -> str:
    from wsolbench.metrics import PREPARATION

    return PREPARATION


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("wsolbench", "torch", "torchvision", "numpy", "timm", "open_clip_torch", "diffusers",
                "transformers", "opencv-contrib-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _git_hash() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def spec_dict(spec: RunSpec) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
