"""Contractions of one run-time tensor with one constant: Einsum, and MatMul whose constant operand has rank 1 or
3 and more (linear.py imports the 2-D case itself). Each is lowered to ops the IR has (theory.md section 1: all
are identity neurons): transpose / reshape, select (copies of the run-time operand where the constant is batched
along an axis it is broadcast on), reduce (an index of the run-time operand alone is summed), then `dense`
(x @ W) or, where an index is shared by both operands and the output (a batched constant), a 1x1 `conv_transpose`
(W laid out as [shared, contracted, kept]) or `conv` ([shared, kept, contracted]) with one group per batch entry.

The constant stays ONE parameter under its initializer's name: its value is the initializer reshaped in C order
(for x @ W^T the matrix transposed, Param.transposed, as Gemm's transB), so scores and pruning map back entry for
entry. A constant whose axes interleave contracted and kept indices would need a permuted copy: refused."""

from __future__ import annotations

import itertools
import string
from collections import Counter

import numpy as np

from .registry import importer


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


@importer("Einsum")
def import_einsum(node, ctx):
    eq = ctx.attr("equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    where = f"its equation {eq!r}"
    inputs = list(node.input)
    if len(inputs) != 2 or not all(inputs):
        _fail(
            f"{where} has {len(inputs)} operand(s); onnxlip reads an Einsum of one run-time tensor and one "
            "constant (a weight)"
        )
    consts = [ctx.is_const(t) for t in inputs]
    if not any(consts):
        _fail(f"{where} multiplies two run-time tensors: not piecewise linear (one operand must be a weight)")
    if all(consts):
        _fail(f"{where} has no run-time operand")
    ranks = [ctx.const(t).ndim if c else len(ctx.shape(t)) for t, c in zip(inputs, consts)]
    subs, out = parse_equation(eq, ranks)
    w_at = consts.index(True)
    contract(ctx, inputs[1 - w_at], subs[1 - w_at], inputs[w_at], subs[w_at], out, where)


def import_matmul_nd(ctx, x: str, wname: str, w_on_right: bool) -> None:
    """MatMul (numpy's matmul: batch axes broadcast, a 1-D operand promoted and its axis dropped) as a contraction."""
    rx, rw = len(ctx.shape(x)), ctx.const(wname).ndim
    first, second = (rx, rw) if w_on_right else (rw, rx)
    s1, s2 = ("k" if first == 1 else "mk"), ("k" if second == 1 else "kn")
    b1, b2 = max(first - 2, 0), max(second - 2, 0)
    batch = string.ascii_uppercase[: max(b1, b2)]
    s1, s2 = batch[len(batch) - b1 :] + s1, batch[len(batch) - b2 :] + s2
    out = batch + ("m" if first > 1 else "") + ("n" if second > 1 else "")
    xs, ws = (s1, s2) if w_on_right else (s2, s1)
    contract(ctx, x, xs, wname, ws, out, f"as the contraction {s1},{s2}->{out}")


def parse_equation(eq: str, ranks: list[int]) -> tuple[list[str], str]:
    """Operand subscripts and output subscript of an einsum equation, '...' replaced by letters the equation
    does not use (aligned from the right, as numpy broadcasts them); an implicit output is the broadcast axes
    followed by the indices that appear once, in alphabetical order."""
    text = eq.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    ops = lhs.split(",")
    where = f"its equation {eq!r}"
    if len(ops) != len(ranks):
        _fail(f"{where} names {len(ops)} operand(s) for {len(ranks)} input(s)")
    letters = set(lhs.replace("...", "").replace(",", "") + rhs.replace("...", ""))
    if not letters <= set(string.ascii_letters) or "->" in rhs:
        _fail(f"{where} is not an einsum equation onnxlip can read")
    ellipsis = []
    for op, rank in zip(ops, ranks):
        explicit = op.replace("...", "")
        n = rank - len(explicit) if "..." in op else 0
        if op.count("...") > 1 or n < 0 or ("..." not in op and len(explicit) != rank):
            _fail(f"{where} gives the subscripts {op!r} to an operand of rank {rank}")
        ellipsis.append(n)
    fresh = "".join(c for c in string.ascii_letters if c not in letters)[: max(ellipsis)]
    subs = [op.replace("...", fresh[len(fresh) - n :]) for op, n in zip(ops, ellipsis)]
    if arrow:
        if rhs.count("...") > 1:
            _fail(f"{where} is not an einsum equation onnxlip can read")
        return subs, rhs.replace("...", fresh)
    counts = Counter(lhs.replace("...", "").replace(",", ""))
    if any(c.isupper() for c in counts):  # (onnxruntime refuses those; numpy puts upper case first)
        _fail(
            f"{where} has an implicit output and upper-case indices, whose order runtimes do not agree on: write '->'"
        )
    return subs, fresh + "".join(sorted(c for c, k in counts.items() if k == 1))


def _layout(wk: list[str], shared: list[str], contracted: list[str]) -> str | None:
    """'KN' when the constant's axes (size-1 ones left out) are [shared..., contracted..., kept...], 'NK' when
    [shared..., kept..., contracted...] (either, when one block is empty); None otherwise."""
    g = len(shared)
    if set(wk[:g]) != set(shared):
        return None
    rest = ["K" if c in contracted else "N" for c in wk[g:]]
    if rest == sorted(rest):
        return "KN"
    if rest == sorted(rest, reverse=True):
        return "NK"
    return None


def contract(ctx, x: str, xs: str, wname: str, ws: str, os_: str, where: str) -> None:
    """out[os_] = sum over the other indices of x[xs] * W[ws], W the constant `wname`, as IR nodes."""
    out = ctx.node.output[0]
    w = ctx.const(wname)
    x_shape, out_shape = tuple(ctx.shape(x)), tuple(ctx.shape(out))
    for sub, what in ((xs, "run-time operand"), (ws, "constant operand"), (os_, "output")):
        repeated = sorted({c for c in sub if sub.count(c) > 1})
        if repeated:
            _fail(
                f"{where} repeats the index {repeated[0]!r} in its {what} (a diagonal or a trace): not a plain "
                "contraction (Transpose/Reshape + MatMul), which is what onnxlip reads"
            )
    if len(xs) != len(x_shape) or len(ws) != w.ndim or len(os_) != len(out_shape):
        _fail(f"{where} does not match the ranks of its operands and output")
    size: dict[str, int] = {}
    for sub, shape in ((xs, x_shape), (ws, w.shape)):
        for c, d in zip(sub, shape):
            if d != 1 and size.setdefault(c, d) != d:
                _fail(f"{where} gives the index {c!r} the sizes {size[c]} and {d}")
    if any(d != size.get(c, 1) for c, d in zip(os_, out_shape)):
        computed = [size.get(c, 1) for c in os_]
        _fail(
            f"{where} gives the output the shape {computed}, but ONNX shape inference gives {list(out_shape)} (an "
            "index of size 1 in one operand broadcast against the other, which onnxruntime allows and shape "
            "inference does not); export the operands with matching sizes"
        )
    xk = [c for c, d in zip(xs, x_shape) if d != 1]  # size-1 axes take part in nothing: dropped
    wk = [c for c, d in zip(ws, w.shape) if d != 1]
    alone = [c for c in wk if c not in xk and c not in os_]
    if alone:
        _fail(
            f"{where} sums its constant operand {wname!r} over the index {alone[0]!r} alone (the run-time operand "
            "does not have it): fold that sum into the weight"
        )
    shared = [c for c in wk if c in xk and c in os_]
    contracted = [c for c in wk if c in xk and c not in os_]
    layout = _layout(wk, shared, contracted)
    grow: list[str] = []
    if layout is None:  # kept axes of W in front, which x is broadcast along: copy x along them, a batch
        lead = list(itertools.takewhile(lambda c: c in os_ and c not in contracted, wk))
        grow = [c for c in lead if c not in xk]
        if grow:
            shared = lead
            layout = _layout(wk, shared, contracted)
    if layout is None:
        _fail(
            f"{where}: the axes of its constant operand {wname!r} ({ws}) interleave the contracted indices with "
            "the others; onnxlip keeps a weight in its file's layout and needs its axes in blocks: [indices shared "
            "with the run-time operand and the output], then the contracted ones and the kept ones (or the kept "
            "ones and the contracted ones): transpose the initializer in the file"
        )
    shared = wk[: len(shared)]
    kept_w = [c for c in wk if c not in shared and c not in contracted]
    summed_x = [c for c in xk if c not in wk and c not in os_]
    kept_x = [c for c in xk if c not in wk and c in os_]

    def flat(letters):
        return int(np.prod([size[c] for c in letters], dtype=np.int64))

    chain = _Chain(ctx, x, out)
    cur = [c if d != 1 else None for c, d in zip(xs, x_shape)]
    if summed_x:
        axes = [i for i, c in enumerate(cur) if c in summed_x]
        shape = [d for i, d in enumerate(chain.shape) if i not in axes]
        chain.add("reduce", shape, {"axes": axes, "keepdims": 0, "weight": 1.0, "kind": "sum"})
        cur = [c for c in cur if c not in summed_x]
    if grow:
        base = chain.shape
        target = base + tuple(size[c] for c in grow)
        iota = np.arange(int(np.prod(base, dtype=np.int64)), dtype=np.int64).reshape(base + (1,) * len(grow))
        chain.add("select", target, {"index": np.ascontiguousarray(np.broadcast_to(iota, target))})
        cur = cur + grow
    order = shared + contracted + kept_x if shared else kept_x + contracted
    chain.transpose([cur.index(c) for c in order] + [i for i, c in enumerate(cur) if c is None])
    gf, kf, mf, nf = flat(shared), flat(contracted), flat(kept_x), flat(kept_w)
    if shared:  # a batched constant: one group per entry of the shared indices
        chain.reshape((1, gf * kf, mf))
        attrs = {"strides": [1], "pads": [0, 0], "dilations": [1], "group": gf, "kernel_shape": [1]}
        if layout == "KN":
            op, value = "conv_transpose", w.reshape(gf * kf, nf, 1)
            attrs["output_padding"] = [0]
        else:
            op, value = "conv", w.reshape(gf * nf, kf, 1)
        chain.add(op, (1, gf * nf, mf), attrs, {"weight": ctx.param(wname, value, reshaped=True)})
        letters = shared + kept_w + kept_x
    else:
        chain.reshape((mf, kf))
        if layout == "KN":
            weight = ctx.param(wname, w if w.shape == (kf, nf) else w.reshape(kf, nf), reshaped=w.shape != (kf, nf))
        else:  # x @ W^T, as Gemm's transB: the parameter is the transposed view (scores map back with .T)
            weight = ctx.param(wname, w.reshape(nf, kf).T, transposed=True, reshaped=w.shape != (nf, kf))
        chain.add("dense", (mf, nf), {"side": "right"}, {"weight": weight})
        letters = kept_x + kept_w
    chain.reshape(tuple(size[c] for c in letters))
    chain.transpose([letters.index(c) for c in os_ if c in size])
    chain.finish(out_shape)


class _Chain:
    """IR nodes applied one after another to a tensor, emitted by `finish`: the last one writes the ONNX node's
    output, the others fresh tensors. Identity transposes and reshapes are left out, consecutive reshapes merged."""

    def __init__(self, ctx, x: str, out: str):
        self.ctx, self.x, self.out = ctx, x, out
        self.shape = tuple(ctx.shape(x))
        self.steps: list[tuple] = []  # (op, attrs, params, input shape, output shape)

    def add(self, op: str, shape, attrs=None, params=None) -> None:
        self.steps.append((op, dict(attrs or {}), dict(params or {}), self.shape, tuple(int(d) for d in shape)))
        self.shape = self.steps[-1][-1]

    def transpose(self, perm: list[int]) -> None:
        """(Left out, too, when only size-1 axes move: a reshape follows every transpose here.)"""
        moved = [p for p in perm if self.shape[p] != 1]
        if moved != sorted(moved):
            self.add("transpose", [self.shape[p] for p in perm], {"perm": [int(p) for p in perm]})

    def reshape(self, shape) -> None:
        shape = tuple(int(d) for d in shape)
        if self.steps and self.steps[-1][0] == "reshape":  # merge into the previous reshape
            self.shape = self.steps.pop()[3]
        if shape != self.shape:
            self.add("reshape", shape, {"shape": list(shape)})

    def finish(self, shape) -> None:
        self.reshape(shape)
        tensor = self.x
        for k, (op, attrs, params, _, out_shape) in enumerate(self.steps):
            name = self.out if k == len(self.steps) - 1 else f"{self.out}::{op}{len(self.ctx.nodes)}"
            self.ctx.shapes[name] = out_shape
            self.ctx.add(op, [tensor], [name], attrs, params)
            tensor = name
