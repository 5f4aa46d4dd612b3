"""Elementwise passes over whole parameter sets in cache-sized blocks.

Comparing a base with a variant and forming the float32 mantissas of |v|, |a| - |b|, max and min, one full-size
float64 temporary per step would cost ResNet-18 ~90 MB each, and fresh memory is slow to fault in (about
2 ms per MB on this project's machines): in blocks the temporaries stay in cache and are reused, and the
results go into caller-owned float32 buffers. Results are bit-identical to mantissas.normalized_power on the
whole array (the same roundings, entry by entry).

Folded weights kept as factors (ir.Param.factors: value = float64(base) * factor, the factor broadcasting along
the leading axis) are read the same way: their mantissas and NaN/Inf checks never form the float64 value."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from .mantissas import BLOCK, ZERO_EXPONENT, normalized_power


class Comparison(NamedTuple):
    changed: int  # entries that differ
    flips: int  # entries whose sign flips (both non-zero)
    dominated: bool  # |b| <= |a| everywhere
    dominating: bool  # |a| <= |b| everywhere
    zeroed: bool  # every entry that differs is zero in b (b prunes a)


UNCHANGED = Comparison(0, 0, True, True, True)


def compare(a: np.ndarray, b: np.ndarray, split: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Comparison:
    """How b differs from a (Comparison). NaN in b counts as changed and neither dominates; the caller refuses it
    when it forms b's values (variants.Change.value).

    `split` = (m, kept, moved), C-contiguous and laid out as a and b: in the same pass, kept = m where a == b
    else 0 and moved = m - kept (exact), as split_kept; complete when the last flag (b prunes a) is True.
    moved may be None: only kept is written (moved = m - kept is then formed if a route needs it)."""
    a, b = a.ravel(), b.ravel()
    fm, fk, fv = (None if x is None else x.reshape(-1) for x in split) if split is not None else (None, None, None)
    changed = flips = 0
    dominated = dominating = zeroed = True
    with np.errstate(invalid="ignore"):  # NaN: no warnings, see above
        for s in range(0, a.size, BLOCK):
            e = s + BLOCK
            x, y = a[s:e], b[s:e]
            differ = x != y
            count = int(np.count_nonzero(differ))
            if zeroed and fm is not None:
                if fv is None:  # the same bits as m - m * differ: +0.0 or m (m >= 0)
                    np.multiply(fm[s:e], np.logical_not(differ), out=fk[s:e])
                else:
                    np.multiply(fm[s:e], differ, out=fv[s:e])
                    np.subtract(fm[s:e], fv[s:e], out=fk[s:e])
            if count == 0:
                continue
            changed += count
            if zeroed:  # so far b only zeroes entries of a: the cheap test first (pruned variants)
                if not np.any(np.logical_and(differ, y, out=differ)):
                    dominating = False  # some x != 0 became 0
                    continue
                zeroed = False
            flips += int(np.count_nonzero(np.sign(x) * np.sign(y) < 0))  # exact: no product of tiny values
            if dominated or dominating:  # once neither can hold, only the flips are left to count
                ax, ay = np.abs(x), np.abs(y)
                dominated = dominated and bool(np.all(ay <= ax))
                dominating = dominating and bool(np.all(ax <= ay))
    return Comparison(changed, flips, dominated, dominating, zeroed and dominated)


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """A forked child inherits the pool but not its threads, and jobs queued there never ran (a multiprocessing
    worker hung after its parent had used the pool): the child makes its own."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def in_threads(fn: Callable, jobs: dict, sizes: dict[str, int]) -> dict:
    """{key: fn(job)} for independent jobs over whole arrays, run by a few threads, the largest first (numpy
    releases the GIL in its loops: two cores form ResNet-18's mantissas in 16 ms instead of 34). Small totals run
    here: a thread hand-off costs more than they do."""
    global _POOL
    keys = sorted(jobs, key=lambda k: -sizes[k])
    nested = threading.current_thread().name.startswith("onnxlip")  # a job waiting on its own pool would hang
    if len(keys) < 2 or sum(sizes.values()) < 4 * BLOCK or nested:
        return {k: fn(jobs[k]) for k in keys}
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="onnxlip")
    return dict(zip(keys, _POOL.map(lambda k: fn(jobs[k]), keys)))


def params_mantissas(params: Iterable, q: float = 1.0) -> dict[str, tuple[np.ndarray, int]]:
    """{p.name: p.mantissas(q)} for ir.Params, formed in threads (in_threads)."""
    params = {p.name: p for p in params}
    return in_threads(lambda p: p.mantissas(q), params, {n: p.size for n, p in params.items()})


