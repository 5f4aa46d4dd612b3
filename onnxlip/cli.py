"""The `onnxlip` command line. Exit codes: 0 ok, 1 a requested threshold was exceeded, 2 unusable input or
unsupported model, 3 internal error. With --json, stdout holds exactly one JSON object."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import api
from .errors import OnnxlipError

app = typer.Typer(
    help="Path-norms, path-metrics and certified Lipschitz bounds of exported ONNX ReLU networks.\n\n"
    "Every command takes --json for CI (one JSON object on stdout). Exit codes: 0 ok, 1 a threshold you "
    "set was exceeded, 2 unusable input or unsupported model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

OutputOpt = typer.Option(
    None,
    "--output",
    help="Analyse the sub-network up to this tensor (repeatable), e.g. the logits before a Softmax/ArgMax/ZipMap tail.",
)
ShapeOpt = typer.Option(
    None,
    "--input-shape",
    help="Fix an input's shape, NAME=1x3x224x224 (repeatable); needed "
    "when a non-batch dimension is dynamic. The batch dimension defaults to 1.",
)
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when its provider really loads, else CPU), cpu or cuda.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.")


def _shapes(specs: Optional[List[str]]) -> dict[str, list[int]] | None:
    if not specs:
        return None
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise OnnxlipError(f"--input-shape {spec!r} is not NAME=D1xD2x...") from None
    return shapes


def _fmt(value: float | None, log10: float) -> str:
    """A number for humans: plain when it fits a float64, else 10^log10."""
    if log10 == -math.inf:
        return "0"
    if value is None:
        return f"10^{log10:.4f}"
    return f"{value:.6g}"


@contextmanager
def _guard(as_json: bool):
    """Turn onnxlip errors into a clear message and exit code 2 (internal errors: 3, short message)."""
    try:
        yield
    except typer.Exit:
        raise
    except OnnxlipError as exc:
        _fail(as_json, str(exc), 2, getattr(exc, "issues", None), getattr(exc, "hint", None))
    except OSError as exc:  # an output file that cannot be written (missing folder, permissions, full disk)
        _fail(as_json, f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}", 2)
    except KeyboardInterrupt:
        _fail(as_json, "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - never show a traceback to a user unless asked
        if os.environ.get("ONNXLIP_DEBUG"):
            raise
        _fail(as_json, f"internal error: {type(exc).__name__}: {exc} (set ONNXLIP_DEBUG=1 for a traceback)", 3)


def _fail(as_json: bool, message: str, code: int, issues=None, hint=None):
    if as_json:
        payload = {"error": message, "exit_code": code}
        if issues:
            payload["errors"] = [{"node": i.node, "op": i.op, "reason": i.reason} for i in issues]
        if hint:
            payload["hint"] = hint
        print(json.dumps(payload))
    else:
        err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _exceeds(log10_value: float, threshold: float) -> bool:
    """log10_value > log10(threshold), valid for values beyond float64 range."""
    if threshold <= 0:
        return threshold < 0 or log10_value > -math.inf
    return log10_value > math.log10(threshold)


def _emit_json(obj: dict) -> None:
    print(json.dumps(obj))


def _progress(total: int, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=total <= 1 or not err.is_terminal,
    )


@app.command()
def check(
    model: Path = typer.Argument(..., help="ONNX file."),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    as_json: bool = JsonOpt,
):
    """Is the model supported? Lists its ops, inputs, parameters and every problem (exit 2 if unsupported)."""
    with _guard(as_json):
        result = api.check(model, output=output, input_shapes=_shapes(input_shape))
        if as_json:
            _emit_json(result.to_json())
        else:
            _print_check(model, result)
        if not result.supported:
            raise typer.Exit(2)


def _print_check(model, result: api.CheckResult) -> None:
    status = "[green]supported[/]" if result.supported else "[red]not supported[/]"
    out.print(f"{model}: {status}")
    table = Table(title="ops in the file")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in sorted(result.ops.items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(n))
    out.print(table)
    if result.supported:
        out.print(f"inputs: {result.inputs}   outputs: {result.outputs}   parameters: {result.num_parameters:,}")
    for issue in result.errors:
        out.print(f"[red]x[/] node [bold]{issue.node}[/] ({issue.op}): {issue.reason}", highlight=False)
    if result.hint:
        out.print(result.hint, highlight=False)
    for w in result.warnings:
        out.print(f"[yellow]warning:[/] {w}")


@app.command()
def pathnorm(
    model: Path = typer.Argument(..., help="ONNX file."),
    q: float = typer.Option(1.0, "--q", help="Exponent of the L^q path-norm (q > 0)."),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """L^q path-norm ||Phi(theta)||_q: one run of the absolute-value companion graph (value and log10)."""
    with _guard(as_json):
        r = api.path_norm(model, q, output=output, input_shapes=_shapes(input_shape), device=device)
        if as_json:
            _emit_json(r.to_json())
            return
        table = Table(title=f"L^{q:g} path-norm of {model}")
        for col in ("path-norm", "log10", "parameters", "outputs", "device"):
            table.add_column(col)
        table.add_row(
            _fmt(r.path_norm, r.log10_path_norm),
            f"{r.log10_path_norm:.6f}",
            f"{r.num_parameters:,}",
            ", ".join(r.outputs),
            r.device,
        )
        out.print(table)


@app.command()
def bound(
    models: List[Path] = typer.Argument(
        ...,
        help="BASE VARIANT [VARIANT ...]: one base model and the changed "
        "models (pruned, quantized, fine-tuned) to compare with it.",
    ),
    input_bound: float = typer.Option(
        1.0, "--input-bound", "-R", help="R: the bound holds for every input with ||x||_inf <= R."
    ),
    samples: int = typer.Option(
        256,
        "--samples",
        help="Random inputs in the box for the observed difference (a sanity figure, not a certificate); 0 to skip.",
    ),
    sample_seconds: float = typer.Option(1.0, "--sample-seconds", help="Time budget per variant for sampling."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    max_bound: Optional[float] = typer.Option(
        None, "--max-bound", help="CI gate: exit 1 when a certified bound exceeds this value."
    ),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Certified bound on ||R_base(x) - R_variant(x)||_1 for all ||x||_inf <= R (Gonon et al., ICML 2025):
    max(R, 1) * ||Phi(base) - Phi(variant)||_1, with the l1 path-metric computed without cancellation.

    The metric is exact when one model dominates the other entrywise in absolute value (pruning); otherwise
    it is a certified upper bound. Parameters that change sign are handled by splitting at a midpoint.

    Sweeps: variants that differ from the base file only in weight values (written by the same tool) are
    compared without importing them again; use --samples 0 to skip the per-variant sampling."""
    with _guard(as_json):
        if len(models) < 2:
            raise OnnxlipError("bound needs a base model and at least one variant")
        base, variants = models[0], models[1:]
        with _progress(len(variants), "comparing") as bar:
            task = bar.add_task("compare", total=len(variants))
            results = api.bound_many(
                base,
                variants,
                input_bound,
                samples=samples,
                seed=seed,
                sample_seconds=sample_seconds,
                output=output,
                input_shapes=_shapes(input_shape),
                device=device,
                progress=lambda: bar.advance(task),
            )
        exceeded = max_bound is not None and any(_exceeds(r.log10_bound, max_bound) for r in results)
        if as_json:
            payload = [r.to_json() for r in results]
            for p, v in zip(payload, variants):
                p["variant"] = str(v)
            if len(variants) == 1:
                obj = payload[0] | {"base": str(base)}
            else:
                obj = {"base": str(base), "results": payload}
            if max_bound is not None:
                obj["max_bound"], obj["exceeded"] = max_bound, exceeded
            _emit_json(obj)
        else:
            _print_bounds(base, variants, results, max_bound)
        if exceeded:
            raise typer.Exit(1)


