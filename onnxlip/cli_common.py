"""What every `onnxlip` command shares: the typer app, the consoles, the common options, error handling (exit
codes 0 ok, 1 threshold exceeded, 2 unusable input or unsupported model, 3 internal error) and progress bars."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .cli_console import SafeConsole, styled  # noqa: F401 (styled: for the commands)
from .errors import OnnxlipError
from .writing import is_stdout, refuse_overwrite

FLAG = " "  # the metavar of on/off options: typer's rich help would show "<bool>", as if they took a value


def _flag_help(option):
    if option is not None:
        option.metavar = FLAG  # --help takes no value either
    return option


class FlagHelpCommand(typer.core.TyperCommand):
    """A command whose --help shows no "<bool>" (typer's rich help gives the help option that metavar)."""

    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


class FlagHelpGroup(typer.core.TyperGroup):
    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


app = typer.Typer(
    cls=FlagHelpGroup,
    help="Path-norms, path-metrics and certified Lipschitz bounds of exported ONNX ReLU networks.\n\n"
    "Every command takes --json for CI (one JSON object on stdout). Exit codes: 0 ok, 1 a threshold you "
    "set was exceeded, 2 unusable input or unsupported model, 3 an internal error (a bug: please report it).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def versions() -> str:
    """onnxlip's version and those of the libraries its numbers depend on (for CI logs and audit trails)."""
    from importlib import metadata

    import numpy
    import onnx
    import onnxruntime

    from . import __version__

    build = "onnxruntime"
    try:  # which wheel provides the module (both install `onnxruntime`)
        metadata.version("onnxruntime-gpu")
        build = "onnxruntime-gpu"
    except metadata.PackageNotFoundError:
        pass
    return (
        f"onnxlip {__version__} ({build} {onnxruntime.__version__}, onnx {onnx.__version__}, "
        f"numpy {numpy.__version__}, Python {sys.version.split()[0]})"
    )


def _print_version(value: bool) -> None:
    if value:
        try:
            print(versions(), flush=True)
        except OSError as exc:
            _stdout_failed(StdoutError(exc))
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the versions and exit.", metavar=FLAG
    ),
) -> None:
    """Path-norms, path-metrics and certified Lipschitz bounds of exported ONNX ReLU networks."""


def _width(stream) -> int | None:
    """Rich's width: the terminal's, COLUMNS when set, else 160 when the output is a file or a CI log (rich's 80
    would cut the bound and sweep tables' columns). Never below 80: narrower, rich crops numbers and drops the
    variant column (the terminal wraps the lines instead)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.strip().isdigit() and int(columns) < 80:
        return 80
    if columns or (stream is not None and not isinstance(stream, _Closed) and stream.isatty()):
        return None
    return 160


class _Closed:
    """Stands in for a standard stream the process was started without (`>&-`): writes go nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


for _name in ("stdout", "stderr"):  # a closed stream is None in Python: printing to it would raise
    if getattr(sys, _name) is None:
        setattr(sys, _name, _Closed())


# markup off: model paths, tensor and node names and messages are printed as they are (rich would read "[x]" in a
# name as a style tag, drop it, or fail on "[/x]"); styles are given as rich Text
out = SafeConsole(width=_width(sys.stdout), markup=False)
err = SafeConsole(stderr=True, width=_width(sys.stderr), markup=False)

OutputOpt = typer.Option(
    None,
    "--output",
    help="Analyse the sub-network up to this tensor (repeatable), e.g. the logits before a Softmax/ArgMax/ZipMap tail.",
    metavar="TENSOR",
)
ShapeOpt = typer.Option(
    None,
    "--input-shape",
    help="Fix an input's shape, NAME=1x3x224x224 (repeatable, once per input); needed "
    "when a non-batch dimension is dynamic. The batch dimension defaults to 1.",
    metavar="NAME=DIMS",
)
DeviceOpt = typer.Option(
    "auto",
    "--device",
    help="auto (CUDA when its provider really loads, else CPU), cpu or cuda.",
    metavar="auto|cpu|cuda",
)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.", metavar=FLAG)


# numbers on the command line: plain ASCII literals. Python's float() and int() (and the option parser) also take
# "1_0" (as 10) and other scripts' digits ("８"): a typo or a look-alike should be an error, not another value
_REAL = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_BLANK = " \t\n\r"


