"""Model cost of any method, measured the same way for all (TeD-Loc Table 3: parameters, ms/image).

``profile_method(method, input_size=None, n_images=20, device="cuda")`` →
``{"params_total", "params_inference", "ms_per_image", "peak_mem", ...}``:

* ``params_total``: parameters of every ``torch.nn.Module`` the method holds (frozen ones included),
  each tensor counted once even when shared;
* ``params_inference``: parameters of the modules used by ``localize`` — the method's
  ``inference_modules()`` when it defines one (e.g. TeD-Loc drops the CLIP text tower after training),
  else all of them;
* ``ms_per_image``: mean wall time of ``localize`` on ONE random ``input_size``² RGB image (default: the
  method's own ``input_size``; batch 1, the latency setting of the paper's table), after ``warmup`` untimed
  calls; CUDA is synchronised around each call. ``ms_per_image_std`` and the median are reported too;
* ``peak_mem``: peak CUDA memory allocated during the timed calls, in bytes (None on CPU).

The call made is ``method.localize(images)`` with no labels (how a deployed model runs); methods that can
only answer text queries get ``texts=[["object"]]``. Pass ``localize_kwargs`` to change it.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Iterable

import numpy as np


def _modules_of(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list:
    """nn.Modules reachable from ``obj``'s attributes (and lists/tuples/dicts of them), not inside modules."""
    import torch

    seen = set() if seen is None else seen
    found = []
    if id(obj) in seen or depth > 3:
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, dict):
        values: Iterable = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        values = obj
    elif hasattr(obj, "__dict__") and depth == 0:
        values = vars(obj).values()
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("wsolbench", "methods")):
        values = vars(obj).values()
    else:
        return found
    for v in values:
        found += _modules_of(v, depth + 1, seen)
    return found


def count_parameters(modules: Iterable) -> int:
    """Number of scalar parameters over ``modules``, each parameter tensor counted once."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _random_image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _default_kwargs(method: Any) -> dict:
    caps = {getattr(c, "value", c) for c in getattr(method, "capabilities", ())}
    if caps and caps <= {"phrase"}:
        return {"texts": [["object"]]}
    return {}


def profile_method(method: Any, input_size: int | None = None, n_images: int = 20, device: str | None = None, *,
                   warmup: int = 3, localize_kwargs: dict | None = None, seed: int = 0) -> dict:
    """Parameters, per-image latency and peak memory of ``method`` (a built ``Localizer``); see module doc.

    ``input_size``: side of the square test images (default: the method's ``input_size``, else 224).
    ``device``: where to run (default: the method's own device); the method's modules are moved there
    when it has a ``to(device)``, else its ``device`` attribute must already match.
    """
    import torch

    input_size = int(input_size or getattr(method, "input_size", 224) or 224)
    if n_images < 1:
        raise ValueError(f"n_images must be ≥ 1, got {n_images}")
    device = str(device or getattr(method, "device", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"profile on {device!r} requested but CUDA is not available here")
    if hasattr(method, "to") and callable(method.to):
        method.to(device)
    elif str(getattr(method, "device", device)) != device:
        raise ValueError(f"{type(method).__name__} lives on {getattr(method, 'device', '?')}; build it with "
                         f"device={device!r} to profile there")
    all_modules = _modules_of(method)
    inference = list(method.inference_modules()) if hasattr(method, "inference_modules") else all_modules
    for m in all_modules:
        m.eval()
    kwargs = dict(_default_kwargs(method) if localize_kwargs is None else localize_kwargs)
    images = [_random_image(input_size, seed + i) for i in range(max(n_images, warmup, 1))]
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for i in range(warmup):
        method.localize([images[i % len(images)]], **kwargs)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(n_images):
        sync()
        t0 = time.perf_counter()
        method.localize([images[i]], **kwargs)
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    return {
        "method": getattr(method, "registry_name", "") or type(method).__name__,
        "params_total": count_parameters(all_modules),
        "params_inference": count_parameters(inference),
        "ms_per_image": float(statistics.fmean(times)),
        "ms_per_image_median": float(statistics.median(times)),
        "ms_per_image_std": float(statistics.pstdev(times)) if len(times) > 1 else 0.0,
        "peak_mem": peak,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "input_size": int(input_size),
        "n_images": int(n_images),
        "batch_size": 1,
        "localize_kwargs": {k: v for k, v in kwargs.items()},
    }


def format_profile(result: dict) -> str:
    """One human-readable line, e.g. for the CLI: params in millions, ms/image, peak memory in MiB."""
    mem = "n/a" if result.get("peak_mem") is None else f"{result['peak_mem'] / 2**20:.1f} MiB"
    return (f"{result['method']}: {result['params_inference'] / 1e6:.2f}M params at inference "
            f"({result['params_total'] / 1e6:.2f}M total), {result['ms_per_image']:.2f} ms/image "
            f"(median {result['ms_per_image_median']:.2f}) on {result['device_name']} at "
            f"{result['input_size']}x{result['input_size']}, peak memory {mem}")
