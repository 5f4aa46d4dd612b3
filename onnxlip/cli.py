"""The `onnxlip` command line. Exit codes: 0 ok, 1 a requested threshold was exceeded, 2 unusable input or
unsupported model, 3 internal error. With --json, stdout holds exactly one JSON object."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from . import api
from .args import MAX_SECONDS, seconds_arg
from .checking import CheckResult
from .checking import check as check_model
from .cli_common import (
    DeviceOpt,
    FlagHelpCommand,
    JsonOpt,
    OutputOpt,
    ShapeOpt,
    Terminated,
    _emit_json,
    _exceeds,
    _fmt,
    _guard,
    _progress,
    _shapes,
    _threshold,
    app,
    err,
    int_option,
    out,
    real_option,
    styled,
)
from .errors import OnnxlipError, grouped_issues


@app.command(
    cls=FlagHelpCommand,
    short_help="Is the model supported? Its ops, inputs, parameters and every problem (exit 2 if not).",
)
def check(
    model: Path = typer.Argument(..., help="ONNX file.", metavar="MODEL"),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    as_json: bool = JsonOpt,
):
    """Is the model supported? Lists its ops, inputs, parameters and every problem (exit 2 if unsupported)."""
    with _guard(as_json):
        result = check_model(model, output=output, input_shapes=_shapes(input_shape))
        if as_json:
            _emit_json({"model": str(model)} | result.to_json())
        else:
            _print_check(model, result)
        if not result.supported:
            raise typer.Exit(2)


def _print_check(model, result: CheckResult) -> None:
    status = ("supported", "green") if result.supported else ("not supported", "red")
    out.print(styled(f"{model}: ", status))
    table = Table(title="ops in the file")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in sorted(result.ops.items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(n))
    out.print(table)
    if result.supported:
        out.print(f"inputs: {result.inputs}   outputs: {result.outputs}   parameters: {result.num_parameters:,}")
    for line in grouped_issues(result.errors):
        out.print(styled(("x", "red"), f" {line}"), highlight=False)
    if result.hint:
        out.print(result.hint, highlight=False)
    for w in result.warnings:
        out.print(styled(("warning:", "yellow"), f" {w}"), highlight=False)


@app.command(cls=FlagHelpCommand, short_help="L^q path-norm ||Phi(theta)||_q of the model (value and log10).")
def pathnorm(
    model: Path = typer.Argument(..., help="ONNX file.", metavar="MODEL"),
    q: float = typer.Option(
        1.0,
        "--q",
        parser=real_option,
        help="Exponent of the L^q path-norm, from 0.001 to 1e6. A large q needs the weights' q-th powers to fit "
        "float32's range within each tensor (the digits models: q up to about 30-45); the error says when not.",
    ),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """L^q path-norm ||Phi(theta)||_q: one run of the absolute-value companion graph (value and log10)."""
    with _guard(as_json):
        r = api.path_norm(model, q, output=output, input_shapes=_shapes(input_shape), device=device)
        if as_json:
            _emit_json({"model": str(model)} | r.to_json())
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
        for note in r.notes:
            out.print(f"note: {note}", highlight=False)


@app.command(
    cls=FlagHelpCommand,
    short_help="Certified bound on how far variants can drift from a base model, for every input in a box (CI gate).",
)
def bound(
    models: List[Path] = typer.Argument(
        ...,
        help="BASE VARIANT [VARIANT ...]: one base model and the changed "
        "models (pruned, quantized, fine-tuned) to compare with it.",
        metavar="MODELS",
    ),
    input_bound: float = typer.Option(
        1.0,
        "--input-bound",
        "-R",
        parser=real_option,
        help="R: the bound holds for every input with ||x||_inf <= R.",
    ),
    samples: int = typer.Option(
        256,
        "--samples",
        parser=int_option,
        help="Random inputs in the box for the observed difference (a sanity figure, not a certificate); 0 to skip.",
    ),
    sample_seconds: float = typer.Option(
        1.0,
        "--sample-seconds",
        parser=real_option,
        help=f"Time budget per variant for sampling, in seconds (at most {MAX_SECONDS:g}, one day; 0 skips it).",
    ),
    seed: int = typer.Option(0, "--seed", parser=int_option, help="Seed of the random inputs."),
    max_bound: Optional[float] = typer.Option(
        None, "--max-bound", parser=real_option, help="CI gate: exit 1 when a certified bound exceeds this value."
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
        _threshold("--max-bound", max_bound)
        sample_seconds = seconds_arg("--sample-seconds", sample_seconds)
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
                # one unusable variant of a sweep does not cost the others' rows (exit 2 after all of them)
                errors="report" if len(variants) > 1 else "raise",
            )
        good = [r for r in results if isinstance(r, api.BoundResult)]
        failed = [r for r in results if isinstance(r, api.VariantError)]
        exceeded = max_bound is not None and any(_exceeds(r.log10_bound, max_bound) for r in good)
        if as_json:
            payload = [r.to_json() for r in results]
            for p, v, r in zip(payload, variants, results):
                p["variant"] = str(v)
                if max_bound is not None and isinstance(r, api.BoundResult):
                    p["exceeded"] = _exceeds(r.log10_bound, max_bound)
            if len(variants) == 1:
                obj = payload[0] | {"base": str(base)}
            else:
                obj = {"base": str(base), "results": payload}
                if failed:
                    obj["unusable_variants"] = [
                        str(v) for v, r in zip(variants, results) if isinstance(r, api.VariantError)
                    ]
                    obj["exit_code"] = 2
            if max_bound is not None:
                obj["max_bound"], obj["exceeded"] = max_bound, exceeded
            _emit_json(obj)
        else:
            if good:
                _print_bounds(base, variants, results, max_bound)
            for v, r in zip(_short_labels(variants), results):
                if isinstance(r, api.VariantError):
                    message = r.error if r.variant in r.error else f"{v}: {r.error}"  # errors name their file
                    err.print(styled(("error:", "bold red"), f" {message}"), highlight=False, soft_wrap=True)
        if failed:
            raise typer.Exit(2)
        if exceeded:
            raise typer.Exit(1)


def _print_bounds(base, variants, results, max_bound) -> None:
    good = [r for r in results if isinstance(r, api.BoundResult)]
    r0 = good[0]
    table = Table(title=f"certified bound on ||R_base(x) - R_variant(x)||_1 for all ||x||_inf <= {r0.input_bound:g}")
    table.add_column("variant", overflow="fold", min_width=12)
    for col in ("bound", "metric", "kind", "changed", "flips", "observed"):
        table.add_column(col, justify="right", no_wrap=True)  # a number folded over two lines reads wrong
    labels = _short_labels(variants)
    for v, r in zip(labels, results):
        if isinstance(r, api.VariantError):
            table.add_row(v, Text("error", style="bold red"), *["-"] * 5)
            continue
        over = max_bound is not None and _exceeds(r.log10_bound, max_bound)
        bound_txt = _fmt(r.bound, r.log10_bound)
        observed = "-" if r.observed_max_l1_diff is None else f"{r.observed_max_l1_diff:.4g} ({r.samples})"
        table.add_row(
            v,
            Text(bound_txt, style="red") if over else bound_txt,
            _fmt(r.path_metric, r.log10_path_metric),
            "exact" if r.exact else "upper",
            f"{r.changed_parameters:,}",
            str(r.sign_flips),
            observed,
        )
    out.print(table)
    margin = max(r.rounding_margin for r in good)
    out.print(
        f"base: {base}   device: {r0.device}   rounding margin included: {margin:.2g} (relative)",
        highlight=False,
    )
    if any(r.sign_flips for r in good):
        out.print("sign flips: " + next(r.sign_flip_handling for r in good if r.sign_flips), highlight=False)
    if max_bound is not None:
        over = [
            (v, r)
            for v, r in zip(labels, results)
            if isinstance(r, api.BoundResult) and _exceeds(r.log10_bound, max_bound)
        ]
        if over:
            failed = ", ".join(f"{v} ({_fmt(r.bound, r.log10_bound)})" for v, r in over)
            out.print(f"GATE FAILED: --max-bound {max_bound:g} exceeded by {failed}", highlight=False)
        else:
            checked = "every bound" if len(good) == len(results) else "every bound computed"
            out.print(f"gate passed: {checked} is <= --max-bound {max_bound:g}", highlight=False)
    for note in dict.fromkeys(n for r in good for n in r.notes):
        out.print(f"note: {note}", highlight=False)


def _short_labels(paths) -> list[str]:
    """For each path, its shortest trailing part that no other path shares (runs/a/model.onnx, runs/b/model.onnx ->
    a/model.onnx, b/model.onnx; x/p.onnx, y/q.onnx -> p.onnx, q.onnx), so that rows of one table never share a
    name."""
    parts = [Path(p).parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = [str(Path(*p[-k:])) for p, k in zip(parts, depth)]
        clash = [i for i, x in enumerate(labels) if labels.count(x) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


# the other commands register themselves on `app` when imported (after these, in this order, for --help)
# isort: off
from . import cli_pruning  # noqa: E402, F401
from . import cli_lipschitz  # noqa: E402, F401
# isort: on


def no_hugepage_advice() -> bool:
    """Stop numpy from advising the kernel to back large arrays with huge pages (as NUMPY_MADVISE_HUGEPAGE=0 does,
    unless the user set that variable). Where the kernel compacts memory when such an array is first touched
    (transparent huge pages with defrag "madvise"), a fresh 150 MB buffer took 0.15-0.3 s instead of 0.09 s, and
    `bound` on a 38M-parameter model 1.9-2.1 s instead of 1.0-1.3 (benchmarks/README.md). The CLI touches its big
    arrays once or twice, so it opts out for its own process; the Python API leaves numpy as it is. Returns
    whether the advice is now off."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return False
    _set_madvise_hugepage(False)
    return True


