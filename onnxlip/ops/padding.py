"""Padding arithmetic shared by convolutions and pools: explicit pads from auto_pad (ONNX's SAME_UPPER / SAME_LOWER
/ VALID rules)."""

from __future__ import annotations


def _fail(msg: str):
    from ..importer import RuleError

    raise RuleError(msg)


AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def resolve_pads(ctx, spatial_in, spatial_out, kernel, strides, dilations) -> list[int]:
    """Explicit [begin..., end...] pads of a Conv/pool node, resolving auto_pad."""
    n = len(kernel)
    auto_pad = ctx.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(ctx.attr("pads", [0] * (2 * n)))
        if len(pads) != 2 * n:
            _fail(f"pads has {len(pads)} entries, expected {2 * n}")
        return [int(p) for p in pads]
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad not in AUTO_PADS:  # (onnxruntime refuses the model)
        _fail(f"its auto_pad {auto_pad!r} is none of {', '.join(AUTO_PADS)}")
    begin, end = [], []
    for i in range(n):
        total = max((spatial_out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial_in[i], 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end
