"""Scoring protocols: the recipe that turns maps into the numbers a paper reported, as named objects.

A number may stand beside a paper's only when dataset, split, metric AND protocol match. Each protocol
is written once here (facts: the "Protocols" section of the reference metrics notes) and recorded in full
in every run's ``metrics.json``. Which protocol a run uses:

    ``wsolbench run --protocol NAME``  >  the method config's ``protocol.<task>``  >  ``TASK_DEFAULTS[task]``

where the task is the evaluation task (``boxes``, ``masks``, ``dense``, ``phrases``, ``pointing``). A
``--protocol`` also chooses the task (e.g. ``torchray-pointing`` scores COCO with the pointing game
instead of mIoU). Harness settings given with ``--set harness.<key>=...`` (``eval_size``,
``cam_curve_interval``, ``iou_thresholds``, ``threshold_policy``, ``tau``, ``miou_bg_thresholds``) change
the protocol's value; the run then records the protocol as overridden and never sits beside a paper row.

Split defaults (``--split`` / ``--train-split`` override them) are per REAL dataset (registry name): the
synthetic sets keep their own held-out split.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

# harness.yaml keys a protocol owns: a non-null value there overrides the protocol's setting
OVERRIDABLE = {"eval_size": "map_size", "cam_curve_interval": "interval", "iou_thresholds": "iou_thresholds",
               "tau": "tau", "miou_bg_thresholds": "bg_thresholds", "threshold_policy": "threshold"}


class ProtocolError(ValueError):
    """An unknown protocol, or one that does not apply to the run; the message says what to choose."""


@dataclass(frozen=True)
class Protocol:
    """One scoring recipe. ``threshold``: ``oracle`` (τ swept over arange(0, 1, interval), best on the
    scored split), ``val`` (τ chosen on the val split), ``fixed`` (one τ), ``early-stop`` (MCTformer's
    background sweep, stopping at the first t that does not improve), ``none`` (argmax / threshold-free)."""

    name: str
    description: str  # one line, for `wsolbench list protocols`
    papers: tuple[str, ...]
    tasks: tuple[str, ...]  # evaluation tasks it scores
    map_size: int | None  # square side the map is resized to; None = each image's own resolution
    interpolation: str  # how the raw map is resized (OpenCV / torch names)
    normalisation: str
    threshold: str
    box_rule: str  # how a thresholded map becomes a box (or what replaces boxes)
    iou: str  # IoU convention and the acceptance test
    gt_boxes: str  # several GT boxes: "max over boxes" or "union box"
    metrics: tuple[str, ...]  # what the run reports under this protocol
    interval: float | None = None  # sweep step (oracle / val)
    iou_thresholds: tuple[float, ...] = ()  # δ in percent
    tau: float | None = None  # fixed τ (None: from the method config key ``tau_key``, else ``tau_by_dataset``)
    tau_key: str | None = None  # method-config key holding the paper's τ (e.g. inference.cam_thr)
    tau_by_dataset: tuple[tuple[str, float], ...] = ()  # (dataset config key, τ) when the method has no τ
    bg_thresholds: tuple[float, float, float] | None = None  # start, stop, step of the mIoU sweep
    tolerance: int | None = None  # pointing game: hit radius in pixels (strict)
    box_scorer: str = "sweep"  # boxes: "sweep" (MaxBoxAcc engine) | "fixed-box" (one box per map at τ)
    gray: str = "uint8"  # fixed-box: the gray image thresholded ("uint8" | "cubehelix")
    gt_known_op: str = ">="  # fixed-box: GT-known test against 0.5 (">=" | ">")
    gt_scaling: str = "int(x*S/W)"  # GT boxes to the map: "int(x*S/W)" (wsolevaluation) | "clamped" (GenPromp)
    splits: tuple[tuple[str, str, str], ...] = ()  # (real dataset name, train split, scored split)
    notes: str = ""
    overridden: tuple[str, ...] = field(default=(), compare=False)  # "key=value" of harness overrides

    def split_for(self, dataset: str) -> tuple[str, str] | None:
        """(train split, scored split) the papers used on registry dataset ``dataset``, if any."""
        for name, train, scored in self.splits:
            if name == dataset:
                return train, scored
        return None

    def as_record(self) -> dict[str, Any]:
        """Everything about the protocol, for ``metrics.json`` (lists instead of tuples)."""
        out = asdict(self)
        out["splits"] = {name: {"train": tr, "scored": sc} for name, tr, sc in self.splits}
        out["tau_by_dataset"] = dict(self.tau_by_dataset)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def label(self) -> str:
        """The name, with a ``*`` when harness overrides changed it (never comparable to a paper row)."""
        return self.name + ("*" if self.overridden else "")


_WSOL_SPLITS = (("cub", "train", "test"), ("ilsvrc", "train", "test"), ("openimages", "train", "test"))

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(
        name="wsolevaluation",
        description="Choe et al. 2020: maps at 224 (bicubic, min-max), τ swept at 0.001 and the best per δ taken "
                    "on the scored split; MaxBoxAcc v1/V2, Top-1/5 Loc, PxAP/pIoU",
        papers=("Choe et al. CVPR 2020 (clovaai/wsolevaluation)", "MMCST CVPR 2023 Table 2 (OpenImages)"),
        tasks=("boxes", "masks"), map_size=224, interpolation="bicubic (cv2.INTER_CUBIC)",
        normalisation="min-max; constant or NaN map -> 0", threshold="oracle", interval=0.001,
        iou_thresholds=(30, 50, 70),
        box_rule="uint8(map*255) > int(tau*max); v1: largest contour, V2: every contour; box clipped to W-1/H-1; "
                 "no contour -> [0,0,0,0]",
        iou="+1 pixel convention, correct if IoU >= delta/100", gt_boxes="max over boxes (GT scaled x*224/W, int())",
        metrics=("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls", "top5_cls",
                 "pxap", "piou"),
        splits=_WSOL_SPLITS,
        notes="interval 0.001 is the library default (its README example uses 0.01); the protocol intends tau "
              "chosen on val (--set harness.threshold_policy=val)"),
    Protocol(
        name="tedloc",
        description="TeD-Loc: the wsolevaluation sweep with maps evaluated at 256x256; MaxBoxAcc (IoU 50), "
                    "Top-1/Top-5 Loc",
        papers=("TeD-Loc Table 1",), tasks=("boxes",), map_size=256, interpolation="bicubic (cv2.INTER_CUBIC)",
        normalisation="min-max; constant or NaN map -> 0", threshold="oracle", interval=0.001,
        iou_thresholds=(30, 50, 70),
        box_rule="as wsolevaluation (largest contour for MaxBoxAcc, every contour for V2)",
        iou="+1 pixel convention, correct if IoU >= delta/100", gt_boxes="max over boxes (GT scaled x*256/W, int())",
        metrics=("maxboxacc", "maxboxacc_v2", "gt_known_loc", "top1_loc", "top5_loc", "top1_cls", "top5_cls"),
        splits=_WSOL_SPLITS,
        notes="interval: the wsolevaluation library default 0.001 (the paper says 'multiple thresholds')"),
    Protocol(
        name="genpromp",
        description="GenPromp official test: map bilinear to 512, min-max, zero <= int(cam_thr*max) of the uint8 "
                    "map (0.23 CUB, 0.25 ILSVRC), largest contour; GT-known IoU >= 0.5, Top-1/5 IoU > 0.5",
        papers=("GenPromp ICCV 2023 Table 1",), tasks=("boxes",), map_size=512,
        interpolation="bilinear (cv2.INTER_LINEAR)", normalisation="min-max (no epsilon; constant map -> 0)",
        threshold="fixed", tau_key="inference.cam_thr", tau_by_dataset=(("cub", 0.23), ("ilsvrc", 0.25)),
        box_scorer="fixed-box", gray="uint8", gt_known_op=">=", gt_scaling="clamped",
        box_rule="uint8(map*255), cv2.THRESH_TOZERO at int(tau*max), RETR_TREE, largest contour by area, box "
                 "(x, y, x+w, y+h) not clipped; no contour -> [0,0,1,1]",
        iou="+1 pixel convention; GT-known correct if IoU >= 0.5, Top-1/Top-5 Loc if IoU > 0.5 and the label is "
            "in the classifier's top-1/top-5",
        gt_boxes="max over boxes (GT scaled int(min(x/W*512, 511)))",
        metrics=("gt_known_loc", "top1_loc", "top5_loc", "top1_cls", "top5_cls"), iou_thresholds=(50,),
        splits=_WSOL_SPLITS[:2],
        notes="tau: the method config's inference.cam_thr, else the official value for the dataset"),
    Protocol(
        name="wwbl-cub",
        description="WWbL Table 2: map at 224, WWbL's cubehelix gray, zero <= int(0.1*max) (fixed), largest "
                    "contour, correct if IoU > 0.5",
        papers=("WWbL NeurIPS 2022 Table 2",), tasks=("boxes",), map_size=224,
        interpolation="bilinear (cv2.INTER_LINEAR)", normalisation="min-max inside WWbL's colour mapping",
        threshold="fixed", tau=0.1, box_scorer="fixed-box", gray="cubehelix", gt_known_op=">",
        box_rule="cubehelix gray (WWbL intensity_to_rgb + RGB2GRAY), cv2.THRESH_TOZERO at int(0.1*max), RETR_TREE, "
                 "largest contour, box (x, y, x+w, y+h) not clipped; no contour -> [0,0,1,1]",
        iou="+1 pixel convention (WWbL calculate_IOU), correct if IoU > 0.5",
        gt_boxes="max over boxes (GT scaled x*224/W, int(): WWbL's CUB loader is not public)",
        metrics=("gt_known_loc",), iou_thresholds=(50,), splits=_WSOL_SPLITS[:1]),
    Protocol(
        name="wwbl-grounding",
        description="WWbL Tables 6-7: phrase map resized bilinearly to the image; pointing = argmax inside the "
                    "entity's UNION box; box accuracy = WWbL's grounding box vs the union box, IoU >= 0.5",
        papers=("WWbL NeurIPS 2022 Tables 6-7 (official test code)",), tasks=("phrases",), map_size=None,
        interpolation="bilinear (cv2.INTER_LINEAR) to the original size", normalisation="min-max (box rule)",
        threshold="none", box_rule="cubehelix gray > int(0.5*max), contour boxes, NMS 0.05, keep conf > 0.5*best, "
                                   "union of the kept boxes",
        iou="pointing: inclusive point-in-box; box accuracy: IoU without +1 >= 0.5",
        gt_boxes="union box of the entity", metrics=("pointing_game", "bbox_acc"),
        splits=(("flickr30k", "train", "test"),)),
    Protocol(
        name="wwbl-open",
        description="WWbL Table 7 'WWbL' rows: no text input; per GT phrase the closest predicted caption's map "
                    "(the method's 'open' variant), scored as wwbl-grounding",
        papers=("WWbL NeurIPS 2022 Table 7",), tasks=("phrases",), map_size=None,
        interpolation="bilinear (cv2.INTER_LINEAR) to the original size", normalisation="min-max (box rule)",
        threshold="none", box_rule="as wwbl-grounding", iou="as wwbl-grounding", gt_boxes="union box of the entity",
        metrics=("pointing_game", "bbox_acc"), splits=(("flickr30k", "train", "test"),),
        notes="the caption matching is the method's (WWbL's 'open' variant); images without a caption cluster "
              "are skipped by the official code"),
    Protocol(
        name="mctformer-miou",
        description="MCTformer evaluation: per-class maps of the GT-present classes at the image's own size, "
                    "background threshold swept from 0 in 0.01 steps, stopping at the first t that does not improve",
        papers=("MMCST CVPR 2023 Table 1", "MCTformer CVPR 2022"), tasks=("dense",), map_size=None,
        interpolation="bilinear (align_corners=False) to the original size",
        normalisation="per-class min-max (+1e-8)", threshold="early-stop", bg_thresholds=(0.0, 1.0, 0.01),
        box_rule="none: argmax over [t, class maps], ties to background",
        iou="per class TP / (T + P - TP) over the split, mean over all classes incl. background",
        gt_boxes="label maps (255 ignored)",
        metrics=("miou", "bg_threshold", "miou_sweep_best", "sweep_best_bg_threshold"),
        splits=(("voc", "train_aug", "train"), ("coco", "train", "train")),
        notes="multi-scale + flip map generation is the method's; the full-sweep best is reported beside the "
              "early-stop value as miou_sweep_best"),
    Protocol(
        name="torchray-pointing",
        description="TorchRay pointing game: first argmax of the map resized (bilinear) to the image, hit within "
                    "15 px of a GT pixel of the class; mean over classes; all-difficult VOC classes skipped",
        papers=("TorchRay benchmark (Fong et al. 2019)", "Zhang et al. 2016 (excitation backprop)"),
        tasks=("pointing",), map_size=None, interpolation="bilinear (torch, align_corners=False) to the original size",
        normalisation="none (argmax)", threshold="none", tolerance=15,
        box_rule="none: the point is the first maximum in row-major order",
        iou="hit if some GT pixel has (x-u)^2 + (y-v)^2 < 15^2",
        gt_boxes="VOC: union of the class's boxes (0-based inclusive); COCO: union of its instance masks",
        metrics=("pointing_game", "pointing_game_difficult"),
        splits=(("voc07", "trainval", "test"), ("coco", "train", "val")),
        notes="the 'difficult' subset needs the EBP flag file beside the data (pointing_game_ebp_*_difficult.txt)"),
)}

# the protocol of a task when neither --protocol nor the method config names one
TASK_DEFAULTS: dict[str, str] = {"boxes": "wsolevaluation", "masks": "wsolevaluation", "dense": "mctformer-miou",
                                 "phrases": "wwbl-grounding", "pointing": "torchray-pointing"}


def get_protocol(name: str) -> Protocol:
    """The built-in protocol ``name``; unknown names list the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)} "
                            f"(`wsolbench list protocols`)") from None


