"""The one interface every WSOL method implements, usable alone in a notebook.

A ``Localizer`` turns images into raw localization maps (B×K×H×W at the method's own resolution) and,
where it can, class logits, boxes and captions. The harness — not the method — resizes and normalises maps
the one documented way (``wsolbench.metrics.prepare_map``), so every method is scored identically.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

if TYPE_CHECKING:  # torch stays out of `import wsolbench`
    import torch
    from PIL import Image


class Capability(str, enum.Enum):
    """What a method can be asked for."""

    SINGLE = "single"  # one map per image for a given (GT-known) or predicted class
    MULTI = "multi"  # a map per class present in the image (VOC/COCO dense localization)
    PHRASE = "phrase"  # a map for a free-text query (phrase grounding)
    OPEN = "open"  # no text in; (box, caption) pairs out ("what is where by looking")


@dataclass
class LocalizerOutput:
    """What ``localize`` returns for a batch of B images.

    ``maps[b, k]`` is the raw map for query k of image b (class ``classes[b][k]`` or text ``texts[b][k]``);
    ``logits`` (B×C) feed Top-1/Top-5 Loc; ``boxes``/``captions`` are per image (``open`` capability).
    """

    maps: "torch.Tensor"  # float32, B×K×H×W, raw (not normalised)
    logits: "torch.Tensor | None" = None  # B×C
    classes: list[list[int]] | None = None  # the class index of each map channel
    boxes: list[np.ndarray] | None = None  # per image, (N, 4) x0,y0,x1,y1 in input-image pixels
    captions: list[list[str]] | None = None  # per image, N captions aligned with ``boxes``
    extras: dict[str, Any] = field(default_factory=dict)  # named variant maps, e.g. {"zp_dot_t": B×K×H×W}


@dataclass(frozen=True)
class ImageMeta:
    """What the harness knows about one input image beyond its pixels (the ``meta`` argument of ``localize``).

    Methods that read per-image side information (e.g. GenPromp's official classifier predictions, keyed by
    image name) use it; the rest ignore it. ``size`` is the original (W, H), before any resize.
    """

    image_id: str
    path: str | None = None
    size: tuple[int, int] | None = None


class InputError(TypeError):
    """An input the interface cannot use; the message says what was received and what is expected."""


class Localizer(abc.ABC):
    """Base class of every method. Subclasses set the class attributes and implement ``localize``.

    Build with ``from_config(cfg)`` (or ``wsolbench.create_method``); train with ``fit``; persist with
    ``save``/``load`` (safetensors + the resolved config, never pickled code).
    """

    registry_name: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    needs_training: ClassVar[bool] = False
    single_label_training: ClassVar[bool] = False  # fit reads one class per image: no multi-label train set
    # fit trains through training.TrainLoop + make_loader: data-parallel under several processes; else rank 0
    # trains alone while the others wait for its checkpoint
    data_parallel_fit: ClassVar[bool] = False
    tiny_zoo: ClassVar[tuple[str, ...]] = ()  # synthetic-world zoo models the tiny profile stands on
    pretrained: ClassVar[tuple[str, ...]] = ()  # wsolbench.weights catalogue names the paper profile may load
    in_demo: ClassVar[bool] = True  # `wsolbench demo` runs its tiny profile (methods that train run last)
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    load_report: Any = None  # a wsolbench.checkpoint.LoadReport after load_foreign (what the file gave)
    maps_at_image_size: bool = False  # True: localize returns each image's maps at its own size, so the harness
    # gives it images of one size per call (MMCST's MCTformer-style native-resolution inference)

    def __init__(self, config: dict | None = None, class_names: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        self.config: dict = self.complete_config(config)
        self.class_names: list[str] = list(class_names or [])
        self.device = device

    @classmethod
    def complete_config(cls, config: dict | None) -> dict:
        """``config`` (resolved, or partial from a notebook or test) completed from the method's schema YAML,
        the one source of defaults, keys and value types checked; a method without one (a plugin without
        ``configs/<name>.yaml``) keeps ``config`` as given."""
        from .config import method_schema_file, with_defaults

        if not cls.registry_name or not method_schema_file(cls.registry_name).is_file():
            return dict(config or {})
        return with_defaults(cls.registry_name, config)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, class_names: Sequence[str] | None = None, device: str = "cpu"):
        """Build from a resolved config dict (see ``wsolbench.config``)."""
        return cls(config=config, class_names=class_names, device=device)

    # ---- the interface ------------------------------------------------------------------------------
    @abc.abstractmethod
    def localize(self, images: Any, classes: Sequence[Any] | None = None,
                 texts: Sequence[Any] | None = None, meta: Sequence[ImageMeta] | None = None) -> LocalizerOutput:
        """Maps for a batch.

        ``classes``: None (the method's own prediction / all classes, see the capability), one int per
        image (K=1), or one equal-length list of ints per image. ``texts``: one string or one equal-length
        list of strings per image (``phrase``). ``meta``: one ``ImageMeta`` per image (the harness always
        passes it); a method that needs it and did not get it raises ``InputError`` naming what is missing.
        """

    def fit(self, train_data: Any, *, val_data: Any = None, out_dir: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> dict:
        """Train on ``train_data`` (a dataset of ``Sample``). Methods that need no training return ``{}``."""
        if self.needs_training:
            raise NotImplementedError(f"{type(self).__name__} declares needs_training but has no fit()")
        return {}

    # ---- persistence --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, "torch.Tensor"]:
        """Tensors that define the trained method (what ``save`` writes)."""
        module = getattr(self, "model", None)
        return {} if module is None else module.state_dict()

    def load_state_dict(self, state: dict[str, "torch.Tensor"]) -> None:
        module = getattr(self, "model", None)
        if module is not None:
            module.load_state_dict(state)

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` + ``config.yaml`` (+ class names) into directory ``path``, atomically."""
        from .checkpoint import save_localizer

        return save_localizer(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", config: dict | None = None):
        """Rebuild a method saved with ``save``; ``config``: use it instead of the saved config."""
        from .checkpoint import load_localizer

        return load_localizer(cls, Path(path), device=device, config=config)

    @classmethod
    def load_foreign(cls, path: str | Path, config: dict, class_names: Sequence[str] | None = None,
                     device: str = "cpu"):
        """Build from ``config`` and load a checkpoint FILE written by other code (e.g. the authors').

        Methods that can read one override this, load with ``wsolbench.checkpoint.load_exact`` (a partial load
        only when ``config['load']['partial']`` names it) and set ``load_report`` (the run records it)."""
        raise NotImplementedError(f"{path}: method {cls.registry_name or cls.__name__!r} cannot read foreign "
                                  "checkpoint files; --checkpoint takes a directory written by Localizer.save")

    # ---- helpers for subclasses ---------------------------------------------------------------------
    def preprocess(self, images: Any, size: int | None = None, mean=None, std=None) -> "torch.Tensor":
        """PIL / numpy HWC uint8 / tensor (B×3×H×W or 3×H×W in [0, 1]) → normalised B×3×S×S float tensor.

        Resizes to ``size`` (default ``input_size``) without cropping, the WSOL evaluation protocol.
        """
        from .imaging import to_batch

        return to_batch(images, size or self.input_size, mean or self.mean, std or self.std).to(self.device)

    def require(self, capability: Capability | str) -> None:
        cap = Capability(capability)
        if cap not in self.capabilities:
            have = ", ".join(sorted(c.value for c in self.capabilities)) or "none"
            raise InputError(f"{self.registry_name or type(self).__name__} cannot do {cap.value!r} "
                             f"localization (capabilities: {have})")

    def class_queries(self, classes: Sequence[Any] | None, batch: int) -> list[list[int]] | None:
        """Normalise the ``classes`` argument to one equal-length list of ints per image (or None), each a
        valid index into ``class_names`` when the method has them."""
        queries = normalize_queries(classes, batch, kind="classes", item_type=(int, np.integer))
        n = len(self.class_names)
        for i, q in enumerate(queries or []) if n else []:
            if any(not 0 <= c < n for c in q):
                raise InputError(f"classes[{i}] = {q}: class indices must lie in 0..{n - 1} "
                                 f"(this {self.registry_name or type(self).__name__} has {n} classes)")
        return queries

    def image_meta(self, meta: Sequence[ImageMeta] | None, batch: int) -> list[ImageMeta] | None:
        """Check the ``meta`` argument: None, or one ``ImageMeta`` per image."""
        if meta is None:
            return None
        meta = list(meta)
        if len(meta) != batch or not all(isinstance(m, ImageMeta) for m in meta):
            raise InputError(f"meta must hold one ImageMeta per image ({batch}), got {len(meta)} "
                             f"of {sorted({type(m).__name__ for m in meta})}")
        return meta

    def text_queries(self, texts: Sequence[Any] | None, batch: int) -> list[list[str]] | None:
        return normalize_queries(texts, batch, kind="texts", item_type=(str,))

    def __repr__(self) -> str:
        caps = ",".join(sorted(c.value for c in self.capabilities))
        return f"{type(self).__name__}(name={self.registry_name!r}, capabilities=[{caps}], classes={len(self.class_names)})"


def normalize_queries(values: Sequence[Any] | None, batch: int, *, kind: str, item_type: tuple) -> list | None:
    """One equal-length list per image from None / one item per image / a list per image."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise InputError(f"{kind} must be a sequence with one entry per image, got {type(values).__name__}")
    if len(values) != batch:
        raise InputError(f"{kind} has {len(values)} entries but the batch has {batch} images")
    out = []
    for i, v in enumerate(values):
        if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
            v = v.tolist()
        items = [v] if isinstance(v, item_type) else list(v)
        if not items or not all(isinstance(x, item_type) for x in items):
            raise InputError(f"{kind}[{i}] must be one or more {item_type[0].__name__} values, got {v!r}")
        out.append([int(x) if kind == "classes" else x for x in items])
    if len({len(o) for o in out}) > 1:
        raise InputError(f"{kind}: every image needs the same number of queries, got {[len(o) for o in out]}")
    return out