def mantissas(
    fn: Callable[..., np.ndarray], arrays: tuple[np.ndarray, ...], exponent: int, out: np.ndarray
) -> tuple[np.ndarray, int]:
    """normalized_power(fn(*arrays), 1.0, exponent), computed block by block into `out` (float32, the arrays'
    shape); fn works on flat blocks and must be elementwise."""
    flat = [x.ravel() for x in arrays]
    dest = out.reshape(-1)
    for s in range(0, dest.size, BLOCK):
        dest[s : s + BLOCK] = normalized_power(fn(*(x[s : s + BLOCK] for x in flat)), 1.0, exponent)[0]
    return out, exponent


def fn_blocks(fn: Callable[..., np.ndarray], arrays: tuple[np.ndarray, ...]) -> Iterator[np.ndarray]:
    """fn(*arrays) block by block (fn elementwise, on flat blocks)."""
    flat = [x.ravel() for x in arrays]
    for s in range(0, flat[0].size, BLOCK):
        yield fn(*(x[s : s + BLOCK] for x in flat))


def split_kept(
    m: np.ndarray, base: np.ndarray, new: np.ndarray, kept: np.ndarray, moved: np.ndarray | None = None
) -> None:
    """kept = m where new == base else 0, moved = m - kept (exact: each entry is m or 0; skipped when None), block
    by block; m, kept and moved C-contiguous and shaped like base and new (which may be transposed views)."""
    if not (base.flags.c_contiguous and new.flags.c_contiguous):  # transposed views: whole arrays, no copies
        # compared in the file's layout (contiguous), read back through the transpose
        equal = (new.T == base.T).T if base.T.flags.c_contiguous and new.T.flags.c_contiguous else new == base
        np.multiply(m, equal, out=kept)
        if moved is not None:
            np.subtract(m, kept, out=moved)
        return
    fm, fb, fn, fk = (x.reshape(-1) for x in (m, base, new, kept))
    for s in range(0, fm.size, BLOCK):
        e = s + BLOCK
        np.multiply(fm[s:e], fn[s:e] == fb[s:e], out=fk[s:e])
        if moved is not None:
            np.subtract(fm[s:e], fk[s:e], out=moved.reshape(-1)[s:e])


def hilo_mantissas(
    a: np.ndarray, b: np.ndarray, exponent: int, outs: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> bool:
    """mantissas of abs_max_of, abs_min_of and abs_gap of (a, b) with one exponent, into outs = (hi, lo, delta),
    in one pass (bit-identical to three `mantissas` calls); False, writing nothing, for exponents outside
    normalized_power's float32 route."""
    if not -100 < exponent < 120:
        return False
    scale = np.float32(2.0**-exponent)
    fa, fb = a.ravel(), b.ravel()
    fh, fl, fd = (x.reshape(-1) for x in outs)
    for s in range(0, fa.size, BLOCK):
        e = s + BLOCK
        ax, ay = np.abs(fa[s:e]), np.abs(fb[s:e])
        hi, lo = np.maximum(ax, ay), np.minimum(ax, ay)
        gap = np.subtract(hi, lo, out=ax) if ax.dtype == hi.dtype else hi - lo  # (a float32 ax would round it)
        for dest, v in ((fh, hi), (fl, lo), (fd, gap)):
            # rounded to float32 as normalized_power does (float64 scaled first); the values are >= 0 (+0.0)
            if v.dtype == np.float64:
                v *= float(scale)
                dest[s:e] = v
            else:
                dest[s:e] = v
                np.multiply(dest[s:e], scale, out=dest[s:e])
    return True


def formed_rows(raw: np.ndarray, factor: np.ndarray | None) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, float64(raw[rows]) * factor[rows]) over blocks of leading-axis rows of about BLOCK entries: the
    values of a factored parameter (variants.Change.value, bit for bit) without forming them whole. Without a
    factor the rows come as stored."""
    if raw.ndim == 0:
        raw = raw.reshape(1)
    # a factor varying along the leading axis is cut with the rows; any other broadcasts whole
    by_row = factor is not None and factor.ndim == raw.ndim and factor.shape[0] == raw.shape[0] > 1
    step = max(1, BLOCK // max(1, raw[0].size))
    for start in range(0, raw.shape[0], step):
        rows = slice(start, start + step)
        if factor is None:
            yield rows, raw[rows]
        else:
            yield rows, np.multiply(raw[rows], factor[rows] if by_row else factor, dtype=np.float64)


def formed_abs_max(raw: np.ndarray, factor: np.ndarray | None) -> float:
    """max |float64(raw) * factor| (abs_max of the formed value, bit for bit) without forming it: rounding is
    monotone, so the largest product comes from the largest |raw| entry each factor entry multiplies; nan when
    raw holds NaN or Inf (the reductions propagate them)."""
    if factor is None:
        low, high = extremes(raw) if raw.size else (0.0, 0.0)
        return max(high, -low) if math.isfinite(low) and math.isfinite(high) else math.nan
    f = np.broadcast_to(factor, np.broadcast_shapes(factor.shape, raw.shape))
    lead = raw.ndim - factor.ndim  # axes the factor does not have, and axes where it is 1: reduced
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(factor.shape) if d == 1)
    high, low = raw.max(axis=axes, keepdims=True), raw.min(axis=axes, keepdims=True)
    if not (np.isfinite(high).all() and np.isfinite(low).all()):
        return math.nan
    cells = np.maximum(high, -low).astype(np.float64)
    f_cells = f[tuple(slice(0, 1) if i in axes else slice(None) for i in range(raw.ndim))]
    return float(np.max(cells * np.abs(f_cells))) if cells.size else 0.0


def abs_max(v: np.ndarray) -> float:
    """max |v| without a full-size temporary (0 for an empty array)."""
    return max(float(v.max()), -float(v.min())) if v.size else 0.0


def exponent_of(top: float) -> int:
    """The e with top < 2**e (frexp's exponent; 0 for 0): the normalisation of normalized_power."""
    return int(np.frexp(top)[1])


def same(x: np.ndarray) -> np.ndarray:
    return x


def abs_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x) - np.abs(y)


