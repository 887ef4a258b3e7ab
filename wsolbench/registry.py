"""Plugin registries for methods and datasets.

Entries are either classes (registered with a decorator) or lazy ``"module:Attr"`` strings, so that
``import wsolbench`` imports nothing heavy: a method's module (and torch, diffusers, ...) is imported only
when that method is created. Third-party packages add entries through the entry-point groups
``wsolbench.methods`` and ``wsolbench.datasets``.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry name; the message is the whole explanation."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    name: str
    target: Any  # a class/callable, or a "module:attr" string resolved on first use
    aliases: tuple[str, ...] = ()
    source: str = "builtin"

    def resolve(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target


@dataclass
class Registry:
    """A name → class table with aliases, lazy entries, entry points and near-miss suggestions."""

    kind: str  # "method" or "dataset"
    entry_point_group: str
    builtins: dict[str, str] = field(default_factory=dict)  # name -> "module:Class", imported lazily
    # name -> its aliases, known without importing the module (the class's decorator names the same ones:
    # tests/test_cli.py checks), so that resolving any name imports nothing
    builtin_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)
    _plugins_loaded: bool = False

    def register(self, name: str, target: Any, aliases: Iterable[str] = (), source: str = "builtin") -> None:
        """Add ``name`` (and its aliases); a name already taken by another target is an error."""
        key = name.lower()
        existing = self._entries.get(key)
        if existing is not None and not _same_target(existing.target, target):
            raise RegistryError(
                f"{self.kind} name {name!r} is already registered (by {existing.source}: "
                f"{_describe(existing.target)}); choose another name"
            )
        aliases = tuple(a.lower() for a in aliases)
        for alias in aliases:
            owner = self._aliases.get(alias) or (alias if alias in self._entries and alias != key else None)
            if owner is not None and owner != key:
                raise RegistryError(f"{self.kind} alias {alias!r} of {name!r} is already taken by {owner!r}")
        self._entries[key] = _Entry(key, target, aliases, source)
        for alias in aliases:
            self._aliases[alias] = key

    def decorator(self, name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            self.register(name, cls, aliases)
            setattr(cls, "registry_name", name.lower())
            return cls

        return wrap

    def _load_builtins_and_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for name, target in self.builtins.items():
            if name not in self._entries:
                aliases = self.builtin_aliases.get(name, ())
                self._entries[name] = _Entry(name, target, aliases)
                self._aliases.update((alias, name) for alias in aliases)
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            self.register(ep.name, ep.value, source=f"entry point of {ep.dist.name if ep.dist else '?'}")

    def names(self) -> list[str]:
        self._load_builtins_and_plugins()
        return sorted(self._entries)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; unknown names suggest near misses."""
        self._load_builtins_and_plugins()
        key = name.lower()
        if key in self._entries:
            return key
        if key in self._aliases:
            return self._aliases[key]
        # Aliases of entry-point plugins are only known after their import: resolve those (never the builtins,
        # whose aliases are declared above) once before failing.
        for entry in list(self._entries.values()):
            if isinstance(entry.target, str) and entry.source != "builtin":
                try:
                    entry.resolve()
                except ImportError:
                    continue
        if key in self._aliases:
            return self._aliases[key]
        known = sorted(set(self._entries) | set(self._aliases))
        close = list(dict.fromkeys(self._aliases.get(c, c) for c in difflib.get_close_matches(key, known, n=3,
                                                                                              cutoff=0.5)))
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())}; "
                            f"`wsolbench list {self.kind}s`)")

    def get(self, name: str) -> Any:
        return self._entries[self.canonical(name)].resolve()


def _same_target(a: Any, b: Any) -> bool:
    return a is b or _describe(a) == _describe(b)


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return target
    return f"{target.__module__}:{target.__qualname__}"


METHODS = Registry(
    "method",
    "wsolbench.methods",
    builtins={
        "center": "wsolbench.methods.baselines:CenterPrior",
        "random": "wsolbench.methods.baselines:RandomMap",
        "cam": "wsolbench.methods.cam:CAM",
        "tedloc": "wsolbench.methods.tedloc:TeDLoc",
        "wwbl": "wsolbench.methods.wwbl:WWbL",
        "mmcst": "wsolbench.methods.mmcst:MMCST",
        "genpromp": "wsolbench.methods.genpromp:GenPromp",
    },
    builtin_aliases={"center": ("center-gaussian",), "tedloc": ("ted-loc",)},
)
DATASETS = Registry("dataset", "wsolbench.datasets", builtins={
    "cub": "wsolbench.datasets.cub:CUB200",
    "ilsvrc": "wsolbench.datasets.ilsvrc:ILSVRC",
    "openimages": "wsolbench.datasets.openimages:OpenImages30k",
    "voc": "wsolbench.datasets.voc:VOC2012",
    "voc07": "wsolbench.datasets.voc:VOC2007",
    "coco": "wsolbench.datasets.coco:COCO2014",
    "flickr30k": "wsolbench.datasets.flickr30k:Flickr30kEntities",
    "synthetic-cub": "wsolbench.datasets.cub:SyntheticCUB",
    "synthetic-ilsvrc": "wsolbench.datasets.ilsvrc:SyntheticILSVRC",
    "synthetic-openimages": "wsolbench.datasets.openimages:SyntheticOpenImages",
    "synthetic-voc": "wsolbench.datasets.voc:SyntheticVOC",
    "synthetic-coco": "wsolbench.datasets.coco:SyntheticCOCO",
    "synthetic-flickr30k": "wsolbench.datasets.flickr30k:SyntheticFlickr30k",
}, builtin_aliases={"ilsvrc": ("imagenet",), "openimages": ("openimages30k",), "voc": ("voc12", "voc2012"),
                    "voc07": ("voc2007",),
                    "coco": ("coco14", "coco2014"), "flickr30k": ("flickr30k-entities", "flickr30k_entities")})


def register_method(name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
    """Class decorator: make a ``Localizer`` subclass available as ``create_method(name)``."""
    return METHODS.decorator(name, aliases)


def register_dataset(name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
    """Class decorator: make a dataset class available as ``create_dataset(name)``."""
    return DATASETS.decorator(name, aliases)


def list_methods(pattern: str | None = None) -> list[str]:
    """Registered method names, optionally filtered by a shell-style pattern."""
    return _filter(METHODS.names(), pattern)


def list_datasets(pattern: str | None = None) -> list[str]:
    return _filter(DATASETS.names(), pattern)


def _filter(names: list[str], pattern: str | None) -> list[str]:
    import fnmatch

    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_method_class(name: str) -> Any:
    return METHODS.get(name)


def get_dataset_class(name: str) -> Any:
    return DATASETS.get(name)


def create_method(name: str, profile: str = "tiny", *, class_names=None, device: str = "cpu",
                  config: dict | None = None, **overrides: Any):
    """Build a method from its YAML config for ``profile`` with dotted ``overrides`` (``train__lr`` or a dict)."""
    from .config import load_method_config

    cls = get_method_class(name)
    cfg = config if config is not None else load_method_config(METHODS.canonical(name), profile=profile,
                                                               overrides=_flatten_overrides(overrides))
    return cls.from_config(cfg, class_names=class_names, device=device)


def create_dataset(name: str, root=None, split: str = "test", **kwargs: Any):
    """Build a dataset reader for ``split``; ``root`` defaults to the data-root setting."""
    cls = get_dataset_class(name)
    return cls(root=root, split=split, **kwargs)


def _flatten_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in overrides.items()}
