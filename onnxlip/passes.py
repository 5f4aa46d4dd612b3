"""IR passes, each a small function Graph -> Graph. fold_affine merges a diagonal affine op (BatchNorm,
Mul/Add by a per-channel constant) into the linear op before it: W' = a*W, b' = a*b + c (theory.md
section 3, applied identically to both models of a pair; the path-norm is equal or smaller for q <= 1, and for
q > 1 a conv bias can make it larger: |ab + c|**q > |ab|**q + |c|**q is possible, README "What is supported")."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .ir import Graph, Node, Param

_FOLD_INTO = ("conv", "conv_transpose", "dense", "affine")


def run_passes(graph: Graph, lipschitz: bool = False) -> Graph:
    graph = merge_reshapes(graph)
    graph = fold_zero_pads(graph)
    graph = fold_affine(graph)
    if lipschitz:
        graph = find_max_min(graph)
    return unique_param_names(graph)


def find_max_min(graph: Graph) -> Graph:
    """MaxMin activations become one `group_sort` node, a permutation of each pair, 1-Lipschitz in every norm
    (AutoLip would otherwise count both branches): Split in two halves -> Max and Min of the halves -> Concat,
    and ReduceMax and ReduceMin over an axis of length 2 (keepdims) -> Concat along that axis."""
    producer, consumers = graph.producer(), graph.consumers()
    for concat in graph.nodes:
        if concat.op != "concat" or len(concat.inputs) != 2:
            continue
        pair = [producer.get(t) for t in concat.inputs]
        if all(p is not None and p.op == "reduce" for p in pair):
            kinds = sorted(p.attrs.get("kind") for p in pair)
            source = pair[0].inputs[0]
            axis = concat.attrs["axis"]
            if (
                kinds == ["max", "min"]
                and pair[1].inputs[0] == source
                and all(p.attrs["keepdims"] for p in pair)
                and all(p.attrs["axes"] == [axis] for p in pair)
                and graph.shapes[source][axis] == 2
                and all(len(consumers.get(p.output, [])) == 1 and p.output not in graph.outputs for p in pair)
            ):
                merged = Node(concat.name, "group_sort", [source], list(concat.outputs), {"axis": axis}, {}, "MaxMin")
                drop = {id(pair[0]), id(pair[1])}
                nodes = [merged if n is concat else n for n in graph.nodes if id(n) not in drop]
                return find_max_min(replace(graph, nodes=nodes))
            continue
        if any(p is None or p.op != "max" or len(p.inputs) != 2 for p in pair):
            continue
        if sorted(bool(p.attrs.get("negate")) for p in pair) != [False, True] or set(pair[0].inputs) != set(
            pair[1].inputs
        ):
            continue
        split = producer.get(pair[0].inputs[0])
        if split is None or split.op != "split" or set(split.outputs) != set(pair[0].inputs):
            continue
        if split.attrs["axis"] != concat.attrs["axis"] or len(set(split.attrs["sizes"])) != 1:
            continue
        inner = list(split.outputs) + [p.output for p in pair]
        if any(len(consumers.get(t, [])) != (2 if t in split.outputs else 1) or t in graph.outputs for t in inner):
            continue
        merged = Node(
            concat.name,
            "group_sort",
            [split.inputs[0]],
            list(concat.outputs),
            {"axis": concat.attrs["axis"]},
            {},
            "MaxMin",
        )
        drop = {id(split), id(pair[0]), id(pair[1])}
        nodes = [merged if n is concat else n for n in graph.nodes if id(n) not in drop]
        return find_max_min(replace(graph, nodes=nodes))
    return graph


def unique_param_names(graph: Graph) -> Graph:
    """Give every parameter occurrence its own name (a shared initializer used twice gets 'name#1')."""
    seen: dict[str, int] = {}
    nodes = []
    for node in graph.nodes:
        params = {}
        for role, p in node.params.items():
            count = seen.get(p.name, 0)
            seen[p.name] = count + 1
            params[role] = p if count == 0 else replace(p, name=f"{p.name}#{count}")
        nodes.append(replace(node, params=params))
    return replace(graph, nodes=nodes)


def merge_reshapes(graph: Graph) -> Graph:
    """A reshape of a reshape reads the first one's input; a reshape to its input's own shape (Identity, a Flatten
    of a flat tensor) is dropped, its readers reading its input. A chain of n Identity nodes was n nodes in every
    onnxruntime graph, whose session build grows faster than n (60000: 16 s)."""
    if not any(n.op == "reshape" for n in graph.nodes):
        return graph
    alias: dict[str, str] = {}  # a dropped reshape's output -> the tensor it equals
    source: dict[str, str] = {}  # a kept reshape's output -> the tensor its chain of reshapes starts at
    nodes = []
    for node in graph.nodes:
        inputs = [alias.get(t, t) for t in node.inputs]
        if node.op == "reshape":
            start = source.get(inputs[0], inputs[0])
            if tuple(graph.shapes[start]) == tuple(node.attrs["shape"]) and node.output not in graph.outputs:
                alias[node.output] = start
                continue
            source[node.output] = start
            inputs = [start]
        nodes.append(node if inputs == node.inputs else replace(node, inputs=inputs))
    used = {t for n in nodes for t in n.inputs} | set(graph.outputs)
    nodes = [n for n in nodes if n.op != "reshape" or n.output in used]  # (chains whose readers skip them)
    return replace(graph, nodes=nodes)


def fold_zero_pads(graph: Graph) -> Graph:
    """A zero Pad of the spatial axes read only by a Conv becomes the Conv's own padding: the same map, and the
    form one exporter writes where another writes the Pad (torch's dynamo exporter folds F.pad into the Conv)."""
    consumers = graph.consumers()
    dropped, merged = set(), {}
    for node in graph.nodes:
        if node.op != "pad" or node.attrs.get("mode", "constant") != "constant" or node.output in graph.outputs:
            continue
        users = consumers.get(node.output, [])
        if len(users) != 1 or users[0].op != "conv" or users[0].inputs[0] != node.output or id(users[0]) in merged:
            continue
        conv, pads = users[0], node.attrs["pads"]
        rank = len(pads) // 2
        if any(pads[i] or pads[rank + i] for i in (0, 1)):  # batch or channel padding: not a conv's
            continue
        n, old = rank - 2, conv.attrs["pads"]
        new = [old[i] + pads[2 + i] for i in range(n)] + [old[n + i] + pads[rank + 2 + i] for i in range(n)]
        merged[id(conv)] = replace(conv, inputs=[node.inputs[0], *conv.inputs[1:]], attrs={**conv.attrs, "pads": new})
        dropped.add(id(node))
    if not dropped:
        return graph
    return replace(graph, nodes=[merged.get(id(n), n) for n in graph.nodes if id(n) not in dropped])


def fold_affine(graph: Graph) -> Graph:
    """Fold every foldable affine node into its producer, repeatedly (Conv -> BN -> Mul chains)."""
    while True:
        graph, folded = _fold_affine_pass(graph)
        if not folded:
            return graph


def _fold_affine_pass(graph: Graph) -> tuple[Graph, int]:
    """One sweep in node (topological) order, merging each foldable affine node into the current form of its
    producer: a chain folds within the sweep, in the order the former one-fold-per-rescan loop took (that loop
    rebuilt the producer and consumer maps after every fold: quadratic, 43 s for a 2000-layer chain). A merge
    changes no other tensor's consumers. Returns the graph and the number of folds."""
    producer, consumers = graph.producer(), graph.consumers()
    current: dict[int, Node] = {}  # id of a node of graph.nodes -> its merged form
    position: dict[int, int] = {}  # id of a merged form -> id of the node whose place it takes
    dropped: set[int] = set()
    for node in graph.nodes:
        if node.op != "affine":
            continue
        t = node.inputs[0]
        src = producer.get(t)
        if src is None or src.op not in _FOLD_INTO or len(consumers.get(t, [])) != 1 or t in graph.outputs:
            continue
        if graph.shapes[node.output] != graph.shapes[t]:
            continue  # the affine broadcasts to a larger shape: not a diagonal map
        merged = _merge(src, node, graph.shapes[t])
        if merged is None:
            continue
        key = position.get(id(src), id(src))
        current[key], position[id(merged)] = merged, key
        dropped.add(id(node))
        del producer[t]
        for out in merged.outputs:
            producer[out] = merged
    if not dropped:
        return graph, 0
    return replace(graph, nodes=[current.get(id(n), n) for n in graph.nodes if id(n) not in dropped]), len(dropped)


def _channel_vector(arr: np.ndarray | None, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """arr as a length-`channels` vector if it varies only along `axis` of a rank-`rank` tensor."""
    if arr is None:
        return None
    if arr.ndim > rank:
        return None
    full = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis) or full.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)