def abs_max_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y))


def abs_min_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.minimum(np.abs(x), np.abs(y))


def abs_gap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max(|x|, |y|) - min(|x|, |y|), as the hi/lo route forms it."""
    ax, ay = np.abs(x), np.abs(y)
    return np.maximum(ax, ay) - np.minimum(ax, ay)


# ---- factored weights (ir.Param.factors) ----------------------------------------------------------------
_FLOAT64_MAX = float(np.finfo(np.float64).max)


def extremes(v: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty array in one pass over memory (NaN propagates)."""
    flat = v.reshape(-1) if v.flags.c_contiguous else v
    if flat.ndim != 1:
        return float(v.min()), float(v.max())
    lows, highs = [], []
    for s in range(0, flat.size, BLOCK):
        block = flat[s : s + BLOCK]
        lows.append(block.min())
        highs.append(block.max())  # the block is still in cache
    return float(np.min(lows)), float(np.max(highs))  # np.min and np.max propagate NaN


def finite(v: np.ndarray) -> bool:
    """min and max propagate NaN and show +-Inf: no full-size temporary."""
    if v.size == 0:
        return True
    low, high = extremes(v)
    return math.isfinite(low) and math.isfinite(high)


def factored_finite(base: np.ndarray, factor: np.ndarray) -> bool:
    """Whether float64(base) * factor is free of NaN and Inf. Finite factors whose largest magnitudes multiply
    to a finite number give finite products; otherwise the products are formed and checked."""
    if base.size == 0:
        return True
    low, high = extremes(base)
    if not (math.isfinite(low) and math.isfinite(high) and finite(factor)):
        return False
    if max(high, -low) * abs_max(factor) <= _FLOAT64_MAX:
        return True
    value = base.astype(np.float64)
    with np.errstate(over="ignore"):  # an overflow is what this looks for
        value *= factor
    return finite(value)


def factored_mantissas(base: np.ndarray, factor: np.ndarray) -> tuple[np.ndarray, int] | None:
    """normalized_power(float64(base) * factor, 1.0) without the full float64 product; None when the exponent
    leaves float32's comfortable range (the caller then forms the value and takes the general path)."""
    top = formed_abs_max(base, factor)
    if top == 0.0:
        return np.zeros(base.shape, np.float32), ZERO_EXPONENT
    if not math.isfinite(top) or not -100 < exponent_of(top) < 120:
        return None
    exponent = exponent_of(top)
    out = np.empty(base.shape, np.float32)
    # |float64(base) * factor| * 2**-e, rounded once as normalized_power does: the same products, since scaling
    # by 2**-e is exact in float64 (the exponents here are far from its limits), in one reused buffer per block
    scaled = np.abs(factor).astype(np.float64) * 2.0**-exponent
    raw = base.reshape(1) if base.ndim == 0 else base
    by_row = scaled.ndim == raw.ndim and scaled.shape[0] == raw.shape[0] > 1
    step = max(1, BLOCK // max(1, raw[0].size))
    buf = np.empty((min(step, raw.shape[0]), *raw.shape[1:]), np.float64)
    dest = out.reshape(raw.shape)
    for start in range(0, raw.shape[0], step):
        rows = slice(start, start + step)
        block = buf[: len(range(*rows.indices(raw.shape[0])))]
        np.multiply(raw[rows], scaled[rows] if by_row else scaled, out=block)
        np.abs(block, out=block)
        dest[rows] = block
    return out, exponent
