"""The backbone's fastest forward pass: the Keras model frozen into a constant graph, run on
TensorFlow or on another runtime (:mod:`retrainer.runtimes`) from a conversion kept beside it."""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from .._tf_internals import import_tensorflow

log = logging.getLogger(__name__)


def graphs_dir() -> Path:
    """Where frozen backbone graphs are kept: in the cache dir, apart from any bottleneck dir.

    A frozen graph belongs to the backbone's weights, not to a data set, so every bottleneck
    dir (``--bottleneck-dir``) shares it, as retrain.py's ``--model_dir`` kept its graph apart
    from its ``--bottleneck_dir``: a new data set does not pay for freezing again.
    """
    from ..files import default_cache_dir

    return default_cache_dir() / "graphs"


def graph_path(cache_root: str | Path, backbone: Any, precision: str | None = None,
               kind: str = "frozen") -> Path:
    """Where the ``kind`` graph of ``backbone`` at ``precision`` is kept under ``cache_root``:
    ``frozen`` (what exports build on), ``tflite`` (its TFLite conversion), ``onnx`` (its
    tf2onnx conversion) or ``optimized`` (what extraction runs on TensorFlow; its name carries
    the machine's kind too, since the rewrites depend on the CPU)."""
    from .. import __version__
    from ..onnx_export import tf2onnx_version

    ident = backbone.id_for(precision or backbone.precision)
    machine = f"-{machine_tag()}" if kind == "optimized" else ""
    tool = f"-tf2onnx{tf2onnx_version()}" if kind == "onnx" else ""
    suffix = {"tflite": ".tflite", "onnx": ".onnx"}.get(kind, ".pb")
    return (Path(cache_root) / ident
            / f"{kind}-graph{machine}-tf{tensorflow_version()}{tool}-r{__version__}{suffix}")


def tensorflow_version() -> str:
    """The installed TensorFlow's version, read from its package metadata where it can be, so
    that a runner on another runtime finds its kept conversion without starting TensorFlow."""
    return _installed_tensorflow_version() or str(import_tensorflow().__version__)


@functools.lru_cache(maxsize=1)
def _installed_tensorflow_version() -> str | None:
    from importlib import metadata

    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos",
                 "tf-nightly", "tf-nightly-cpu"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return version.replace(".dev", "-dev")  # tf-nightly spells tf.__version__ so
    return None


