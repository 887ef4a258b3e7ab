"""The Metric base class: states are sums, so shards and processes combine exactly.

Every metric keeps its whole state as a small dict of numpy arrays (counts per threshold, histograms),
never the maps themselves, so memory does not grow with the number of images and

    metric over shard A  +  metric over shard B  ==  metric over A ∪ B

holds exactly (the states are integer counts). ``merge`` adds another metric's state, ``sync`` sums the
states across ``torch.distributed`` processes (``all_reduce`` SUM, gloo or NCCL), ``state_dict`` /
``load_state_dict`` save and restore a run.
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from .policy import ThresholdPolicy


class MetricInputError(ValueError):
    """A map or an annotation handed to a metric is unusable; the message names the image."""


class Metric:
    """Base class. Subclasses declare their states with ``_add_state`` in ``__init__`` and implement
    ``update``, ``compute`` and ``options``.

    ``count`` is the number of images (samples) seen. ``higher_is_better`` names, for each numeric key
    that ``compute`` returns, whether a larger value is better.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {}
    primary: ClassVar[str] = ""  # the headline key of compute()

    def __init__(self) -> None:
        self._defaults: dict[str, np.ndarray] = {}
        self._state: dict[str, np.ndarray] = {}
        self._add_state("count", np.zeros((), np.int64))

    # ---------------------------------------------------------------- state handling
    def _add_state(self, name: str, default: np.ndarray) -> None:
        default = np.array(default)  # a copy
        if default.dtype.kind not in "iuf":
            raise TypeError(f"state {name!r} must be numeric, got {default.dtype}")
        self._defaults[name] = default.copy()
        self._state[name] = default.copy()

    @property
    def count(self) -> int:
        """Number of images (samples) accumulated so far."""
        return int(self._state["count"])

    def reset(self) -> None:
        """Forget everything accumulated."""
        for k, v in self._defaults.items():
            self._state[k] = v.copy()

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the state arrays (save with ``np.savez``; restore with ``load_state_dict``)."""
        return {k: v.copy() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict`` from a metric with the same options."""
        missing = sorted(set(self._defaults) - set(state))
        extra = sorted(set(state) - set(self._defaults))
        if missing or extra:
            raise MetricInputError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                                   f"unexpected keys {extra}")
        new = {}
        for k, ref in self._defaults.items():
            arr = np.asarray(state[k])
            if arr.shape != ref.shape:
                raise MetricInputError(f"{type(self).__name__}.load_state_dict: state {k!r} has shape "
                                       f"{arr.shape}, expected {ref.shape} (different options?)")
            new[k] = arr.astype(ref.dtype, copy=True)
        self._state = new

    def merge(self, other: "Metric") -> "Metric":
        """Add ``other``'s accumulated state to this one (in place; returns self). Both must have been
        built with the same options."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.options() != self.options():
            raise MetricInputError(f"cannot merge {type(self).__name__} metrics with different options: "
                                   f"{self.options()} vs {other.options()}")
        for k in self._state:
            self._state[k] = self._state[k] + other._state[k]
        return self

    def __add__(self, other: "Metric") -> "Metric":
        return self.copy().merge(other)

    def copy(self) -> "Metric":
        return copy.deepcopy(self)

    def sync(self, group: Any = None) -> "Metric":
        """A copy whose state is the SUM of this state over all processes of ``group`` (torch.distributed
        ``all_reduce``). ``self`` is left unchanged, so calling ``sync`` twice never double counts.
        Without an initialised process group the copy equals ``self``. Every process must call it."""
        out = self.copy()
        try:
            import torch
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is a dependency
            return out
        if not (dist.is_available() and dist.is_initialized()):
            return out
        world = dist.get_world_size(group)
        if world == 1:
            return out
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, self.options(), group=group)
        if any(g != gathered[0] for g in gathered):
            raise MetricInputError(f"{type(self).__name__}.sync: processes hold metrics with different "
                                   f"options: {gathered}")
        backend = dist.get_backend(group)
        device = torch.device("cpu")
        if str(backend) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        for k in sorted(out._state):
            arr = out._state[k]
            t = torch.from_numpy(np.ascontiguousarray(arr).reshape(-1).copy()).to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            out._state[k] = t.cpu().numpy().reshape(arr.shape).astype(arr.dtype)
        return out

    # ---------------------------------------------------------------- interface
    def update(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self, policy: ThresholdPolicy | None = None) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def options(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts}; count={self.count})"

    # ---------------------------------------------------------------- helpers for subclasses
    def _where(self, i: int) -> str:
        """How an error names the i-th item of the current batch."""
        return f"image {self.count + i} (item {i} of this batch)"

    def _require_data(self) -> None:
        if self.count == 0:
            raise MetricInputError(f"{type(self).__name__}.compute(): no images were accumulated")


# -------------------------------------------------------------------- shared validation helpers
def as_list(x: Any, name: str) -> list:
    """A batch argument as a list of per-image items (a stacked B×... array is split along axis 0)."""
    if x is None:
        raise MetricInputError(f"{name} is required")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return list(x)
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise MetricInputError(f"{name} must be a sequence with one entry per image, got {type(x).__name__}")
    return list(x)


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_lengths(where: str, **lists: list) -> int:
    lengths = {k: len(v) for k, v in lists.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise MetricInputError(f"{where}: batch arguments differ in length: {lengths}")
    return next(iter(lengths.values())) if lengths else 0


def check_score_map(m: Any, where: str, shape: tuple[int, int] | None = None,
                    unit_range: bool = True) -> np.ndarray:
    """A valid score map: 2-D, real, finite, and (``unit_range``) inside [0, 1]."""
    arr = to_numpy(m)
    if arr.ndim != 2:
        raise MetricInputError(f"{where}: score map must be 2-D (H×W), got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise MetricInputError(f"{where}: score map must be float in [0, 1], got dtype {arr.dtype}; "
                               f"prepare raw maps with wsolbench.metrics.prepare_map")
    if arr.size == 0:
        raise MetricInputError(f"{where}: score map is empty (shape {arr.shape})")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise MetricInputError(f"{where}: score map has shape {arr.shape}, expected {tuple(shape)}")
    lo, hi = float(arr.min()), float(arr.max())  # min/max propagate NaN
    if math.isnan(lo) or math.isnan(hi):
        raise MetricInputError(f"{where}: score map contains NaN (prepare_map turns such maps into zeros)")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MetricInputError(f"{where}: score map contains ±inf")
    if unit_range:
        if lo < 0 or hi > 1:
            raise MetricInputError(f"{where}: score map values must lie in [0, 1], got range "
                                   f"[{lo:.6g}, {hi:.6g}]; normalise with wsolbench.metrics.prepare_map")
    return arr


def threshold_grid(interval: float) -> np.ndarray:
    """τ = arange(0, 1, interval), exactly as the reference builds it."""
    interval = float(interval)
    if not (0 < interval < 1) or not math.isfinite(interval):
        raise MetricInputError(f"cam_curve_interval must be in (0, 1), got {interval}")
    return np.arange(0, 1, interval)


def grid_index(grid: np.ndarray, tau: float, what: str) -> int:
    """Index of ``tau`` on a threshold grid (it must be one of the grid's values)."""
    tau = float(tau)
    idx = int(np.argmin(np.abs(grid - tau)))
    tol = 1e-9 + 1e-6 * (abs(float(grid[1] - grid[0])) if len(grid) > 1 else 1.0)
    if abs(float(grid[idx]) - tau) > tol:
        raise MetricInputError(f"{what}: τ={tau} is not on the threshold grid "
                               f"({len(grid)} values from {grid[0]:.6g} to {grid[-1]:.6g}); "
                               f"choose a τ on the grid or a finer cam_curve_interval")
    return idx


def curve_pick(curve: np.ndarray, grid: np.ndarray, policy: ThresholdPolicy, key: str,
               what: str) -> tuple[float, float]:
    """(value, τ) of a per-τ curve under a threshold policy: oracle = max (first τ reaching it)."""
    if policy.kind == "oracle":
        i = int(np.argmax(curve))
    else:
        i = grid_index(grid, policy.tau_for(key), f"{what} ({key})")
    return float(curve[i]), float(grid[i])
