"""onnxruntime sessions: provider choice (CUDA only when it really loads), quiet logging, options."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxlipError, RuntimeFailure

ort.set_default_logger_severity(4)  # a missing CUDA library is expected; we check get_providers() ourselves

DEVICES = ("auto", "cpu", "cuda")
# The rounding margin (rounding.py) assumes direct summation of non-negative products. TF32 would round them to
# 10-bit mantissas; cuDNN's exhaustive search (onnxruntime's default) may pick FFT or Winograd convolutions,
# whose transforms subtract. "DEFAULT" keeps cuDNN on its implicit-GEMM convolution and its fallback engines.
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"})
# Results that certify nothing (the scores, which only rank and steer routes; the sampled differences) may use
# cuDNN's heuristic engines: the scores run took 11 ms instead of 106 on an H200 (benchmarks/README.md, "GPU").
CUDA_PROVIDER_FAST = ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"})
_cuda_works: bool | None = None  # learned on the first attempt, so a broken CUDA setup costs one try
_preload_lock = threading.Lock()  # the CUDA libraries are preloaded once, by one thread, with its prints caught
_preloaded = False


# Graph optimisation levels, chosen per use (measured on ResNet-18 companions, benchmarks/README.md):
# "none" builds fastest and runs the path-norm companion as fast as the others (one-shot path-norms, fed-weight
# sessions); "fold" (BASIC) adds constant folding, which evaluates once, while the session is built, every stream
# that depends on constants only (no session uses it now: samplers, too, gain nothing from it); ENABLE_ALL adds
# ~0.1-0.2 s of layout work per ResNet-18 session, more than one-shot graphs gain from it.
LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "fold": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# onnxruntime's default execution order schedules a guarded graph's leaf reductions (range_guard's minima) late,
# and its memory planner then grows quadratically in the depth (a 1000-layer chain's companion session took 8.6 s
# to build, 0.8 s in priority order). Priority order ran ResNet-18's companion ~10% slower and built a deep scores
# graph slower (12 s against 7 s), so only large guarded graphs get it (CompiledCompanion). Re-measured in session
# 13, with the guard's nodes next to what they read (near_producers): path_norm of a 1000-layer width-16 chain takes
# 2.0 s in priority order and 2.3 s without (300 layers: 0.42 / 0.39 s), so the threshold stays.
PRIORITY_ORDER_ABOVE = 4000  # nodes
# onnxruntime's memory-reuse planner grows about quadratically with the node count: a 1000-layer MLP's guarded
# thorough companion (29k nodes) built in 10.9 s with it and 3.5 s without; a 1000-branch Concat's 28k nodes in
# 9.1 s against 2.6 s. Deep graphs whose tensors are small anyway are built without it (no_reuse_planning).
NO_REUSE_ABOVE = 4000  # nodes
NO_REUSE_BYTES = 256 << 20  # when every tensor of the analysed graph, 16 bytes per entry, fits this


def no_reuse_planning(graph, nodes: int) -> bool:
    """Whether to build a session of `nodes` nodes over the IR `graph` without memory-reuse planning: deep graphs
    only, and only where keeping every intermediate alive costs little (16 bytes per entry of every IR tensor:
    the companion keeps a few float32 temporaries per tensor)."""
    if nodes <= NO_REUSE_ABOVE:
        return False
    entries = sum(int(np.prod(shape)) for shape in graph.shapes.values())
    return 16 * entries <= NO_REUSE_BYTES


def near_producers(nodes: list, start: int) -> list:
    """The nodes with each of nodes[start:] (measurements appended to a graph: range_guard's) moved to right after
    the last producer of its inputs; the others keep their order. onnxruntime builds a session more slowly the
    farther a node sits from its inputs' producers (a 1000-layer MLP's thorough guarded companion: 3.6 s with its
    4000 measuring nodes at the end, 1.6 s placed so)."""
    if start >= len(nodes):
        return list(nodes)
    anchor = {t: i for i, node in enumerate(nodes[:start]) for t in node.output}
    after: dict[int, list] = {}
    for node in nodes[start:]:
        at = max((anchor.get(t, -1) for t in node.input), default=-1)
        anchor.update(dict.fromkeys(node.output, at))
        after.setdefault(at, []).append(node)
    out = after.get(-1, [])
    for i, node in enumerate(nodes[:start]):
        out.append(node)
        out.extend(after.get(i, ()))
    return out


def session_options(
    external: dict[str, np.ndarray] | None = None,
    level: str = "none",
    prepack: bool = True,
    spin: bool = True,
    priority: bool = False,
    mem_reuse: bool = True,
) -> ort.SessionOptions:
    """Quiet options; `external` constants are handed over in memory (no protobuf copy). `prepack=False` skips
    onnxruntime's weight prepacking (ConvTranspose, Gemm), which costs a one-shot graph more than it saves.
    `spin=False`: the session's worker threads sleep when idle instead of spinning. Sessions used in turn (the
    metric engine's, the samplers) need it: each session has its own threads, and threads spinning after one
    session's run take the 2 cores from the next session's run (measured: 25 ms runs became 50-95 ms)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = LEVELS[level]
    if priority:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not mem_reuse:  # (NO_REUSE_ABOVE)
        opts.enable_mem_reuse = False
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if external:
        names = list(external)
        opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(external[n]) for n in names])
    return opts