def _real_text(text: str) -> float | None:
    """The float of a plain ASCII number ("0.5", "-1e3", ".5", "inf", "nan"), None for anything else."""
    text = text.strip(_BLANK)
    return float(text) if _REAL.fullmatch(text) else None


def real_option(value):
    """typer parser of a real-number option (see _REAL)."""
    if not isinstance(value, str):  # the default
        return value
    number = _real_text(value)
    if number is None:
        raise typer.BadParameter(f"{value!r} is not a number (plain ASCII digits, e.g. 0.5, 1e-3 or inf)")
    return number


def int_option(value):
    """typer parser of an integer option: plain ASCII digits, an optional sign."""
    if not isinstance(value, str):  # the default
        return value
    if not _INTEGER.fullmatch(value.strip(_BLANK)):
        raise typer.BadParameter(f"{value!r} is not an integer (plain ASCII digits, e.g. 0 or 256)")
    return int(value.strip(_BLANK))


def _numbers(option: str, text: str) -> list[float]:
    """A comma-separated list of numbers; OnnxlipError for an empty item ("1,,2": a typo, not a list of two)."""
    if not text.strip():
        return []  # (the caller says what it needs at least one of)
    values = [_real_text(v) for v in text.split(",")]
    if any(v is None for v in values):
        raise OnnxlipError(f"{option} {text!r} is not a comma-separated list of numbers (plain ASCII, e.g. 0.5,0.9)")
    return values


def _shapes(specs: Optional[List[str]]) -> dict[str, list[int]] | None:
    """--input-shape NAME=D1xD2x... options as input_shapes; each dimension a positive integer in ASCII digits, each
    input named once (the last of two was silently the one used)."""
    if not specs:
        return None
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        parts = dims.lower().split("x")
        if not sep or not name or not all(re.fullmatch("[0-9]+", d) and int(d) > 0 for d in parts):
            raise OnnxlipError(
                f"--input-shape {spec!r} is not NAME=D1xD2x... with positive whole dimensions in plain digits "
                "(e.g. input=1x3x224x224)"
            )
        if name in shapes:
            raise OnnxlipError(
                f"--input-shape gives input {name!r} twice ({name}={'x'.join(map(str, shapes[name]))} and {spec}); "
                "give each input once"
            )
        shapes[name] = [int(d) for d in parts]
    return shapes


def _threshold(option: str, value: float | None) -> float | None:
    """A CI gate's threshold: a number (NaN would never trip the gate), >= 0 (bounds are never negative: a negative
    threshold would fail every model, whatever it is)."""
    if value is not None and math.isnan(value):
        raise OnnxlipError(f"{option} must be a number, got nan")
    if value is not None and value < 0:
        raise OnnxlipError(
            f"{option} must be >= 0 (a bound is never negative; 0 accepts identical models only), got {value:g}"
        )
    return value


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
    except StdoutError as exc:
        _stdout_failed(exc)
    except OnnxlipError as exc:
        _fail(as_json, str(exc), 2, getattr(exc, "issues", None), getattr(exc, "hint", None))
    except OSError as exc:  # an output file that cannot be written (missing folder, permissions, full disk)
        _fail(as_json, f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}", 2)
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        _fail(as_json, f"not enough memory for this model's tensors{detail}; try a smaller --input-shape", 2)
    except KeyboardInterrupt:
        _fail(as_json, "interrupted", 130)
    except Terminated as exc:
        _fail(as_json, f"terminated by {exc.name}", exc.code)
    except Exception as exc:  # noqa: BLE001 - never show a traceback to a user unless asked
        if os.environ.get("ONNXLIP_DEBUG"):  # the traceback on stderr, and still exit 3 (a bare raise exits 1)
            traceback.print_exc()
        _fail(as_json, f"internal error: {type(exc).__name__}: {exc} (set ONNXLIP_DEBUG=1 for a traceback)", 3)


