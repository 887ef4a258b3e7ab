"""The contract every method keeps, as one check any method's tests can call (built-in or a plugin's).

:func:`check_localizer` builds a ``Localizer`` subclass from a config and asserts what the harness and a
notebook user rely on: declared class attributes of the right kinds, ``localize`` output shapes and dtypes
for every capability the instance declares (``LocalizerOutput``: maps B×K×h×w float32, ``classes`` aligned
with the queries, logits B×C), the documented ``InputError`` for a capability it lacks, a ``save``/``load``
round trip that gives identical maps, identical maps from two calls, and a one-line ``InputError`` (not a
traceback from deep inside torch) for a wrong class index, an empty batch and a wrong image type. A failed
check raises ``AssertionError`` naming the method and the check.

:func:`micro_config` is the config the check builds with: the method's tiny profile overlaid with the
``configs/<name>_micro.yaml`` its package ships (models small and random enough to build in seconds on a
CPU), or the tiny profile alone when there is none. In a plugin's own tests::

    from wsolbench.testing import check_localizer, micro_config
    from mypkg.method import MyMethod

    def test_contract(tmp_path):
        check_localizer(MyMethod, micro_config("mymethod"), tmp_dir=tmp_path)
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from .localizer import Capability, ImageMeta, InputError, Localizer, LocalizerOutput

CLASS_NAMES = ("star", "heart", "ring")  # three synthetic-world shapes: every method's tokenizer knows them
MICRO_SUFFIX = "_micro.yaml"  # configs/<name>_micro.yaml: the package's overlay on its tiny profile
BOOL_ATTRIBUTES = ("needs_training", "single_label_training", "in_demo")


def micro_config(name: str) -> dict:
    """``name``'s resolved tiny-profile config with its package's ``configs/<name>_micro.yaml`` laid over it (when
    the package ships one); ``{}`` for a method without a schema YAML (a plugin that takes no config)."""
    from .config import load_method_config, method_schema_file

    schema = method_schema_file(name)
    if not schema.is_file():
        return {}
    micro = schema.parent / f"{name}{MICRO_SUFFIX}"
    return load_method_config(name, "tiny", extra_file=micro if micro.is_file() else None)


def sample_images(n: int = 2, size: tuple[int, int] = (48, 40), seed: int = 0) -> list:
    """``n`` seeded random RGB PIL images of ``size`` (W, H), not square so a transposed map shows."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def check_localizer(cls: type[Localizer], config: dict | None = None,
                    class_names: Sequence[str] = CLASS_NAMES, *, tmp_dir: str | Path | None = None,
                    images: Sequence[Any] | None = None, fit_data: Any = None) -> None:
    """Assert the ``Localizer`` contract for ``cls`` built from ``config`` (default :func:`micro_config` of its
    registered name) with ``class_names``; ``tmp_dir`` receives the saved method (default: a temporary dir).
    ``fit_data`` (a dataset of ``Sample``): a method that ``needs_training`` is fitted on it first, so the
    checks (the save/load round trip above all) see a trained state."""
    name = getattr(cls, "registry_name", "") or cls.__name__
    _check_class_attributes(cls, name)
    if config is None:
        config = micro_config(cls.registry_name)
    method = cls.from_config(config, class_names=list(class_names))
    _expect(isinstance(method, cls), name, f"from_config returned {type(method).__name__}, not {cls.__name__}")
    if fit_data is not None and cls.needs_training:
        with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
            method.fit(fit_data, out_dir=tmp, progress=False)
    caps = method.capabilities
    _expect(caps and caps <= cls.capabilities, name, f"instance capabilities {_names(caps)} must be some of the "
                                                     f"class's {_names(cls.capabilities)}")
    from PIL import Image

    images = list(images) if images is not None else sample_images()
    meta = [ImageMeta(f"contract{i}.png", size=im.size if isinstance(im, Image.Image) else None)
            for i, im in enumerate(images)]
    answers = {}
    for cap in Capability:
        if cap in caps:
            answers[cap] = _check_capability(method, name, cap, images, meta, len(class_names))
        else:
            _check_refused(method, name, cap, images, meta)
    first = next(cap for cap in Capability if cap in caps)
    query = _queries(first, images, class_names)[0]
    again = _localize(method, name, f"{first.value} again", images, meta, query)
    _expect_same(answers[first], again, name, f"two identical {first.value} calls (determinism)")
    _check_round_trip(method, name, answers[first], images, meta, query, tmp_dir)
    _check_bad_inputs(method, name, caps, images, meta, len(class_names))


