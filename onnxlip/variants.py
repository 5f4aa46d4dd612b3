"""Variant files read against an imported base: a sweep's variants (pruned, quantized, fine-tuned copies) usually
differ from the base only in initializer values. Such a file need not be parsed and imported again: its bytes,
with the initializers' raw data left out (the "skeleton"), equal the base file's, so its IR is the base's IR
with the changed initializers' values in place (ir.Param.origin says which parameter reads which initializer
unchanged). Everything else (another layout, a changed BatchNorm, float_data or external storage, a file that
does not parse) takes the full import, which also gives the errors.

The skeletons come from onnxlip/wire.py: every byte outside the initializers' raw_data is compared, so two files
with equal skeletons parse to equal protos up to raw_data. Files are memory-mapped read-only (loading.map_file):
no copy into fresh memory, which is slow to fault in on our machines."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blockwise import BLOCK, finite
from .errors import ModelLoadError, OnnxlipError
from .ir import Graph
from .loading import map_file
from .wire import RawTensor, WireError, array, scan

# a variant's factor (BatchNorm scale) keeps comparisons of float32 (or narrower) entries exact when the products
# stay normal float64 numbers: |factor| in [2**-850, 2**850] (see _factor_ok). Two float32 entries differ by at
# least 2**-24 relative, far above the product's rounding; two float64 entries one ulp apart can round to one
# product, so float64 weights with a factor take the full import
_FACTOR_RANGE = (2.0**-850, 2.0**850)


@dataclass
class Change:
    """A parameter whose initializer the variant changes: `base` and `new` in the file's layout (float32 or
    float64), value = float64(new) (transposed when `transposed`) times `factor` when there is one."""

    base: np.ndarray
    new: np.ndarray
    transposed: bool
    factor: np.ndarray | None

    def layout(self, raw: np.ndarray) -> np.ndarray:
        """A raw array in the parameter's layout (a view)."""
        return raw.T if self.transposed else raw

    def value(self, name: str = "", out: np.ndarray | None = None) -> np.ndarray:
        """The variant's parameter value as the full import would form it (ir.Param.value), a folded one in `out`
        (float64, the parameter's shape) when given; OnnxlipError, as the import's, when it holds NaN or Inf (a
        variant that only zeroes entries of the finite base cannot)."""
        v = self.layout(self.new)
        if self.factor is not None:
            with np.errstate(over="ignore"):  # an overflow is reported below
                v = np.multiply(v, self.factor, out=out, dtype=np.float64)
        if not finite(v):
            raise OnnxlipError(f"parameter(s) {name or 'of the variant'} contain NaN or Inf values")
        return v


class VariantReader:
    """Reads variant files against a base file and its IR: `changes(path)` gives {parameter name: Change} for
    the parameters the variant changes, or None when the file needs the full import."""

    def __init__(self, base_path: str | os.PathLike, graph: Graph, data: np.ndarray | None = None):
        """`data`: the base file's bytes when already read (analyse with keep_proto=False)."""
        self._base = None
        try:
            view = memoryview(data if data is not None else map_file(Path(base_path)))
            self._base = (view, *scan(view))
        except (WireError, OSError, UnicodeDecodeError, MemoryError, ModelLoadError):
            return
        self._params: dict[str, list] = {}  # initializer -> the parameters reading it unchanged
        self._blocked: set[str] = set()  # initializers some parameter uses otherwise (a changed one: full import)
        base_tensors = self._base[2]
        for p in graph.params():
            factor = p.factor
            usable = (
                p.origin is not None
                and _factor_ok(factor)
                and (factor is None or _narrow(p.as_in_file()))
                and self._same_as_imported(p, base_tensors)
            )
            if usable:
                self._params.setdefault(p.origin, []).append((p, factor))
            self._blocked.update(s for s in p.sources if s != p.origin)
            if not usable:
                self._blocked.update(p.sources)
        # an initializer also read as a fixed constant (a PRelu slope, a Max operand) changes more than values
        self._blocked.update(graph.fixed_sources)

    def _same_as_imported(self, p, base_tensors: dict[str, RawTensor]) -> bool:
        """The base file's values of p.origin equal the ones the IR was imported from (a file changed since, or
        a parameter the import altered, must not be taken over)."""
        held, t = p.as_in_file(), base_tensors.get(p.origin)
        if held is None or t is None or held.shape != t.shape or held.dtype != t.dtype:
            return False
        in_file = array(self._base[0], t)
        if held.__array_interface__ == in_file.__array_interface__:  # the very bytes (imported in place)
            return True
        return bool(np.array_equal(held, in_file))

    @property
    def usable(self) -> bool:
        return self._base is not None

    def changes(self, path: str | os.PathLike) -> dict[str, Change] | None:
        """The variant's changed parameters; None when it differs from the base in more than initializer values
        this reader can take over (the caller then imports it in full). The arrays view the file's mapped bytes."""
        if self._base is None:
            return None
        base_view, base_skeleton, base_tensors = self._base
        try:
            view = memoryview(map_file(Path(path)))
            skeleton, tensors = scan(view)
        except (WireError, OSError, UnicodeDecodeError, MemoryError, ModelLoadError):
            return None
        if skeleton != base_skeleton or tensors.keys() != base_tensors.keys():
            return None
        out: dict[str, Change] = {}
        for name, t in tensors.items():
            b = base_tensors[name]
            if _same_bytes(base_view[b.start : b.end], view[t.start : t.end]):
                continue
            if name in self._blocked or name not in self._params:
                return None
            base, new = array(base_view, b), array(view, t)
            for p, factor in self._params[name]:  # NaN and Inf are for the engine to find (Change.value)
                out[p.name] = Change(base, new, p.transposed, factor)
        return out


def _same_bytes(x: memoryview, y: memoryview) -> bool:
    """Byte equality in cache-sized blocks, stopping at the first block that differs."""
    if len(x) != len(y):
        return False
    words = len(x) // 8
    a, b = np.frombuffer(x, np.uint64, words), np.frombuffer(y, np.uint64, words)
    for s in range(0, words, BLOCK):
        if not np.array_equal(a[s : s + BLOCK], b[s : s + BLOCK]):
            return False
    return x[8 * words :] == y[8 * words :]


def _narrow(held: np.ndarray | None) -> bool:
    """Stored in float32 or a narrower float (see _FACTOR_RANGE)."""
    return held is not None and held.dtype.kind == "f" and held.dtype.itemsize <= 4


def _factor_ok(factor: np.ndarray | None) -> bool:
    if factor is None:
        return True
    mags = np.abs(factor)
    return bool(mags.size and np.all(mags >= _FACTOR_RANGE[0]) and np.all(mags <= _FACTOR_RANGE[1]))
