"""`onnxlip check`: is a model supported, which ops, how many parameters, and every problem found."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from .api import user_batch_notes
from .args import output_arg
from .blockwise import abs_max, formed_rows
from .errors import ModelIssue, UnsupportedModelError, public
from .importer import ImportOptions, import_model
from .loading import ModelLike, load_with_arrays
from .range_guard import min_nonzero_abs
from .results import jsonable


@dataclass
class CheckResult:
    supported: bool
    errors: list[ModelIssue]
    warnings: list[str]
    inputs: dict[str, list]  # analysed: fixed sizes; unsupported: as declared (a dimension's name, or None)
    outputs: list[str]
    num_parameters: int | None  # None where the model is not supported (not analysed)
    ops: dict[str, int]
    hint: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["errors"] = [asdict(e) for e in self.errors]
        d["hint"] = self.hint.removeprefix("hint: ") if self.hint else None  # (the key says it)
        return jsonable(d)


@public
def check(
    model: ModelLike, *, output: Sequence[str] | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> CheckResult:
    """Is the model supported? Which ops, how many parameters, and every problem found."""
    output = output_arg(output)
    proto, arrays, _ = load_with_arrays(model)
    ops = Counter(n.op_type for n in proto.graph.node)
    outputs = list(output) if output else [o.name for o in proto.graph.output]
    try:
        graph = import_model(proto, ImportOptions(outputs=output, input_shapes=input_shapes), arrays)
    except UnsupportedModelError as exc:
        # not analysed: the file's declared inputs (a dimension by its name where it has no size), and no count
        return CheckResult(False, exc.issues, [], _declared_inputs(proto), outputs, None, dict(ops), exc.hint)
    inputs = {k: list(v) for k, v in graph.inputs.items()}
    warnings = list(graph.warnings) + user_batch_notes(graph, input_shapes) + wide_range_warnings(graph)
    return CheckResult(True, [], warnings, inputs, list(graph.outputs), graph.num_parameters, dict(ops))


def _declared_inputs(proto: onnx.ModelProto) -> dict[str, list]:
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for i in proto.graph.input:
        if i.name not in inits:
            dims = i.type.tensor_type.shape.dim
            out[i.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return out


def _value_blocks(p) -> Iterator[np.ndarray]:
    """A parameter's values in blocks of rows, without forming a folded weight whole (blockwise.formed_rows)."""
    raw, factor = p.factors if p.factors is not None else (p.value, None)
    return (block for _, block in formed_rows(raw, factor))


def wide_range_warnings(graph) -> list[str]:
    """Parameters whose non-zero |entries| span more than 2**126: the companion carries each tensor with one
    float32 scale, so entries below 2**-126 of the largest lose precision and those below 2**-149 of it become 0
    (certified runs bound what that costs, from the true values, or refuse). Real models rarely come near this; a
    weight that decayed to a float32 subnormal next to an O(1) weight does."""
    out = []
    for p in graph.params():  # block by block: a full-size |v| and its nonzero copy held 3.3x a 404 MB model
        top = max((abs_max(b) for b in _value_blocks(p)), default=0.0)
        least = min((min_nonzero_abs(b) for b in _value_blocks(p)), default=math.inf)
        if top > 0 and least < 2.0**-126 * top:
            threshold = 2.0**-126 * top
            weak = sum(int(np.count_nonzero((b != 0) & (np.abs(b) < threshold))) for b in _value_blocks(p))
            out.append(
                f"{p.name}: {weak} non-zero entr{'y is' if weak == 1 else 'ies are'} below 2^-126 of the tensor's "
                "largest; float32 holds them coarsely, and below 2^-149 of it not at all (certified runs bound what "
                "that costs, or refuse; scores and samples count the paths through those as zero)"
            )
    return out
