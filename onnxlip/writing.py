"""Writing output files safely: never over an input file (a model or its external data, through any link), never a
truncated file on failure (written beside the target and renamed), streams (pipes, devices) written in place."""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import OnnxlipError
from .loading import ModelLike


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one existing file (through links of either kind): outputs never replace inputs."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError, TypeError):
        return False


def input_files(model: ModelLike) -> list[Path]:
    """The files a model argument reads: the model file and every external-data file it references (resolved as
    the loader resolves them). None for a ModelProto (its data is in memory)."""
    if isinstance(model, onnx.ModelProto) or not isinstance(model, (str, os.PathLike)):
        return []
    path = Path(model)
    files = [path]
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe or a device: opening or reading it may never end
            return files
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model: loading it reports why; only its own file is known
        return files
    base = path.parent
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value and "\0" not in entry.value:
                target = base / entry.value
                if target not in files:
                    files.append(target)
    return files


def refuse_overwrite(target: str | os.PathLike, models) -> None:
    """OnnxlipError when writing `target` would write over a file one of `models` reads: the model file or one of
    its external-data files, named directly, relatively or through a symbolic or hard link. The output path must
    also be writable in principle: a string or os.PathLike naming a file in an existing folder."""
    check_output_path(target)
    if not os.path.lexists(target):
        return  # a new file replaces nothing
    for model in models:
        for src in input_files(model):
            if same_file(target, src):
                what = "input file" if src == Path(model) else f"input file {model}'s external-data file"
                raise OnnxlipError(f"refusing to overwrite the {what} {src}; choose another output path")


def check_output_path(target) -> None:
    """OnnxlipError for an output path that cannot be a file to write: not a str or os.PathLike, empty, a folder,
    or in a folder that does not exist."""
    if isinstance(target, bytes) or not isinstance(target, (str, os.PathLike)):
        raise OnnxlipError(f"the output path must be a str or os.PathLike, got {type(target).__name__}")
    try:
        name = os.fspath(target)
    except TypeError:
        name = None
    if not isinstance(name, str) or not name or "\0" in name:
        raise OnnxlipError(f"cannot write {target!r}: not a usable file name")
    if os.path.isdir(name) or name.endswith(("/", os.sep)):
        raise OnnxlipError(f"cannot write {name}: it names a folder; give a file name")
    folder = os.path.dirname(name) or "."
    if not os.path.isdir(folder):
        raise OnnxlipError(f"cannot write {name}: the folder {folder} does not exist")


def write_output(target, write) -> None:
    """Run `write(path)` for the output file, with OSError (permissions, a full disk) as OnnxlipError. A regular
    file (or a new one) is written beside the target under a temporary name and renamed over it once complete: a
    failure (a full disk, Ctrl-C) leaves the target as it was, never a truncated file. A symbolic link is followed
    (its target is the file replaced); a pipe or device, or a file whose folder takes no new files, is written in
    place."""
    check_output_path(target)
    if os.path.exists(target) and not os.path.isfile(target):  # a pipe, a device (/dev/stdout): write to it
        _write_in_place(target, write, os.fspath(target))  # (by its own name: /dev/stdout on a pipe resolves to
        return  # /proc/<pid>/fd/pipe:[N], which does not exist)
    name = os.path.realpath(os.fspath(target))  # through symbolic links: the file they name is the output
    folder, base = os.path.split(name)
    temporary = os.path.join(folder, f".{base[:100]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            write(temporary)
        except PermissionError:
            if os.path.lexists(temporary) or not os.access(name, os.W_OK):
                raise
            _write_in_place(target, write, name)  # a writable file in a folder that takes no new files
            return
        if os.path.exists(name):  # the replaced file's permissions stay
            os.chmod(temporary, stat.S_IMODE(os.stat(name).st_mode))
        os.replace(temporary, name)
    except OSError as exc:
        raise OnnxlipError(f"cannot write {_shown(target, exc, temporary)}: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _write_in_place(target, write, name: str) -> None:
    try:
        write(name)
    except OSError as exc:
        raise OnnxlipError(f"cannot write {_shown(target, exc, name)}: {exc.strerror or exc}") from None


def _shown(target, exc: OSError, ours: str):
    return target if exc.filename in (None, ours) else exc.filename


def is_stdout(target) -> bool:
    """Whether `target` is standard output's stream: a name of its descriptor (/dev/stdout, /dev/fd/1, a link to
    one), or the very file or pipe stdout is redirected to. A character device that stdout also writes to, named by
    its own path (-o /dev/null with stdout on /dev/null, a terminal), is not: bytes written there mix into no file
    or pipe that stdout's reader gets (and /dev/null keeps nothing)."""
    try:
        fd = sys.stdout.fileno()
        there = os.stat(target)
        if not os.path.samestat(there, os.fstat(fd)):
            return False
    except (OSError, ValueError, AttributeError):  # no such file, or no stdout with a descriptor (a test's capture)
        return False
    return not stat.S_ISCHR(there.st_mode) or names_descriptor(target, fd)


def names_descriptor(target, fd: int) -> bool:
    """Whether `target` is the path of descriptor `fd` of this process (/proc/self/fd/N, /dev/fd/N, /dev/stdout),
    directly or through symbolic links."""
    folders = {"/dev/fd"}  # (a device folder on macOS; a link to /proc/self/fd on Linux)
    for own in ("/proc/self/fd", "/proc/thread-self/fd", "/dev/fd"):
        folders.add(os.path.realpath(own))
    path = os.path.abspath(os.fspath(target))
    for _ in range(40):  # (the kernel's limit on links followed)
        folder, name = os.path.split(path)
        folder = os.path.realpath(folder)
        if name == str(fd) and folder in folders:
            return True
        path = os.path.join(folder, name)
        if not os.path.islink(path):
            return False
        path = os.path.join(folder, os.readlink(path))  # (a relative link is read from its own folder)
    return False