def _print_bounds(base, variants, results, max_bound) -> None:
    r0 = results[0]
    table = Table(title=f"certified bound on ||R_base(x) - R_variant(x)||_1 for all ||x||_inf <= {r0.input_bound:g}")
    table.add_column("variant", overflow="fold", min_width=18)
    for col in ("bound", "path-metric", "metric", "changed", "flips", "observed (n)"):
        table.add_column(col, justify="right", overflow="fold")
    for v, r in zip(variants, results):
        over = max_bound is not None and _exceeds(r.log10_bound, max_bound)
        bound_txt = _fmt(r.bound, r.log10_bound)
        observed = "-" if r.observed_max_l1_diff is None else f"{r.observed_max_l1_diff:.4g} ({r.samples})"
        table.add_row(
            Path(v).name,
            f"[red]{bound_txt}[/]" if over else bound_txt,
            _fmt(r.path_metric, r.log10_path_metric),
            "exact" if r.exact else "upper bd",
            f"{r.changed_parameters:,}",
            str(r.sign_flips),
            observed,
        )
    out.print(table)
    out.print(
        f"base: {base}   device: {r0.device}   rounding margin included: {r0.rounding_margin:.2g}", highlight=False
    )
    if any(r.sign_flips for r in results):
        out.print("sign flips: " + next(r.sign_flip_handling for r in results if r.sign_flips), highlight=False)
    if max_bound is not None:
        out.print(f"gate: --max-bound {max_bound:g}", highlight=False)