# ---- class attributes ---------------------------------------------------------------------------------------
def _check_class_attributes(cls: type, name: str) -> None:
    _expect(isinstance(cls, type) and issubclass(cls, Localizer), name, "is not a Localizer subclass")
    _expect(bool(cls.registry_name), name, "has no registry_name: register it (@register_method or an entry "
                                           "point in the group wsolbench.methods)")
    caps = cls.capabilities
    _expect(isinstance(caps, frozenset) and caps and all(isinstance(c, Capability) for c in caps), name,
            f"capabilities must be a non-empty frozenset of Capability, got {caps!r}")
    for attr in BOOL_ATTRIBUTES:
        _expect(isinstance(getattr(cls, attr), bool), name, f"{attr} must be a bool, got {getattr(cls, attr)!r}")
    for attr in ("pretrained", "tiny_zoo"):
        value = getattr(cls, attr)
        _expect(isinstance(value, tuple) and all(isinstance(v, str) for v in value), name,
                f"{attr} must be a tuple of names, got {value!r}")
    from . import zoo

    unknown = sorted(set(cls.tiny_zoo) - set(zoo.MODELS))
    _expect(not unknown, name, f"tiny_zoo names {unknown}, not zoo models ({', '.join(zoo.MODELS)})")
    if cls.pretrained:
        from . import weights

        try:
            weights.weights_for_method(cls.registry_name)
        except KeyError as exc:
            raise AssertionError(f"{name}: pretrained names a model the weights catalogue lacks: {exc}") from exc


# ---- one capability -----------------------------------------------------------------------------------------
def _queries(cap: Capability, images: list, class_names: Sequence[str]) -> list[dict]:
    """The keyword arguments that ask for ``cap`` (one query per image, then two), as the harness asks."""
    b, c = len(images), len(class_names)
    if cap is Capability.SINGLE:
        return [{"classes": [i % c for i in range(b)]},
                {"classes": [[i % c, (i + 1) % c] for i in range(b)]}]
    if cap is Capability.PHRASE:
        return [{"texts": [f"a {class_names[i % c]}" for i in range(b)]},
                {"texts": [[f"a {class_names[i % c]}", f"the {class_names[(i + 1) % c]}"] for i in range(b)]}]
    return [{}]  # MULTI: every class's map (classes=None); OPEN: boxes and captions, no text in


def _check_capability(method: Localizer, name: str, cap: Capability, images: list, meta: list,
                      num_classes: int) -> LocalizerOutput:
    """Every query form of ``cap`` answers with a well-formed output; returns the first answer."""
    outputs = []
    for query in _queries(cap, images, method.class_names):
        what = f"{cap.value} {_show(query)}"
        out = _localize(method, name, what, images, meta, query)
        _check_output(out, name, what, len(images), num_classes)
        given = query.get("classes")
        if given is not None:
            want = [[q] if isinstance(q, int) else list(q) for q in given]
            _expect(out.maps.shape[1] == len(want[0]), name, f"{what}: {len(want[0])} queries per image gave "
                                                             f"{out.maps.shape[1]} maps per image")
            _expect(out.classes is None or out.classes == want, name,
                    f"{what}: classes {out.classes} are not the queried {want}")
        if "texts" in query:
            k = 1 if isinstance(query["texts"][0], str) else len(query["texts"][0])
            _expect(out.maps.shape[1] == k, name, f"{what}: {k} texts per image gave {out.maps.shape[1]} maps")
        if cap is Capability.MULTI:
            every = list(range(num_classes))
            _expect(out.classes is not None and all(sorted(c) == every for c in out.classes)
                    or out.classes is None and out.maps.shape[1] == num_classes, name,
                    f"{what}: classes=None must give a map for each of the {num_classes} classes, got "
                    f"{out.maps.shape[1]} maps for classes {out.classes}")
        if cap is Capability.OPEN:
            _check_open(out, name, what, len(images))
        outputs.append(out)
    return outputs[0]


