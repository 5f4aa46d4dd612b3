"""The typed results of the path-norm and bound API (onnxlip.api) and their JSON form, the CLI's --json contract."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


class JsonResult:
    """A result whose `to_json()` is its fields, in order, as the CLI's --json prints them."""

    def to_json(self) -> dict:
        return jsonable(asdict(self))


@dataclass
class PathNormResult(JsonResult):
    q: float
    path_norm: float | None
    log10_path_norm: float
    device: str
    num_parameters: int
    outputs: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class MetricFields(JsonResult):
    """The fields a metric result and a bound result share, first in both (their JSON key order)."""

    path_metric: float | None
    log10_path_metric: float
    exact: bool
    sign_flips: int
    sign_flip_handling: str
    changed_parameters: int


@dataclass
class PathMetricResult(MetricFields):
    """`path_metric` is the computed value; the certified upper bound on the true metric (or on the hi/lo
    difference when not exact) is path_metric / (1 - rounding_margin), see onnxlip/rounding.py."""

    device: str
    rounding_margin: float = 0.0
    # how it was computed: "difference stream" (theory.md section 3), "subtraction" (well conditioned, see
    # onnxlip/engine.py) or "hi/lo difference stream" (an upper bound, for pairs neither dominates)
    route: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class BoundResult(MetricFields):
    input_bound: float
    bound: float | None
    log10_bound: float
    observed_max_l1_diff: float | None
    samples: int
    device: str
    variant: str = ""
    rounding_margin: float = 0.0
    route: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class VariantError(JsonResult):
    """A variant bound_many(..., errors="report") could not compare with the base (unusable file, another
    architecture, NaN weights, ...): `error` is the message that would have been raised."""

    variant: str
    error: str
    exit_code: int = 2


def jsonable(obj):
    """obj with non-finite floats as JSON can hold them (null, "inf", "-inf") and numpy scalars as Python ones."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("-inf" if obj < 0 else "inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
