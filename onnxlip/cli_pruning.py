"""`onnxlip scores`, `prune` and `rescale` (issue 3: path-magnitude scores, pruning, random rescaling)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from .cli_common import (
    FLAG,
    DeviceOpt,
    FlagHelpCommand,
    JsonOpt,
    OutputOpt,
    ShapeOpt,
    _emit_json,
    _fmt,
    _guard,
    _numbers,
    _output_target,
    _progress,
    _refuse_overwrite,
    _shapes,
    app,
    int_option,
    out,
    real_option,
)
from .errors import OnnxlipError
from .writing import write_output

NPZ_NORM_KEY = "__log10_path_norm__"  # the .npz key of the path-norm's log10, beside the initializers' scores


@app.command(
    "scores",
    cls=FlagHelpCommand,
    short_help="Path-magnitude score of every weight and bias (rescaling-invariant), as an .npz.",
)
def scores_cmd(
    model: Path = typer.Argument(..., help="ONNX file.", metavar="MODEL"),
    out_file: Optional[str] = typer.Option(
        None,
        "-o",
        "--out",
        help="Write the scores to this .npz: one array "
        "per parameter tensor, keyed and shaped like the model's initializers, "
        "as fractions of the path-norm (multiply by 10**log10_path_norm, which the file also holds as "
        f"{NPZ_NORM_KEY}; a model with an initializer of that name is refused, as are names np.load could not "
        "give back exactly). -o /dev/stdout writes it to standard output (the report goes to stderr; not with "
        "--json).",
        metavar="FILE",
    ),
    log10: bool = typer.Option(
        False,
        "--log10",
        metavar=FLAG,
        help="Write log10 of those fractions instead (-inf for 0): exact for every score, including those below "
        "float64's range (1e-308 of the path-norm), which deep networks can have.",
    ),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Path-magnitude score of every weight and bias: the l1 path mass through it (|w| times the gradient of
    the path-norm), from one forward and one adjoint run of the companion graph. Invariant under rescaling."""
    from .scores import scores as compute_scores

    with _guard(as_json), _output_target(out_file, as_json) as target:
        result = compute_scores(model, output=output, input_shapes=_shapes(input_shape), device=device)
        if out_file is not None:
            _refuse_overwrite(out_file, [model])
            arrays = result.initializer_scores(log10)  # keyed by initializer: a shared one's uses summed
            _check_npz_keys(arrays)
            lost = 0 if log10 else sum(t.below_float64() for t in result.tensors.values())
            if lost:
                result.notes.append(
                    f"{lost} nonzero score(s) lie below float64's range relative to the path-norm and read as 0 (or "
                    "lose precision) in the file; --log10 writes every score's log10 exactly"
                )
            write_output(target, lambda path: _savez(path, arrays, result.log10_path_norm))
        if as_json:
            obj = {"model": str(model)} | result.to_json()
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
        for note in result.notes:
            out.print(f"note: {note}", highlight=False)
        if out_file is not None:
            what = "log10 of the scores" if log10 else "scores"
            out.print(f"wrote {out_file} ({what} relative to the path-norm)", highlight=False)