def describe_protocols() -> list[str]:
    """One line per protocol: name, tasks, what it is and which papers use it."""
    return [f"{p.name:<18} [{', '.join(p.tasks)}] {p.description}. Papers: {'; '.join(p.papers)}"
            for p in PROTOCOLS.values()]


def configured_protocol(method_config: Mapping[str, Any] | None, task: str) -> str:
    """The protocol name the method config names for ``task``, else the task's default."""
    table = (method_config or {}).get("protocol") or {}
    if not isinstance(table, Mapping):
        raise ProtocolError(f"method config 'protocol' must map tasks to protocol names, got {table!r}")
    return str(table.get(task) or TASK_DEFAULTS[task])


def choose_task_for(protocol: Protocol, dataset_tasks: list[str], serves: Any) -> str:
    """The first of the protocol's tasks that the dataset has and the method can serve (``serves(task)``)."""
    for task in protocol.tasks:
        if task in dataset_tasks and serves(task):
            return task
    raise ProtocolError(f"protocol {protocol.name!r} scores {', '.join(protocol.tasks)}; this dataset has "
                        f"{', '.join(dataset_tasks) or 'no task'} (or the method cannot serve it): choose another "
                        f"--protocol (`wsolbench list protocols`)")


def resolve(protocol: Protocol, harness_cfg: Mapping[str, Any], method_config: Mapping[str, Any] | None = None,
            dataset_key: str = "") -> Protocol:
    """The protocol a run applies: the fixed τ looked up, and ``harness.<key>`` values that are not null
    applied on top (recorded in ``overridden``)."""
    p = protocol
    notes: list[str] = []
    if p.threshold == "fixed" and p.tau is None:
        official = dict(p.tau_by_dataset).get(dataset_key)
        tau = _dotted(method_config or {}, p.tau_key) if p.tau_key else None
        if tau is not None and official is not None and float(tau) != official:  # not the paper's recipe
            notes.append(f"tau={float(tau)} ({p.tau_key}; the paper's {official})")
        tau = official if tau is None else tau
        if tau is None and harness_cfg.get("tau") is None:
            raise ProtocolError(f"protocol {p.name!r} fixes τ per dataset ({dict(p.tau_by_dataset)}) and has none "
                                f"for {dataset_key!r}: pass --set harness.tau=<τ>")
        p = replace(p, tau=None if tau is None else float(tau))
    changes: dict[str, Any] = {}
    applies = {"map_size": p.map_size is not None, "interval": p.interval is not None, "tau": True,
               "iou_thresholds": p.box_scorer == "sweep" and bool(p.iou_thresholds), "threshold": True,
               "bg_thresholds": p.bg_thresholds is not None}
    for key, attr in OVERRIDABLE.items():
        value = harness_cfg.get(key)
        if value is None:
            continue
        if not applies[attr]:
            raise ProtocolError(f"--set harness.{key}: protocol {p.name!r} has no such setting (`wsolbench list "
                                f"protocols`); drop it or choose another --protocol")
        if attr == "threshold":
            if value not in ("oracle", "val", "fixed"):
                raise ProtocolError(f"--set harness.threshold_policy={value}: choose oracle, val or fixed")
            if p.threshold not in ("oracle", "val", "fixed") and not (p.threshold == "early-stop" and value != "val"):
                raise ProtocolError(f"protocol {p.name!r} has no τ to choose (threshold: {p.threshold}); "
                                    f"drop harness.threshold_policy or choose another --protocol")
            if p.threshold == "fixed" and value != "fixed":
                raise ProtocolError(f"protocol {p.name!r} fixes τ by its rule; for a τ sweep choose --protocol "
                                    f"wsolevaluation")
        value = tuple(value) if isinstance(value, list) else value
        if getattr(p, attr) != value:
            changes[attr] = value
    if changes.get("threshold") == "fixed" and p.tau is None and "tau" not in changes:
        raise ProtocolError("threshold_policy 'fixed' needs a threshold: --set harness.tau=0.23")
    if "tau" in changes and changes.get("threshold", p.threshold) != "fixed":
        raise ProtocolError(f"--set harness.tau applies to a fixed threshold; protocol {p.name!r} uses "
                            f"{p.threshold}: add --set harness.threshold_policy=fixed")
    notes += [f"{k}={v}" for k, v in sorted(changes.items())]
    return replace(p, **changes, overridden=tuple(notes)) if notes else p


def _dotted(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
