"""Checks of the public API's arguments: each wrong type or value is an OnnxlipError naming the option, not a
TypeError or ValueError from deep inside (Python API hunt)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Mapping, Sequence

import numpy as np
import onnx

from .errors import OnnxlipError
from .loading import check_model_arg


def real_arg(name: str, value, *, minimum: float | None = None, finite: bool = True) -> float:
    """A real-number option as a float; OnnxlipError for anything else (None, str, bool, NaN, below `minimum`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OnnxlipError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value) + 0.0  # (-0.0 becomes 0.0: NumPy's uniform(0.0, -0.0) refuses the box)
    except OverflowError:
        raise OnnxlipError(f"{name} must be a finite number, got an integer too large for a float") from None
    if math.isnan(v) or (finite and not math.isfinite(v)) or (minimum is not None and v < minimum):
        limits = " finite" if finite else ""
        limits += f" number >= {minimum:g}" if minimum is not None else " number"
        raise OnnxlipError(f"{name} must be a{limits}, got {value!r}")
    return v


# the longest time budget an option may give (lower_seconds, sample_seconds): a finite but absurd one (1e300 s with a
# huge number of samples) ran forever, as inf did; one day is far beyond any useful search and still ends
MAX_SECONDS = 86400.0


def seconds_arg(name: str, value) -> float:
    """A time budget in seconds: a number from 0 to MAX_SECONDS (one day); OnnxlipError naming the limit for more."""
    v = real_arg(name, value, minimum=0)
    if v > MAX_SECONDS:
        raise OnnxlipError(f"{name} must be at most {MAX_SECONDS:g} seconds (one day), got {value!r}")
    return v


def int_arg(name: str, value, *, minimum: int = 0) -> int:
    """An integer option; OnnxlipError for floats, bools, strings, None and values below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise OnnxlipError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def output_arg(output) -> list[str] | None:
    """The `output` option as a list of tensor names: one name may be given as a plain string (output="logits"
    means ["logits"], not one output per character)."""
    if output is None:
        return None
    if isinstance(output, str):
        return [output]
    if isinstance(output, (bytes, Mapping)) or not isinstance(output, (Sequence, set, frozenset)):
        raise OnnxlipError(f"output must be a tensor name or a list of tensor names, got {output!r}")
    names = list(output)
    for name in names:
        if not isinstance(name, str) or not name:
            raise OnnxlipError(f"output must name tensors by their (non-empty) names, got {name!r}")
    return list(dict.fromkeys(names))  # a tensor named twice is one output (it doubled every path-norm and bound)


def models_arg(variants, what: str = "variants") -> list:
    """A list of models (paths or ModelProtos): a single model where a list is expected is an error, not a
    sequence of characters."""
    if isinstance(variants, (str, bytes, os.PathLike, onnx.ModelProto)) or not isinstance(variants, Sequence):
        raise OnnxlipError(
            f"{what} must be a list of models (paths or onnx.ModelProtos), got {type(variants).__name__}"
            + ("; for one variant use bound(a, b)" if isinstance(variants, (str, os.PathLike, onnx.ModelProto)) else "")
        )
    out = list(variants)
    for v in out:
        check_model_arg(v, "variant")
    return out


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OnnxlipError(f"the seed must be an integer >= 0, got {seed!r}")