@app.command("scores")
def scores_cmd(
    model: Path = typer.Argument(..., help="ONNX file."),
    out_file: Optional[Path] = typer.Option(
        None,
        "-o",
        "--out",
        help="Write the scores to this .npz: one array "
        "per parameter tensor, keyed and shaped like the model's initializers, "
        "as fractions of the path-norm (multiply by 10**log10_path_norm).",
    ),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Path-magnitude score of every weight and bias: the l1 path mass through it (|w| times the gradient of
    the path-norm), from one forward and one adjoint run of the companion graph. Invariant under rescaling."""
    from .scores import scores as compute_scores

    with _guard(as_json):
        result = compute_scores(model, output=output, input_shapes=_shapes(input_shape), device=device)
        if out_file is not None:
            _refuse_overwrite(out_file, [model])
            arrays = {name: t.relative for name, t in result.tensors.items()}
            np.savez(out_file, **arrays, __log10_path_norm__=np.array(result.log10_path_norm))
        if as_json:
            obj = result.to_json()
            obj["file"] = None if out_file is None else str(out_file)
            _emit_json(obj)
            return
        table = Table(title=f"path-magnitude scores of {model} (log10 path-norm {result.log10_path_norm:.6f})")
        for col in ("tensor", "shape", "log10 sum", "log10 max", "folded from"):
            table.add_column(col, overflow="fold")
        for name, t in result.tensors.items():
            table.add_row(
                name,
                "x".join(map(str, t.shape)),
                f"{t.log10_sum:.4f}",
                f"{t.log10_max:.4f}",
                ", ".join(t.sources) if t.folded else "",
            )
        out.print(table)
        if out_file is not None:
            out.print(f"wrote {out_file} (scores relative to the path-norm)", highlight=False)


@app.command("prune")
def prune_cmd(
    model: Path = typer.Argument(..., help="ONNX file."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction of the prunable weights to zero."),
    out_file: Optional[Path] = typer.Option(None, "-o", "--out", help="Where to write the pruned model."),
    criterion: str = typer.Option(
        "path-magnitude", "--criterion", help="path-magnitude (rescaling-invariant) or magnitude."
    ),
    scope: str = typer.Option("global", "--scope", help="global: one threshold for all layers; layer: per tensor."),
    include_biases: bool = typer.Option(False, "--include-biases", help="Also prune the biases of those layers."),
    sweep: Optional[str] = typer.Option(
        None, "--sweep", help="Comma-separated sparsities: a table for both criteria instead of one pruned file."
    ),
    plot: Optional[Path] = typer.Option(
        None,
        "--plot",
        help="With --sweep: draw bound versus sparsity (PNG; needs matplotlib, pip install 'onnxlip[plot]').",
    ),
    input_bound: float = typer.Option(1.0, "--input-bound", "-R", help="R of the certified bound."),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Zero the weights of Conv/ConvTranspose/Gemm/MatMul with the smallest scores. The pruned file keeps the
    input's graph, names, opset and metadata (BatchNorm stays unfolded); it reports the achieved sparsity and
    the certified bound between the original and the pruned model (exact metric)."""
    from .prune import prune_sweep

    with _guard(as_json):
        if (sparsity is None) == (sweep is None):
            raise OnnxlipError("give either --sparsity S (with -o FILE) or --sweep S1,S2,...")
        if sweep is not None:
            try:
                levels = [float(v) for v in sweep.split(",") if v.strip()]
            except ValueError:
                raise OnnxlipError(f"--sweep {sweep!r} is not a comma-separated list of numbers") from None
            results = prune_sweep(
                model,
                levels,
                scope=scope,
                include_biases=include_biases,
                input_bound=input_bound,
                output=output,
                input_shapes=_shapes(input_shape),
                device=device,
            )
        else:
            if out_file is None:
                raise OnnxlipError("--sparsity needs -o FILE for the pruned model")
            _refuse_overwrite(out_file, [model])
            results = prune_sweep(
                model,
                [sparsity],
                criteria=[criterion],
                scope=scope,
                include_biases=include_biases,
                out_path=out_file,
                input_bound=input_bound,
                output=output,
                input_shapes=_shapes(input_shape),
                device=device,
            )
        if plot is not None:
            _plot_sweep(results, plot)
        if as_json:
            _emit_json(results[0].to_json() if sweep is None else {"results": [r.to_json() for r in results]})
            return
        table = Table(title=f"pruning {model}: certified bound for ||x||_inf <= {input_bound:g} ({scope} scope)")
        for col in ("criterion", "sparsity", "bound", "path-metric", "metric"):
            table.add_column(col, justify="right" if col != "criterion" else "left")
        for r in results:
            table.add_row(
                r.criterion,
                f"{r.sparsity:.3f}",
                _fmt(r.bound, r.log10_bound),
                _fmt(r.path_metric, r.log10_path_metric),
                "exact" if r.exact else "upper bd",
            )
        out.print(table)
        if out_file is not None:
            out.print(f"wrote {out_file}", highlight=False)


def _plot_sweep(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxlipError("--plot needs matplotlib: pip install 'onnxlip[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for criterion in dict.fromkeys(r.criterion for r in results):
        rows = [r for r in results if r.criterion == criterion]
        ax.plot([r.sparsity for r in rows], [r.log10_bound for r in rows], marker="o", label=criterion)
    ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
    ax.set_ylabel("log10 certified bound")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@app.command("rescale")
def rescale_cmd(
    model: Path = typer.Argument(..., help="ONNX file."),
    out_file: Path = typer.Option(..., "-o", "--out", help="Where to write the rescaled model."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    factors: str = typer.Option(
        "1,128,4096", "--factors", help="Comma-separated positive factors; each neuron draws one uniformly."
    ),
    as_json: bool = JsonOpt,
):
    """A functionally identical model with random positive neuron-wise rescaling at every ReLU neuron where it is
    exact (incoming weights and bias times lambda, outgoing weights over lambda; per channel for convolutions).
    Path-norms, bounds and path-magnitude scores do not change; weight magnitudes do."""
    from .rescale import rescale

    with _guard(as_json):
        try:
            values = [float(f) for f in factors.split(",") if f.strip()]
        except ValueError:
            raise OnnxlipError(f"--factors {factors!r} is not a comma-separated list of numbers") from None
        _refuse_overwrite(out_file, [model])
        _, result = rescale(model, seed=seed, factors=values, out_path=out_file)
        if as_json:
            _emit_json(result.to_json())
        else:
            out.print(
                f"rescaled {result.rescaled_neurons} neurons in {result.rescaled_layers} layers "
                f"({result.skipped_layers} ReLU layers skipped: residual, concat or shared); wrote {out_file}",
                highlight=False,
            )


@app.command("lipschitz")
def lipschitz_cmd(
    model: Path = typer.Argument(..., help="ONNX file."),
    norm: str = typer.Option("2", "--norm", help="2, 1 or inf: the norm on inputs and outputs."),
    max_lipschitz: Optional[float] = typer.Option(
        None, "--max-lipschitz", help="CI gate: exit 1 when the certified upper bound exceeds this value."
    ),
    per_layer: bool = typer.Option(
        False,
        "--per-layer",
        help="Table of every linear operator's l2 norm: power-"
        "iteration estimate and certified value; the largest ones dominate the bound.",
    ),
    lower_seconds: float = typer.Option(2.0, "--lower-seconds", help="Time budget of the lower-bound search."),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Upper and lower bounds on the Lipschitz constant of the model with respect to its input. Upper: the
    path-norm bounds (companion graph with biases zeroed; certified) and, for l2, AutoLip with certified operator
    norms (circular-embedding conv bounds, exact dense norms); the smaller is reported. Lower: the largest
    ||R(x) - R(x')|| / ||x - x'|| found on input pairs, so you see how loose the upper bound is."""
    from .lipschitz import lipschitz

    with _guard(as_json):
        with _progress(2, "operator norms") as bar:
            task = bar.add_task("norms", total=None)
            result = lipschitz(
                model,
                norm,
                per_layer=per_layer,
                lower_seconds=lower_seconds,
                output=output,
                input_shapes=_shapes(input_shape),
                device=device,
                progress=lambda: bar.advance(task),
            )
        exceeded = max_lipschitz is not None and _exceeds(result.upper.log10, max_lipschitz)
        if as_json:
            obj = result.to_json()
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
            table.add_row(
                "lower", f"{norm}->{norm}", f"{result.lower['value']:.6g}", result.lower["method"], "yes (observed)"
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
        if exceeded:
            raise typer.Exit(1)


def _refuse_overwrite(target: Path, inputs) -> None:
    """Never write over an input file."""
    for src in inputs:
        if Path(src).exists() and target.exists() and target.resolve() == Path(src).resolve():
            raise OnnxlipError(f"refusing to overwrite the input file {src}; choose another output path")


def main() -> None:  # console-script entry point
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