@app.command(
    "prune",
    cls=FlagHelpCommand,
    short_help="Prune by path-magnitude or magnitude; writes the pruned model and its certified bound.",
)
def prune_cmd(
    model: Path = typer.Argument(..., help="ONNX file.", metavar="MODEL"),
    sparsity: Optional[float] = typer.Option(
        None, "--sparsity", parser=real_option, help="Fraction of the prunable weights to zero (this or --sweep)."
    ),
    out_file: Optional[str] = typer.Option(
        None,
        "-o",
        "--out",
        help="Where to write the pruned model (/dev/stdout: to standard output, the report to stderr; not with "
        "--json).",
        metavar="FILE",
    ),
    criterion: Optional[str] = typer.Option(
        None,
        "--criterion",
        help="path-magnitude (rescaling-invariant; the default) or magnitude. A --sweep without it runs both.",
        metavar="path-magnitude|magnitude",
    ),
    scope: str = typer.Option(
        "global", "--scope", help="global: one threshold for all layers; layer: per tensor.", metavar="global|layer"
    ),
    include_biases: bool = typer.Option(
        False, "--include-biases", help="Also prune the biases of those layers.", metavar=FLAG
    ),
    sweep: Optional[str] = typer.Option(
        None,
        "--sweep",
        help="Comma-separated sparsities: a table (both criteria, unless --criterion names one) instead of one "
        "pruned file.",
        metavar="S1,S2,...",
    ),
    plot: Optional[str] = typer.Option(
        None,
        "--plot",
        help="With --sweep: draw bound versus sparsity (an image; its format from the file's extension, e.g. .png "
        "or .pdf; needs matplotlib, pip install 'onnxlip\\[plot]').",
        metavar="IMAGE",
    ),
    input_bound: float = typer.Option(1.0, "--input-bound", "-R", parser=real_option, help="R of the certified bound."),
    output: Optional[List[str]] = OutputOpt,
    input_shape: Optional[List[str]] = ShapeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Zero the weights of Conv/ConvTranspose/Gemm/MatMul with the smallest scores. The pruned file keeps the
    input's graph, names, opset and metadata (BatchNorm stays unfolded); it reports the achieved sparsity and
    the certified bound between the original and the pruned model (exact metric)."""
    from .prune import prune_sweep

    with (
        _guard(as_json),
        _output_target(out_file, as_json) as out_target,
        _output_target(plot, as_json, "--plot") as plot_target,
    ):
        if (sparsity is None) == (sweep is None):
            raise OnnxlipError("give either --sparsity S (with -o FILE) or --sweep S1,S2,...")
        if plot is not None:
            if sweep is None:
                raise OnnxlipError("--plot draws a --sweep; with one --sparsity there is no curve to draw")
            _refuse_overwrite(plot, [model])
            _plot_format(plot)  # before the sweep: matplotlib present, a format it writes, the exact file named
        if sweep is not None:
            if out_file is not None:
                raise OnnxlipError("-o writes the model of one --sparsity; a --sweep writes none (--plot draws it)")
            levels = _numbers("--sweep", sweep)
            runs = len(levels) * (1 if criterion is not None else 2)
            with _progress(runs, "pruning") as bar:
                task = bar.add_task("sweep", total=runs)
                results = prune_sweep(
                    model,
                    levels,
                    **({"criteria": [criterion]} if criterion is not None else {}),
                    scope=scope,
                    include_biases=include_biases,
                    input_bound=input_bound,
                    output=output,
                    input_shapes=_shapes(input_shape),
                    device=device,
                    progress=lambda: bar.advance(task),
                )
        else:
            if out_file is None:
                mixup = any(str(t).endswith(".onnx") for t in output or [])
                raise OnnxlipError(
                    "--sparsity needs -o FILE for the pruned model"
                    + (" (--output names a tensor to analyse up to, not the file to write)" if mixup else "")
                )
            _refuse_overwrite(out_file, [model])
            results = prune_sweep(
                model,
                [sparsity],
                criteria=[criterion or "path-magnitude"],
                scope=scope,
                include_biases=include_biases,
                out_path=out_target,
                input_bound=input_bound,
                output=output,
                input_shapes=_shapes(input_shape),
                device=device,
            )
            if out_target != out_file:  # written through a temporary file into a stream (_output_target)
                results[0].output = str(out_file)
        if plot is not None:
            _plot_sweep(results, plot_target)
        if as_json:
            _emit_json(
                {"model": str(model)}
                | (results[0].to_json() if sweep is None else {"results": [r.to_json() for r in results]})
                | ({"plot": str(plot)} if plot is not None else {})
            )
            return
        table = Table(title=f"pruning {model}: certified bound for ||x||_inf <= {input_bound:g} ({scope} scope)")
        for col in ("criterion", "sparsity", "bound", "metric", "kind"):
            table.add_column(col, justify="right" if col != "criterion" else "left")
        for r in results:
            table.add_row(
                r.criterion,
                f"{r.sparsity:.3f}",
                _fmt(r.bound, r.log10_bound),
                _fmt(r.path_metric, r.log10_path_metric),
                "exact" if r.exact else "upper",
            )
        out.print(table)
        for note in results[0].notes:
            out.print(f"note: {note}", highlight=False)
        if out_file is not None:
            out.print(f"wrote {out_file}", highlight=False)
        if plot is not None:
            out.print(f"wrote {plot}", highlight=False)


def _check_npz_keys(arrays: dict) -> None:
    """OnnxlipError for initializer names a .npz cannot hold as keys that np.load gives back exactly: the metadata
    key itself; a NUL (zip member names end there); text that is not Unicode or over the zip's 64 KiB name length;
    and a name "N.npy" beside a name "N" (np.load looks "N.npy" up as the member file of "N", whose array it gives).
    Every other name (slashes, "..", spaces, an empty name) is its own key in the file and in np.load's."""
    for name in arrays:
        if name == NPZ_NORM_KEY:
            raise OnnxlipError(
                f"the model has an initializer named {NPZ_NORM_KEY}, the key under which the .npz holds the "
                "path-norm's log10; rename that initializer to write its scores"
            )
        if "\0" in name:
            raise OnnxlipError(f"initializer name {name!r} holds a NUL character, which a .npz key cannot hold")
        try:
            size = len((name + ".npy").encode("utf-8"))
        except UnicodeEncodeError:
            raise OnnxlipError(
                f"initializer name {name!r} is not valid Unicode text; a .npz key cannot hold it"
            ) from None
        if size > 0xFFFF:
            raise OnnxlipError(
                f"initializer name {name[:40]!r}... is {size - 4} bytes long; a .npz key holds at most {0xFFFF - 4}"
            )
    keys = set(arrays) | {NPZ_NORM_KEY}
    for name in sorted(keys):
        if name.endswith(".npy") and name[:-4] in keys:
            raise OnnxlipError(
                f"a .npz cannot hold both keys {name[:-4]!r} and {name!r}: np.load looks {name!r} up as the file "
                f"of {name[:-4]!r} and would give that array; rename the initializer {name!r}"
            )


def _savez(path: str, arrays: dict, log10_path_norm: float) -> None:
    """The .npz np.savez writes (one uncompressed .npy member per key), for any key: np.savez(f, **arrays) took
    keys named like its own parameters ("file", "allow_pickle") as those. Exactly the named file (np.savez(path)
    would add ".npz"). The keys are checked by _check_npz_keys."""
    import zipfile

    from numpy.lib import format as npy_format

    members = {**arrays, NPZ_NORM_KEY: np.array(log10_path_norm)}
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in members.items():
            with archive.open(key + ".npy", "w", force_zip64=True) as member:  # (force_zip64: as np.savez, gh-10776)
                npy_format.write_array(member, np.asanyarray(value), allow_pickle=False)


def _plot_format(path: str) -> str:
    """The image format --plot's extension names; OnnxlipError without matplotlib or for a name matplotlib would
    change (no extension: it appends .png, and the file written is not the one checked against the inputs)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise OnnxlipError("--plot needs matplotlib: pip install 'onnxlip[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = Path(path).suffix[1:].lower()
    if fmt not in formats:
        raise OnnxlipError(
            f"--plot {path}: give a file name ending in an image format matplotlib writes "
            f"({', '.join(sorted(formats))})"
        )
    return fmt


def _plot_sweep(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for criterion in dict.fromkeys(r.criterion for r in results):
        rows = [r for r in results if r.criterion == criterion]
        ax.plot([r.sparsity for r in rows], [r.log10_bound for r in rows], marker="o", label=criterion)
    ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
    ax.set_ylabel("log10 certified bound")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_output(path, lambda name: fig.savefig(name, dpi=120, format=_plot_format(path)))
    plt.close(fig)


@app.command(
    "rescale",
    cls=FlagHelpCommand,
    short_help="A functionally identical model with random neuron-wise rescaling (the attack on magnitude pruning).",
)
def rescale_cmd(
    model: Path = typer.Argument(..., help="ONNX file.", metavar="MODEL"),
    out_file: str = typer.Option(
        ...,
        "-o",
        "--out",
        help="Where to write the rescaled model (/dev/stdout: to standard output, the report to stderr; not with "
        "--json).",
        metavar="FILE",
    ),
    seed: int = typer.Option(0, "--seed", parser=int_option, help="Random seed."),
    factors: str = typer.Option(
        "1,128,4096",
        "--factors",
        help="Comma-separated positive factors; each neuron draws one uniformly (a neuron that draws 1 is not "
        "counted as rescaled).",
        metavar="F1,F2,...",
    ),
    as_json: bool = JsonOpt,
):
    """A functionally identical model with random positive neuron-wise rescaling at every ReLU neuron where it is
    exact (incoming weights and bias times lambda, outgoing weights over lambda; per channel for convolutions).
    Path-norms, bounds and path-magnitude scores do not change; weight magnitudes do."""
    from .rescale import rescale

    with _guard(as_json), _output_target(out_file, as_json) as target:
        values = _numbers("--factors", factors)
        _refuse_overwrite(out_file, [model])
        _, result = rescale(model, seed=seed, factors=values, out_path=target)
        result.output = str(out_file)  # (not the temporary file a stream is written through: _output_target)
        notes = list(result.notes)  # (the check of the written model's function: rescale_check)
        if result.rescaled_neurons == 0 and result.rescaled_layers > 0:  # every neuron drew the factor 1
            notes.append(
                f"no neuron was rescaled: every neuron of the {result.rescaled_layers} rescalable layers drew the "
                "factor 1, so the written model equals the input; give --factors other than 1"
            )
        elif result.rescaled_neurons == 0:
            notes.append(
                "no neuron was rescaled: the written model equals the input (no ReLU, LeakyReLU or PReLU layer "
                "between two layers with their own weights where rescaling is exact)"
            )
        if as_json:
            _emit_json({"model": str(model)} | result.to_json() | {"notes": notes})
        else:
            out.print(
                f"rescaled {result.rescaled_neurons} neurons in {result.rescaled_layers} layers "
                f"({result.skipped_layers} ReLU layers skipped, where it would not be exact or would change weights "
                "that are not the layers' own float initializers: residual adds, concats, shared or quantized "
                f"weights); wrote {out_file}",
                highlight=False,
            )
            for note in notes:
                out.print(f"note: {note}", highlight=False)
