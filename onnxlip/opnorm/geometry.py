"""The normalised geometry of a Conv or ConvTranspose node (ONNX conventions: opnorm/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


@dataclass(frozen=True)
class ConvLayer:
    """One Conv (transpose=False) or ConvTranspose (transpose=True) node with its input spatial size.

    weight: ONNX weight, (C_out, C_in/group, k...) for Conv, (C_in, C_out/group, k...) for ConvTranspose.
    spatial: the node's input spatial size (n_1..n_d). strides/dilations default to 1, pads to 0, output_padding
    (ConvTranspose only) to 0; pads are ONNX [begin_1..begin_d, end_1..end_d].
    """

    weight: np.ndarray
    spatial: Sequence[int]
    strides: Sequence[int] | None = None
    pads: Sequence[int] | None = None
    dilations: Sequence[int] | None = None
    group: int = 1
    transpose: bool = False
    output_padding: Sequence[int] | None = None


class _Geo(NamedTuple):
    """Normalised conv view: the Conv operator whose norm is wanted (for a ConvTranspose: its adjoint Conv)."""

    w: np.ndarray  # (C_out, C_in/group, k...), the node's weight array as given
    n: tuple[int, ...]  # the Conv's input spatial size (for a ConvTranspose: the ConvTranspose's output size)
    out: tuple[int, ...]  # the Conv's output spatial size (for a ConvTranspose: its input size)
    k: tuple[int, ...]
    s: tuple[int, ...]
    pb: tuple[int, ...]
    pe: tuple[int, ...]
    dil: tuple[int, ...]
    group: int
    transpose: bool
    op: tuple[int, ...]  # output_padding of the ConvTranspose (zeros for a Conv)


def _ints(v, d: int, default: int, name: str) -> tuple[int, ...]:
    if v is None:
        return (default,) * d
    t = tuple(int(x) for x in v)
    if len(t) != d:
        raise ValueError(f"{name} has {len(t)} entries, expected {d}")
    return t


def conv_output_shape(spatial, kernel, strides, pads, dilations) -> tuple[int, ...]:
    """ONNX Conv output spatial size: floor((n + pad_begin + pad_end - ((k - 1) * dil + 1)) / s) + 1."""
    d = len(spatial)
    return tuple(
        (spatial[i] + pads[i] + pads[d + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(d)
    )


def _geometry(weight, spatial, strides, pads, dilations, group, transpose, output_padding) -> _Geo:
    w = np.asarray(weight)
    if w.ndim < 3 or w.ndim > 5:
        raise ValueError(f"conv weight must have 3 to 5 dimensions, got shape {w.shape}")
    d = w.ndim - 2
    n_node = _ints(spatial, d, 0, "spatial")
    k = tuple(int(x) for x in w.shape[2:])
    s = _ints(strides, d, 1, "strides")
    dil = _ints(dilations, d, 1, "dilations")
    p = _ints(pads, 2 * d, 0, "pads")
    op = _ints(output_padding, d, 0, "output_padding") if transpose else (0,) * d
    group = int(group)
    if min(n_node) < 1 or min(k) < 1 or min(s) < 1 or min(dil) < 1 or min(p) < 0 or min(op) < 0:
        raise ValueError("spatial sizes, kernel, strides and dilations must be >= 1, pads and output_padding >= 0")
    if group < 1 or w.shape[0] % group:
        raise ValueError(f"group {group} does not divide the weight's first dimension {w.shape[0]}")
    pb, pe = p[:d], p[d:]
    if transpose:
        n = tuple(s[i] * (n_node[i] - 1) + op[i] + (k[i] - 1) * dil[i] + 1 - pb[i] - pe[i] for i in range(d))
        if min(n) < 1:
            raise ValueError(f"ConvTranspose output size {n} is empty")
        out = conv_output_shape(n, k, s, p, dil)
    else:
        n = n_node
        out = conv_output_shape(n, k, s, p, dil)
        if min(out) < 1:
            raise ValueError(f"Conv output size {out} is empty (input {n}, kernel {k}, pads {p}, dilations {dil})")
    return _Geo(w, n, out, k, s, pb, pe, dil, group, bool(transpose), op)
