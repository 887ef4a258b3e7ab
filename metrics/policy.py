"""Which score-map threshold τ a thresholded metric is read at.

- ``oracle``: the best τ on the evaluated split itself (what the WSOL protocol's MaxBoxAcc, pIoU and the
  dense-mIoU background sweep report). Optimistic: τ is chosen on the test labels.
- ``fixed``: one τ given up front (e.g. a paper's published threshold).
- ``val``: τ chosen on the validation split (``ThresholdPolicy.from_val``) and applied to the test split.
- ``early-stop``: MCTformer's mIoU rule: sweep τ upward and stop at the first τ that does not improve
  (DenseMIoU only).

Every ``compute()`` result records ``threshold_policy`` and the τ that was used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

KINDS = ("oracle", "fixed", "val", "early-stop")


@dataclass(frozen=True)
class ThresholdPolicy:
    """``kind`` is "oracle", "fixed" or "val". ``tau`` is a float (one τ for every thresholded quantity)
    or a mapping from quantity name to τ (what ``from_val`` builds: e.g. ``{"iou30": 0.21, "iou50":
    0.25, "iou70": 0.31, "top1_loc": 0.25}`` for MaxBoxAcc, ``{"piou": 0.4}`` for PxAP, ``{"miou":
    0.35}`` for DenseMIoU)."""

    kind: str = "oracle"
    tau: float | Mapping[str, float] | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ThresholdPolicy kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in ("oracle", "early-stop"):
            if self.tau is not None:
                raise ValueError(f"an {self.kind} ThresholdPolicy takes no tau (τ is chosen on the split)")
            return
        if self.tau is None:
            raise ValueError(f"a {self.kind!r} ThresholdPolicy needs tau")
        taus = self.tau.values() if isinstance(self.tau, Mapping) else [self.tau]
        for t in taus:
            t = float(t)
            if not math.isfinite(t) or t < 0 or t > 1:
                raise ValueError(f"ThresholdPolicy tau must be in [0, 1], got {t}")
        if isinstance(self.tau, Mapping):
            object.__setattr__(self, "tau", {str(k): float(v) for k, v in self.tau.items()})
        else:
            object.__setattr__(self, "tau", float(self.tau))

    # ---------------------------------------------------------------- constructors
    @classmethod
    def oracle(cls) -> "ThresholdPolicy":
        return cls("oracle")

    @classmethod
    def fixed(cls, tau: float | Mapping[str, float]) -> "ThresholdPolicy":
        return cls("fixed", tau)

    @classmethod
    def from_val(cls, val: Any) -> "ThresholdPolicy":
        """The τs a metric reached on the validation split (under the oracle), to apply to test.

        ``val`` is a metric accumulated on the val split, or the dict its ``compute()`` returned (keys
        ``best_tau_<name>``)."""
        result = val.compute() if hasattr(val, "compute") and hasattr(val, "update") else dict(val)
        if result.get("threshold_policy", "oracle") != "oracle":
            raise ValueError("ThresholdPolicy.from_val needs the val metric computed with the oracle policy")
        taus = {k[len("best_tau_"):]: float(v) for k, v in result.items()
                if k.startswith("best_tau_") and v is not None}
        if not taus:
            raise ValueError("ThresholdPolicy.from_val: the val result holds no best_tau_* entries; is it "
                             "a thresholded metric (MaxBoxAcc, PxAP, DenseMIoU)?")
        name = result.get("metric", "")
        return cls("val", taus, source=f"best τ on the val split{' of ' + name if name else ''} "
                                       f"({result.get('count', '?')} images)")

    # ---------------------------------------------------------------- queries
    def tau_for(self, key: str) -> float:
        """The τ to read quantity ``key`` at (fixed / val policies)."""
        if self.kind in ("oracle", "early-stop"):
            raise ValueError(f"the {self.kind} policy has no preset τ")
        if isinstance(self.tau, Mapping):
            if key not in self.tau:
                raise ValueError(f"ThresholdPolicy({self.kind}) has no τ for {key!r}; it has "
                                 f"{sorted(self.tau)}")
            return float(self.tau[key])
        return float(self.tau)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "oracle":
            return "oracle (τ maximised on the evaluated split)"
        if self.kind == "early-stop":
            return "early-stop (τ swept upward, the first τ that does not improve ends the sweep)"
        if self.kind == "fixed":
            return f"fixed τ={self.tau}"
        return f"val ({self.source or 'τ chosen on the val split'}): τ={self.tau}"

    def as_record(self) -> dict[str, Any]:
        """What a results file records about the policy."""
        tau = dict(self.tau) if isinstance(self.tau, Mapping) else self.tau
        return {"threshold_policy": self.kind, "tau": tau}


ORACLE = ThresholdPolicy("oracle")


def resolve(policy: ThresholdPolicy | str | float | None) -> ThresholdPolicy:
    """None → oracle; "oracle" → oracle; a number → fixed τ; a policy → itself."""
    if policy is None:
        return ORACLE
    if isinstance(policy, ThresholdPolicy):
        return policy
    if isinstance(policy, str):
        if policy == "oracle":
            return ORACLE
        raise ValueError(f"policy {policy!r}: pass ThresholdPolicy('fixed', tau) or ThresholdPolicy.from_val(...)")
    return ThresholdPolicy("fixed", float(policy))