def _fail(as_json: bool, message: str, code: int, issues=None, hint=None):
    if as_json and isinstance(sys.stdout, _Closed):
        as_json = False  # no stdout to carry the JSON: the message goes to stderr
    if as_json:
        payload = {"error": message, "exit_code": code}
        if issues:
            payload["errors"] = [{"node": i.node, "op": i.op, "reason": i.reason} for i in issues]
        if hint:
            payload["hint"] = hint.removeprefix("hint: ")
        _emit_json(payload)
    else:
        err.print(styled(("error:", "bold red"), f" {message}"), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _exceeds(log10_value: float, threshold: float) -> bool:
    """log10_value > log10(threshold), valid for values beyond float64 range."""
    if threshold <= 0:
        return threshold < 0 or log10_value > -math.inf
    return log10_value > math.log10(threshold)


def _emit_json(obj: dict) -> None:
    """The one JSON object of --json, stamped with onnxlip's version (an audit trail names the tool that made it)."""
    from . import __version__
    from .results import jsonable

    # strict JSON: a non-finite number anywhere (e.g. log10 of a zero path-norm) as "inf"/"-inf", NaN as null
    text = json.dumps(jsonable({**obj, "onnxlip_version": __version__}), allow_nan=False)
    try:
        print(text, flush=True)
    except OSError as exc:  # stdout full or gone: the JSON cannot be delivered, and saying so there fails too
        raise StdoutError(exc) from None


class Terminated(BaseException):
    """A termination signal (SIGTERM) arrived: raised in the main thread by cli's handler, so that the command unwinds
    as for Ctrl-C, through the cleanup of temporary files, and ends with code 128 + the signal's number. A
    BaseException: the library's `except Exception` does not take it for a failed step."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.code = 128 + signum
        self.name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"


class StdoutError(Exception):
    """Standard output cannot be written (a full disk, a closed stream): reported on stderr, exit 2."""


def _stdout_failed(exc: BaseException) -> None:
    inner = exc.args[0] if exc.args else exc
    try:
        print(f"error: cannot write to standard output: {getattr(inner, 'strerror', None) or inner}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - stderr gone too: the exit code is all that is left
        pass
    raise typer.Exit(2)


def _progress(total: int, label: str) -> Progress:
    """A progress bar on stderr (terminals only); a task of unknown total shows a pulsing bar and no count."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}" if total > 0 else ""),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=0 <= total <= 1 or not err.is_terminal,
    )


@contextmanager
def _output_target(target: str | None, as_json: bool, option: str = "-o"):
    """The path to give the writer of an output file named by `option`. A regular file (or a new one) is that path.
    Standard output (-o /dev/stdout, or the file stdout is redirected to) takes the file's bytes and nothing else:
    refused with --json (its one JSON object goes there), else the human report goes to stderr. Standard output and
    other streams (a pipe, a terminal, /dev/fd/N) are written through a temporary file copied into them once the
    command succeeded (a failure writes nothing)."""
    if target is None:
        yield None
        return
    to_stdout = is_stdout(target)
    if to_stdout and as_json:
        raise OnnxlipError(
            f"{option} {target} is standard output, where --json writes its JSON object; write the file elsewhere, "
            "or leave out --json"
        )
    try:
        stream = to_stdout or not stat.S_ISREG(os.stat(target).st_mode)
    except OSError:
        stream = False  # a new file (or one that cannot be read: the writer says why)
    if not stream:
        yield target
        return
    previous = out.file
    if to_stdout:
        out.file = sys.stderr  # the report must not be mixed into the file's bytes
    try:
        with tempfile.TemporaryDirectory(prefix="onnxlip-") as folder:
            temporary = os.path.join(folder, "output" + Path(target).suffix)
            yield temporary
            if not os.path.exists(temporary):  # (nothing was written)
                return
            with open(temporary, "rb") as data:
                if to_stdout:
                    try:
                        sys.stdout.flush()
                        shutil.copyfileobj(data, sys.stdout.buffer, 1 << 20)
                        sys.stdout.buffer.flush()
                    except OSError as exc:
                        raise StdoutError(exc) from None
                else:
                    try:
                        with open(target, "wb") as sink:
                            shutil.copyfileobj(data, sink, 1 << 20)
                    except OSError as exc:
                        raise OnnxlipError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        out.file = previous


def _refuse_overwrite(target: Path, inputs) -> None:
    """Never write over an input file: a model or any external-data file it reads (writing.refuse_overwrite)."""
    refuse_overwrite(target, inputs)