def _merge(src: Node, aff: Node, shape: tuple[int, ...]) -> Node | None:
    scale_p, bias_p = aff.params.get("scale"), aff.params.get("bias")
    rank = len(shape)
    if src.op == "affine":  # elementwise composition, any broadcasting
        s1 = src.params["scale"].value if "scale" in src.params else 1.0
        b1 = src.params["bias"].value if "bias" in src.params else 0.0
        s2 = scale_p.value if scale_p else 1.0
        b2 = bias_p.value if bias_p else 0.0
        params = {}
        if "scale" in src.params or scale_p:
            base = src.params.get("scale") or scale_p
            params["scale"] = _derived(base, np.asarray(s1 * s2), [src.params.get("scale"), scale_p])
        if "bias" in src.params or bias_p:
            base = src.params.get("bias") or bias_p
            params["bias"] = _derived(base, np.asarray(b1 * s2 + b2), [src.params.get("bias"), scale_p, bias_p])
        return replace(src, outputs=list(aff.outputs), params=params)
    axis = {"conv": 1, "conv_transpose": 1}.get(src.op)
    if src.op == "dense":
        axis = rank - 1 if src.attrs.get("side", "right") == "right" else rank - 2
    channels = shape[axis]
    s = _channel_vector(scale_p.value, rank, axis, channels) if scale_p else np.ones(channels)
    c = _channel_vector(bias_p.value, rank, axis, channels) if bias_p else np.zeros(channels)
    if s is None or c is None:
        return None
    w = src.params["weight"]
    origin = w.origin if w.factors is None else None  # a weight folded twice is no longer the file's
    wv = w.value  # the weight as it is: a factored weight folded again is formed first
    if src.op == "conv":
        factor = s.reshape((-1,) + (1,) * (wv.ndim - 1))
    elif src.op == "conv_transpose":
        group = src.attrs["group"]
        cin_g, cout_g = wv.shape[0] // group, wv.shape[1]
        factor = s[(np.arange(wv.shape[0])[:, None] // cin_g) * cout_g + np.arange(cout_g)[None, :]]
        factor = factor.reshape(factor.shape + (1,) * (wv.ndim - 2))
    elif src.attrs.get("side", "right") == "right":
        factor = s[None, :]
    else:
        factor = s[:, None]
    old_b = src.params.get("bias")
    if old_b is None:
        b_vec = np.zeros(channels)
    elif src.op in ("conv", "conv_transpose"):
        b_vec = old_b.value.reshape(-1).astype(np.float64)  # Conv's B input: one entry per output channel
    else:
        b_vec = _channel_vector(old_b.value, rank, axis, channels)
        if b_vec is None:
            return None  # a full-shape Gemm bias: keep the affine separate
    # kept as factors: value = float64(wv) * factor, formed only where a float64 copy is needed (ir.Param)
    params = {"weight": _derived(w, None, [w, scale_p], factors=(wv, factor), origin=origin)}
    if old_b is not None or bias_p is not None:
        bias = s * b_vec + c
        if src.op == "dense" and src.attrs.get("side", "right") == "left":
            bias = bias.reshape(channels, 1)  # a dense bias broadcasts as stored: the channels of W @ x are rows
        params["bias"] = _derived(old_b or bias_p, bias, [old_b, scale_p, bias_p])
    return replace(src, outputs=list(aff.outputs), params=params)


def _derived(base: Param, value: np.ndarray | None, parts: list[Param | None], factors=None, origin=None) -> Param:
    sources: list[str] = []
    for p in parts:
        if p is not None:
            sources += [s for s in p.sources if s not in sources]
    value = None if value is None else np.asarray(value, dtype=np.float64)
    size = (value if value is not None else factors[0]).size
    # a folded value keeps its base's layout: the initializer's shape stays with it (ir.Param.file_shape)
    keep = base.file_shape is not None and size == int(np.prod(base.file_shape, dtype=np.int64))
    return Param(base.name, value, tuple(sources), base.transposed, factors, origin, base.file_shape if keep else None)