def _check_output(out: Any, name: str, what: str, batch: int, num_classes: int) -> None:
    import torch

    _expect(isinstance(out, LocalizerOutput), name, f"{what}: localize returned {type(out).__name__}, not "
                                                    "LocalizerOutput")
    maps = out.maps
    _expect(isinstance(maps, torch.Tensor) and maps.dtype == torch.float32 and maps.ndim == 4, name,
            f"{what}: maps must be a float32 tensor B×K×h×w, got {_describe(maps)}")
    _expect(maps.shape[0] == batch and min(maps.shape[1:]) > 0, name,
            f"{what}: maps {tuple(maps.shape)} for {batch} images")
    _expect(bool(torch.isfinite(maps).all()), name, f"{what}: maps hold NaN or inf")
    if out.classes is not None:
        _expect(len(out.classes) == batch and all(len(c) == maps.shape[1] for c in out.classes), name,
                f"{what}: classes {out.classes} do not align with maps {tuple(maps.shape)}")
        _expect(all(isinstance(c, int) and 0 <= c < num_classes for cs in out.classes for c in cs), name,
                f"{what}: classes {out.classes} are not ints in [0, {num_classes})")
    if out.logits is not None:
        lg = out.logits
        _expect(isinstance(lg, torch.Tensor) and lg.is_floating_point() and tuple(lg.shape) == (batch, num_classes),
                name, f"{what}: logits must be a float tensor B×C = ({batch}, {num_classes}), got {_describe(lg)}")
        _expect(bool(torch.isfinite(lg).all()), name, f"{what}: logits hold NaN or inf")
    for key, extra in (out.extras or {}).items():
        _expect(isinstance(extra, torch.Tensor) and extra.is_floating_point() and extra.ndim == 4
                and extra.shape[:2] == maps.shape[:2], name,
                f"{what}: extras[{key!r}] must be a float tensor with the maps' B×K {tuple(maps.shape[:2])}, "
                f"got {_describe(extra)}")


def _check_open(out: LocalizerOutput, name: str, what: str, batch: int) -> None:
    import numpy as np

    _expect(out.boxes is not None and out.captions is not None and len(out.boxes) == len(out.captions) == batch,
            name, f"{what}: open localization returns boxes and captions for each of the {batch} images")
    for i, (boxes, captions) in enumerate(zip(out.boxes, out.captions)):
        arr = np.asarray(boxes)
        _expect(arr.ndim == 2 and arr.shape == (len(captions), 4), name,
                f"{what}: image {i} has boxes {arr.shape} for {len(captions)} captions (want N×4)")
        _expect(all(isinstance(c, str) for c in captions), name, f"{what}: image {i}'s captions are not strings")
        _expect(out.maps.shape[1] >= len(captions), name,
                f"{what}: image {i} has {len(captions)} captions but {out.maps.shape[1]} maps")


def _check_refused(method: Localizer, name: str, cap: Capability, images: list, meta: list) -> None:
    """``require`` refuses a capability the method lacks; asking ``localize`` for it (where a query can ask
    for it alone: texts for phrases, classes for single) gives the same one-line ``InputError``."""
    _expect_input_error(lambda: method.require(cap), name, f"require({cap.value!r}) without the capability",
                        cap.value)
    if cap in (Capability.SINGLE, Capability.PHRASE):
        query = _queries(cap, images, method.class_names)[0]
        _expect_input_error(lambda: method.localize(images, meta=meta, **query), name,
                            f"localize({_show(query)}) without the {cap.value!r} capability", cap.value)