def cuda_possible(device: str) -> bool:
    """Whether make_session(..., device) may put the session on CUDA (before building it)."""
    return device == "cuda" or (
        device == "auto" and _cuda_works is not False and "CUDAExecutionProvider" in ort.get_available_providers()
    )


def make_session(
    model: onnx.ModelProto | bytes | str,
    device: str = "auto",
    external: dict[str, np.ndarray] | None = None,
    level: str = "none",
    prepack: bool = True,
    spin: bool = True,
    certified: bool = True,
    priority: bool = False,
    mem_reuse: bool = True,
) -> tuple[ort.InferenceSession, str]:
    """A session on the requested device; returns (session, "cuda" | "cpu"). `external`: constants the model
    declares as external data, passed in memory. onnxruntime copies them into the session while it loads the
    model (documented for AddExternalInitializers), so the dict is emptied once the session exists: the
    caller's arrays are released instead of being held twice. `certified=False`: the results certify nothing,
    and CUDA may use faster convolution engines (CUDA_PROVIDER_FAST)."""
    if device not in DEVICES:
        raise OnnxlipError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()  # str: a file onnxruntime reads
    global _cuda_works
    wants_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
    # enable_fallback=0: onnxruntime's own fallback print()s "EP Error ... retrying" to stdout (the CLI's JSON
    # channel) and retries with the CUDA provider's default options (TF32, exhaustive convolution search), which
    # would void the rounding margin; a failed build raises instead and is handled here. Nothing in a session build
    # then writes to Python's sys.stdout, so no build redirects it: contextlib.redirect_stdout swaps the process-wide
    # sys.stdout and, entered by two threads at once, left it replaced by a StringIO.
    if wants_cuda and _cuda_works is not False:
        try:
            _preload_cuda_libraries()
            sess = ort.InferenceSession(
                data,
                session_options(external, level, prepack, spin, priority, mem_reuse),
                providers=[CUDA_PROVIDER if certified else CUDA_PROVIDER_FAST, "CPUExecutionProvider"],
                enable_fallback=0,
            )
            _cuda_works = sess.get_providers()[0] == "CUDAExecutionProvider"
            if _cuda_works:
                _release(external)
                return sess, "cuda"
            if device == "auto":  # the provider did not load and onnxruntime built the session on the CPU
                _release(external)  # itself: use it (a second build of a ResNet-18 companion costs ~50 ms)
                return sess, "cpu"
        except Exception:  # noqa: BLE001 - CUDA libraries missing: fall back below
            _cuda_works = False
    if device == "cuda":
        raise OnnxlipError("--device cuda was requested, but onnxruntime's CUDA provider does not load on this machine")
    try:
        sess = ort.InferenceSession(
            data,
            session_options(external, level, prepack, spin, priority, mem_reuse),
            providers=["CPUExecutionProvider"],
            enable_fallback=0,
        )
    except Exception as exc:  # noqa: BLE001
        raise RuntimeFailure(f"onnxruntime could not build the graph: {exc}") from None
    _release(external)
    return sess, "cpu"


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels (`pip install onnxruntime-gpu[cuda,cudnn]`), so
    that the CUDA provider loads without LD_LIBRARY_PATH or a prior `import torch`; once per process. onnxruntime
    print()s a line for each library that fails to load: stdout is the CLI's JSON channel, so it is caught, under a
    lock (contextlib.redirect_stdout swaps the process-wide sys.stdout: two threads entering it at once would leave
    a StringIO there), and only on this first attempt. A missing library only means the provider will not load,
    which make_session detects."""
    global _preloaded
    if _preloaded:
        return
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    with _preload_lock:
        if _preloaded:
            return
        if preload is not None:
            # its print()s resolve `print` in its module's globals first: a silent one there catches them without
            # swapping the process-wide sys.stdout (another thread's lines written meanwhile were lost)
            names = getattr(preload, "__globals__", None)
            if names is not None:
                names["print"] = _silent_print
            try:
                with contextlib.suppress(Exception):
                    preload()
            finally:
                if names is not None and names.get("print") is _silent_print:
                    del names["print"]
        _preloaded = True


def _silent_print(*args, **kwargs) -> None:
    """print() for onnxruntime.preload_dlls (see _preload_cuda_libraries)."""


def _release(external: dict[str, np.ndarray] | None) -> None:
    if external:
        external.clear()


DIRECT_RUN_ABOVE = 512  # fed inputs


def run(session: ort.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """session.run, with onnxruntime's failures (shapes or attributes it rejects only at run time, as in an
    inconsistent model) as OnnxlipError."""
    try:
        core = getattr(session, "_sess", None)
        if len(feeds) > DIRECT_RUN_ABOVE and core is not None:
            # InferenceSession.run first looks each input up in a list of the fed names: 0.12 s a run with the
            # 4000 inputs of a 1000-layer MLP's companion, growing with their square; its core reports missing
            # or misshapen inputs itself
            return core.run(names or [o.name for o in session.get_outputs()], feeds, None)
        return session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes (Fail, InvalidArgument, ...)
        raise RuntimeFailure(
            f"onnxruntime could not run the analysis graph (is the model consistent?): {exc}"
        ) from None


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a small helper model on the CPU."""
    sess, _ = make_session(model, "cpu")
    return run(sess, None, feeds)
