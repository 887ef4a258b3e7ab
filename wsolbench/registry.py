"""Plugin registries for methods and datasets.

Entries are either classes (registered with a decorator) or lazy ``"module:Attr"`` strings, so that
``import wsolbench`` imports nothing heavy: a method's module (and torch, diffusers, ...) is imported only
when that method is created. Third-party packages add entries through the entry-point groups
``wsolbench.methods`` and ``wsolbench.datasets``.

A built-in method registers itself with one ``@register_method(name, aliases=...)`` decorator in its package
``wsolbench/methods/<package>/``. The registry finds those decorators by reading the package's source
(:func:`discover_methods`), not by importing it, so naming, listing or misspelling a method imports no torch.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
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
    home: Path | None = None  # the folder of the module that defines it (its YAML configs are in home/configs)
    declared: dict[str, Any] = field(default_factory=dict)  # literal class attributes read from the source

    def resolve(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, type) and not vars(obj).get("registry_name"):  # an entry point's class: named
                obj.registry_name = self.name  # as the decorator names a built-in (its configs/<name>.yaml)
            self.target = obj
        return self.target


@dataclass
class Registry:
    """A name → class table with aliases, lazy entries, entry points and near-miss suggestions."""

    kind: str  # "method" or "dataset"
    entry_point_group: str
    # name -> "module:Class", imported lazily, and name -> its aliases (known without importing the module)
    builtins: dict[str, str] = field(default_factory=dict)
    builtin_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    discover: Callable[[], list[tuple[str, str, tuple[str, ...], Path, dict]]] | None = None  # lazy builtins
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
        # a built-in's decorator re-registers what discovery found: keep its folder and source-read attributes
        kept = (existing.home, existing.declared) if existing is not None else (None, {})
        self._entries[key] = _Entry(key, target, aliases, source, *kept)
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
        found = [(n, t, self.builtin_aliases.get(n, ()), None, {}) for n, t in self.builtins.items()]
        for name, target, aliases, home, declared in found + (self.discover() if self.discover else []):
            if name not in self._entries:
                self._entries[name] = _Entry(name, target, tuple(aliases), "builtin", home, declared)
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

    def by_class_name(self, class_name: str) -> Any:
        """The registered class whose class name is ``class_name`` (imports only that one), else None."""
        self._load_builtins_and_plugins()
        for entry in self._entries.values():
            if _describe(entry.target).rpartition(":")[2].rpartition(".")[2] == class_name:
                return entry.resolve()
        return None

    def declared(self, name: str, attribute: str) -> Any:
        """A class attribute of ``name`` (e.g. ``pretrained``), read from its source when it is a literal there,
        so that listing every method's weights imports no method; else from the imported class."""
        entry = self._entries[self.canonical(name)]
        if attribute in entry.declared:
            return entry.declared[attribute]
        return getattr(entry.resolve(), attribute)

    def home(self, name: str) -> Path:
        """The folder of the module defining ``name`` (a method's YAML configs live in its ``configs/``)."""
        entry = self._entries[self.canonical(name)]
        if entry.home is None:
            if isinstance(entry.target, str):  # find the module's file without importing the module itself
                spec = importlib.util.find_spec(entry.target.partition(":")[0])
                entry.home = Path(spec.origin).parent if spec and spec.origin else None
            else:
                import inspect

                entry.home = Path(inspect.getfile(entry.target)).parent
        if entry.home is None:
            raise RegistryError(f"cannot locate the module of {self.kind} {name!r} ({_describe(entry.target)})")
        return entry.home


def _same_target(a: Any, b: Any) -> bool:
    return a is b or _describe(a) == _describe(b)


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return target
    return f"{target.__module__}:{target.__qualname__}"


# class attributes a built-in method declares as literals, readable without importing it
DECLARED = ("pretrained", "tiny_zoo", "needs_training", "in_demo")


def discover_methods() -> list[tuple[str, str, tuple[str, ...], Path, dict]]:
    """(name, "module:Class", aliases, folder, declared) of every ``@register_method`` in
    ``wsolbench/methods/*/``, read from the source with :mod:`ast` (no import); the decorator's arguments must
    be literals; ``declared`` holds the class's literal :data:`DECLARED` attributes."""
    spec = importlib.util.find_spec("wsolbench.methods")
    found = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        for package in sorted(p for p in Path(root).iterdir() if (p / "__init__.py").is_file()):
            for path in sorted(package.glob("*.py")):
                module = f"wsolbench.methods.{package.name}" + ("" if path.stem == "__init__" else f".{path.stem}")
                found += [(name, f"{module}:{cls}", aliases, package, declared)
                          for cls, name, aliases, declared in _decorated_classes(path, "register_method")]
    return found


def _decorated_classes(path: Path, decorator: str) -> list[tuple[str, str, tuple[str, ...], dict]]:
    """(class name, registered name, aliases, literal DECLARED attributes) of the top-level classes of ``path``
    decorated ``@decorator(...)``."""
    out = []
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        for dec in getattr(node, "decorator_list", []) if isinstance(node, ast.ClassDef) else []:
            if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == decorator:
                kwargs = {k.arg: ast.literal_eval(k.value) for k in dec.keywords}
                args = [ast.literal_eval(a) for a in dec.args]
                aliases = tuple(a.lower() for a in (args[1] if len(args) > 1 else kwargs.get("aliases", ())))
                declared = _literal_attributes(node, DECLARED)
                if [getattr(b, "id", None) for b in node.bases] == ["Localizer"]:  # the rest is inherited as is
                    from .localizer import Localizer

                    declared = {k: getattr(Localizer, k) for k in DECLARED} | declared
                out.append((node.name, args[0].lower(), aliases, declared))
    return out


def _literal_attributes(node: ast.ClassDef, names: Iterable[str]) -> dict[str, Any]:
    """The class-body assignments ``name = <literal>`` of ``node`` for ``names``."""
    out = {}
    for stmt in node.body:
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else \
            getattr(stmt, "target", None) if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else None
        if isinstance(target, ast.Name) and target.id in names:
            try:
                out[target.id] = ast.literal_eval(stmt.value)
            except ValueError:  # not a literal: read from the class when asked
                pass
    return out


METHODS = Registry("method", "wsolbench.methods", discover=discover_methods)
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