# ---- persistence, bad input -------------------------------------------------------------------------------------
def _check_round_trip(method: Localizer, name: str, before: LocalizerOutput, images: list, meta: list,
                      query: dict, tmp_dir: str | Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        path = Path(tmp) / "saved"
        method.save(path)
        loaded = type(method).load(path)
    _expect(type(loaded) is type(method) and list(loaded.class_names) == list(method.class_names), name,
            f"load gave {type(loaded).__name__} with classes {loaded.class_names}")
    after = _localize(loaded, name, "after save/load", images, meta, query)
    _expect_same(before, after, name, "save then load (round trip)")


def _check_bad_inputs(method: Localizer, name: str, caps: frozenset, images: list, meta: list,
                      num_classes: int) -> None:
    """Every capability's query refuses an empty batch and things that are not images; single queries refuse
    class indices outside [0, C) and a query count that is not the batch's."""
    for cap in sorted(caps, key=list(Capability).index):
        query = _queries(cap, images, method.class_names)[0]
        empty = {k: [] for k in query}
        _expect_input_error(lambda: method.localize([], **empty), name, f"{cap.value}: an empty batch")
        for junk in (["bird.jpg"] * len(images), [7] * len(images)):
            _expect_input_error(lambda: method.localize(junk, meta=meta, **query), name,
                                f"{cap.value}: images={junk} (not images)")
    if Capability.SINGLE in caps:
        for bad in ([num_classes] + [0] * (len(images) - 1), [-1] + [0] * (len(images) - 1),
                    [0] * (len(images) + 1)):
            _expect_input_error(lambda: method.localize(images, classes=bad, meta=meta), name,
                                f"classes={bad} ({num_classes} classes, {len(images)} images)")


# ---- helpers ----------------------------------------------------------------------------------------------------
def _localize(method: Localizer, name: str, what: str, images: list, meta: list, query: dict) -> LocalizerOutput:
    try:
        return method.localize(images, meta=meta, **query)
    except Exception as exc:
        raise AssertionError(f"{name}: localize({what}) raised {type(exc).__name__}: {exc}") from exc


def _expect_input_error(call, name: str, what: str, mention: str | None = None) -> None:
    """``call()`` raises ``InputError`` with a one-line message (naming ``mention`` when given)."""
    try:
        call()
    except InputError as exc:
        text = str(exc)
        _expect(text and "\n" not in text, name, f"{what}: the InputError message must be one line, got {text!r}")
        _expect(mention is None or mention in text, name, f"{what}: the message {text!r} does not name {mention!r}")
        return
    except Exception as exc:
        raise AssertionError(f"{name}: {what} raised {type(exc).__name__}: {exc} (want a one-line "
                             "wsolbench.localizer.InputError saying what was received and what is expected)") from exc
    raise AssertionError(f"{name}: {what} was accepted (want wsolbench.localizer.InputError)")


def _expect_same(a: LocalizerOutput, b: LocalizerOutput, name: str, what: str) -> None:
    import torch

    pairs = [("maps", a.maps, b.maps), ("logits", a.logits, b.logits)]
    pairs += [(f"extras[{k!r}]", v, (b.extras or {}).get(k)) for k, v in (a.extras or {}).items()]
    for label, x, y in pairs:
        _expect((x is None) == (y is None), name, f"{what}: {label} present in one answer only")
        if x is not None:
            try:
                torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {what}: {label} differ: {str(exc).splitlines()[1:3]}") from exc
    _expect(a.classes == b.classes and a.captions == b.captions, name, f"{what}: classes or captions differ")


def _expect(ok: Any, name: str, message: str) -> None:
    if not ok:
        raise AssertionError(f"{name}: {message}")


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__}" + (f" {tuple(shape)} {getattr(x, 'dtype', '')}" if shape is not None else "")


def _names(caps: frozenset) -> str:
    return "{" + ", ".join(sorted(c.value for c in caps)) + "}"


def _show(query: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in query.items()) or "no query"