def main() -> None:  # console-script entry point
    if hasattr(signal, "SIGPIPE"):  # `onnxlip ... | head`: end quietly when the reader leaves, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (typer turned the broken pipe into exit 1, "exceeded")
    # SIGTERM (timeout, kill, docker stop, a cancelled CI job) ends the command as Ctrl-C does: through the cleanup
    # that removes temporary output files (it left them behind), with a message and the shell's code for it, 128 + 15
    signal.signal(signal.SIGTERM, _terminated)
    no_hugepage_advice()
    if not os.environ.get("ONNXLIP_DEBUG"):  # library warnings (numpy, onnx) are not the user's messages
        warnings.simplefilter("ignore")
    try:
        if "--json" in sys.argv[1:]:
            code = _json_main()
        else:
            try:
                app()
                code = 0
            except SystemExit as exc:
                code = exc.code
    except Terminated as exc:  # outside a command's guard (parsing its options, or once its output is written)
        _say(f"error: terminated by {exc.name}")
        code = exc.code
    if _stopped:
        _end_now(_stopped[0])
    sys.exit(code)


_stopped: list[int] = []  # the exit code of a termination signal, once one arrived


def _terminated(signum, frame) -> None:
    """SIGTERM's handler (in the main thread): Terminated unwinds the command; a second signal ends it at once."""
    if _stopped:
        _end_now(_stopped[0])
    _stopped.append(128 + signum)
    raise Terminated(signum)


def _end_now(code: int) -> None:
    """Exit without the interpreter's shutdown, which waits for every worker thread (blockwise's pool finishing the
    tensors it holds, seconds on a large model): the command has unwound, its temporary files are gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or full stream: the exit code is what is left
            pass
    os._exit(code)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - no stderr to say it on
        pass


def _json_main() -> int:
    """With --json, usage errors too (an unknown option, a value of the wrong type, a missing argument) are one
    JSON object on stdout, with exit code 2: the CI contract holds before a command starts."""
    try:
        code = app(standalone_mode=False)  # typer.Exit(n) returns n here
    except typer.TyperException as exc:  # the parser's errors (click's UsageError and its kind)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _emit_json({"error": message, "exit_code": 2})
        return 2
    except typer.Abort:
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
