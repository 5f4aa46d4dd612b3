"""`onnxlip lipschitz`: input-space Lipschitz bounds (certified, and estimates kept apart)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .args import MAX_SECONDS, seconds_arg
from .cli_common import (
    FLAG,
    FlagHelpCommand,
    JsonOpt,
    OutputOpt,
    ShapeOpt,
    _emit_json,
    _exceeds,
    _fmt,
    _guard,
    _progress,
    _shapes,
    _threshold,
    app,
    int_option,
    out,
    real_option,
)


@app.command(
    "lipschitz",
    cls=FlagHelpCommand,
    short_help="Certified upper and observed lower bounds on the Lipschitz constant with respect to the input.",
)
def lipschitz_cmd(
    model: Path = typer.Argument(..., help="ONNX file.", metavar="MODEL"),
    norm: str = typer.Option("2", "--norm", help="2, 1 or inf: the norm on inputs and outputs.", metavar="2|1|inf"),
    max_lipschitz: Optional[float] = typer.Option(
        None,
        "--max-lipschitz",
        parser=real_option,
        help="CI gate: exit 1 when the certified upper bound exceeds this value.",
    ),
    per_layer: bool = typer.Option(
        False,
        "--per-layer",
        metavar=FLAG,
        help="Table of every linear operator's l2 norm: power-"
        "iteration estimate and certified value; the largest ones dominate the bound.",
    ),
    lower_seconds: float = typer.Option(
        2.0,
        "--lower-seconds",
        parser=real_option,
        help=f"Time budget of the lower-bound search, in seconds (at most {MAX_SECONDS:g}, one day); 0 to skip it.",
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        parser=int_option,
        help="Seed of the lower-bound search's inputs (the search is time-limited: a faster machine tries more pairs, "
        "so the observed figure can differ between runs).",
    ),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = typer.Option(
        "auto",
        "--device",
        help="auto, cpu or cuda for the path-norm bounds' companion run. The operator norms are certified in "
        "float64 numpy, and their power estimates and the lower-bound search run on the CPU.",
        metavar="auto|cpu|cuda",
    ),
    as_json: bool = JsonOpt,
):
    """Upper and lower bounds on the Lipschitz constant of the model with respect to its input. Upper: the
    path-norm bounds (companion graph with biases zeroed; certified) and, for l2, AutoLip with certified operator
    norms (circular-embedding conv bounds, exact dense norms); the smaller is reported. Lower: the largest
    ||R(x) - R(x')|| / ||x - x'|| found on input pairs, so you see how loose the upper bound is."""
    from .lipschitz import lipschitz

    with _guard(as_json):
        _threshold("--max-lipschitz", max_lipschitz)
        lower_seconds = seconds_arg("--lower-seconds", lower_seconds)
        with _progress(-1, "bounds (operator norms, then the lower-bound search)") as bar:
            task = bar.add_task("norms", total=None)
            result = lipschitz(
                model,
                norm,
                per_layer=per_layer,
                lower_seconds=lower_seconds,
                seed=seed,
                output=output,
                input_shapes=_shapes(input_shape),
                device=device,
                progress=lambda: bar.advance(task),
            )
        exceeded = max_lipschitz is not None and _exceeds(result.upper.log10, max_lipschitz)
        if as_json:
            obj = {"model": str(model)} | result.to_json()
            if max_lipschitz is not None:
                obj["max_lipschitz"], obj["exceeded"] = max_lipschitz, exceeded
            _emit_json(obj)
        else:
            table = Table(title=f"Lipschitz constant of {model} in l{norm}")
            for col in ("bound", "norm", "value", "method", "certified"):
                table.add_column(col, overflow="fold")
            table.add_row(
                "upper", result.upper.norm, _fmt(result.upper.value, result.upper.log10), result.upper.method, "yes"
            )
            lower = result.lower["value"]
            table.add_row(
                "lower",
                f"{norm}->{norm}",
                "-" if lower is None else f"{lower:.6g}",
                result.lower["method"],
                "no (observed)",
            )
            for b in result.bounds:
                if b is not result.upper:
                    table.add_row("other", b.norm, _fmt(b.value, b.log10), b.method, "yes" if b.certified else "no")
            out.print(table)
            if result.layers:
                top = sorted(result.layers, key=lambda x: -x.certified)[: max(1, len(result.layers) // 5)]
                layers = Table(title="l2 operator norms (largest marked *)")
                for col in ("node", "op", "estimate", "certified", ""):
                    layers.add_column(col, overflow="fold")
                for x in result.layers:
                    est = "-" if x.estimate is None else f"{x.estimate:.6g}"
                    layers.add_row(x.node, x.op, est, f"{x.certified:.6g}", "*" if x in top else "")
                out.print(layers)
            for note in result.notes:
                out.print(f"note: {note}", highlight=False)
            if max_lipschitz is not None:  # said in words: CI logs keep no colour
                upper = _fmt(result.upper.value, result.upper.log10)
                if exceeded:
                    out.print(
                        f"GATE FAILED: the certified upper bound {upper} exceeds --max-lipschitz {max_lipschitz:g}"
                    )
                else:
                    out.print(f"gate passed: the certified upper bound {upper} is <= --max-lipschitz {max_lipschitz:g}")
        if exceeded:
            raise typer.Exit(1)