def machine_tag() -> str:
    """A short digest of what the CPU rewrites of :func:`retrainer.graph.optimize` depend on:
    the processor's kind and features, and whether oneDNN is on."""
    import hashlib
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    seen = "|".join([platform.machine(), platform.processor(), flags,
                     os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")])
    return hashlib.sha256(seen.encode()).hexdigest()[:8]


def backbone_graph(backbone: Any, cache_root: str | Path | None = None,
                   precision: str | None = None) -> Any:
    """The frozen GraphDef of ``backbone`` at ``precision``: (N, H, W, 3) -> (N, dim) float32.

    With ``cache_root`` the graph is frozen once and read back on later runs (seconds saved
    per run for large backbones).
    """
    from ..graph import cached_freeze, freeze

    precision = precision or backbone.precision
    if cache_root is None:
        return freeze(backbone.model_for(precision))
    return cached_freeze(graph_path(cache_root, backbone, precision),
                         lambda: backbone.model_for(precision))


def backbone_tflite(backbone: Any, cache_root: str | Path, frozen: Any = None) -> bytes:
    """The fp32 backbone as TFLite (:func:`retrainer.graph.tflite_model`), converted once and
    kept under ``cache_root``; exports append their head to it
    (:func:`retrainer.export.tflite_with_head`). ``frozen``: its fp32 frozen graph, when the
    caller has it loaded already."""
    def graph() -> Any:
        return frozen if frozen is not None else backbone_graph(backbone, cache_root, "fp32")

    return kept_tflite(graph_path(cache_root, backbone, "fp32", kind="tflite"), graph)


def kept_tflite(path: str | Path, frozen: Any) -> bytes:
    """The TFLite model kept at ``path``; converted from the graph ``frozen()`` gives (and
    kept) when missing or damaged."""
    from ..graph import kept_file, tflite_model

    def load(data: bytes) -> bytes:
        if data[4:8] != b"TFL3":
            raise ValueError("not a TFLite model")
        return data

    return kept_file(path, lambda: tflite_model(frozen()), bytes, load, "TFLite backbone")


def backbone_onnx(backbone: Any, cache_root: str | Path) -> Path:
    """The fp32 backbone converted to ONNX by tf2onnx (opset 17), once, kept under
    ``cache_root``: the file's path. Its outputs match the frozen graph's to round-off."""
    from ..graph import kept_file

    path = graph_path(cache_root, backbone, "fp32", kind="onnx")

    def convert() -> bytes:
        from ..onnx_export import graph_onnx

        return graph_onnx(backbone_graph(backbone, cache_root, "fp32"))

    def load(data: bytes) -> bytes:
        if not data.startswith(b"\x08"):  # an ONNX ModelProto starts with its ir_version
            raise ValueError("not an ONNX model")
        return data

    kept_file(path, convert, bytes, load, "ONNX backbone")
    return path


def make_forward(backbone: Any, cache_root: str | Path | None = None,
                 runtime: str | None = None, threads: int | None = None) -> Any:
    """(N, H, W, 3) RGB 0..255 -> (N, feature_dim) float32: a
    :class:`retrainer.runner.LaneRunner` of the backbone on ``runtime``.

    ``runtime``: a name from :data:`retrainer.runtimes.RUNTIMES`, ``auto`` (the fastest here,
    measured once and remembered: :func:`.runtime_choice.choose`), or None: the backbone's
    own (``backbone.runtime``, else TensorFlow). On TensorFlow the frozen graph runs
    (kept rewritten when ``cache_root`` is given: :func:`forward_graph`); elsewhere its
    conversion, kept beside it. ``threads`` caps the cores used (a Spark worker's share).
    """
    precision = backbone.precision
    runtime = resolve_runtime(backbone, cache_root, runtime)
    if runtime == "tensorflow":
        from ..graph import GraphRunner

        graph_def, optimized = forward_graph(backbone, cache_root)
        return GraphRunner(graph_def, optimized=optimized, threads=threads)
    if cache_root is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="retrainer-") as tmp:
            return _runtime_runner(backbone, tmp, runtime, precision, threads)
    return _runtime_runner(backbone, cache_root, runtime, precision, threads)


def resolve_runtime(backbone: Any, cache_root: str | Path | None = None,
                    runtime: str | None = None) -> str:
    """The runtime :func:`make_forward` runs ``backbone`` on (``auto`` resolved)."""
    from ..runtimes import check_runtime

    runtime = check_runtime(runtime or getattr(backbone, "runtime", None) or "tensorflow",
                            backbone.precision)
    if runtime == "auto":
        from .runtime_choice import choose

        runtime = choose(backbone, cache_root)
    return runtime


def forward_model(backbone: Any, cache_root: str | Path, runtime: str | None = None
                  ) -> tuple[str, str, bytes]:
    """What :func:`make_forward` would run, as ``(runtime, precision, model bytes)`` for another
    process (a Spark worker: :func:`retrainer.runner.runner_from_bytes`, or a
    :class:`retrainer.graph.GraphRunner` of the graph's bytes), read from the kept files: no
    session or runtime is started here."""
    runtime = resolve_runtime(backbone, cache_root, runtime)
    if runtime == "tensorflow":
        graph_def, _ = forward_graph(backbone, cache_root)
        return runtime, "fp32", graph_def.SerializeToString()
    if runtime == "litert":
        return runtime, "fp32", backbone_tflite(backbone, cache_root)
    if runtime == "onnxruntime":
        return runtime, "fp32", backbone_onnx(backbone, cache_root).read_bytes()
    return runtime, backbone.precision, _openvino_source(backbone, cache_root).read_bytes()


def forward_files(backbone: Any, cache_root: str | Path, runtime: str) -> list[Path]:
    """The kept files :func:`make_forward` reads to run ``backbone`` on ``runtime`` (resolved;
    not TensorFlow): where they exist, it converts nothing and starts no TensorFlow."""
    if runtime == "openvino":
        kind = "onnx" if importlib.util.find_spec("tf2onnx") is not None else "frozen"
    else:
        kind = {"litert": "tflite", "onnxruntime": "onnx"}[runtime]
    return [graph_path(cache_root, backbone, "fp32", kind=kind)]


def _openvino_source(backbone: Any, cache_root: str | Path) -> Path:
    # OpenVINO runs the ONNX conversion at the backbone's precision (Lite0: 10% faster in fp32
    # and 20% in bf16 than from the frozen graph); without tf2onnx it reads the fp32 frozen
    # graph itself.
    (source,) = forward_files(backbone, cache_root, "openvino")
    if source.suffix == ".onnx":
        return backbone_onnx(backbone, cache_root)
    backbone_graph(backbone, cache_root, "fp32")
    return source


def _runtime_runner(backbone: Any, cache_root: str | Path, runtime: str, precision: str,
                    threads: int | None) -> Any:
    """The backbone's kept conversion on ``runtime`` (not TensorFlow); files read by the time
    it returns."""
    from ..runner import LiteRTRunner, ONNXRunner, OpenVINORunner

    if runtime == "litert":
        return LiteRTRunner(content=backbone_tflite(backbone, cache_root), threads=threads)
    if runtime == "onnxruntime":
        return ONNXRunner(backbone_onnx(backbone, cache_root).read_bytes(), threads=threads)
    return OpenVINORunner(_openvino_source(backbone, cache_root), threads=threads,
                          precision=precision)


def forward_graph(backbone: Any, cache_root: str | Path | None = None) -> tuple[Any, bool]:
    """The graph :func:`make_forward` runs, and whether it is already optimized.

    With ``cache_root`` on a CPU-only machine, that is the frozen graph rewritten once by
    :func:`retrainer.graph.optimize` and kept next to it, so no run after the first pays for
    the rewriting; without, the plain frozen graph, which each session rewrites itself.
    """
    from ..graph import cpu_only, kept_graph, optimize

    if cache_root is None or not cpu_only():
        return backbone_graph(backbone, cache_root), False
    path = graph_path(cache_root, backbone, kind="optimized")
    try:
        return kept_graph(path, lambda: optimize(backbone_graph(backbone, cache_root)),
                          "optimized graph"), True
    except Exception as exc:  # noqa: BLE001 - grappler's errors have no common kind
        log.warning("cannot optimize the backbone graph ahead (%s); each session will", exc)
        return backbone_graph(backbone, cache_root), False
