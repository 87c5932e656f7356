"""The backbone's fastest forward pass: the Keras model frozen into a constant graph."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    ``frozen`` (what exports build on), ``tflite`` (its TFLite conversion) or ``optimized``
    (what extraction runs; its name carries the machine's kind too, since the rewrites depend
    on the CPU)."""
    tf = import_tensorflow()

    from .. import __version__

    ident = backbone.id_for(precision or backbone.precision)
    machine = f"-{machine_tag()}" if kind == "optimized" else ""
    suffix = ".tflite" if kind == "tflite" else ".pb"
    return (Path(cache_root) / ident
            / f"{kind}-graph{machine}-tf{tf.__version__}-r{__version__}{suffix}")


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
    """The fp32 backbone as TFLite (:func:`retrainer.export.tflite_model`), converted once and
    kept under ``cache_root``; exports append their head to it
    (:func:`retrainer.export.tflite_with_head`). ``frozen``: its fp32 frozen graph, when the
    caller has it loaded already."""
    from ..export import tflite_model
    from ..graph import kept_file

    def load(data: bytes) -> bytes:
        if data[4:8] != b"TFL3":
            raise ValueError("not a TFLite model")
        return data

    def convert() -> bytes:
        graph = frozen if frozen is not None else backbone_graph(backbone, cache_root, "fp32")
        return tflite_model(graph)

    return kept_file(graph_path(cache_root, backbone, "fp32", kind="tflite"), convert, bytes,
                     load, "TFLite backbone")


def make_forward(backbone: Any, cache_root: str | Path | None = None
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, 3) RGB 0..255 -> (N, feature_dim) float32, through a frozen graph.

    Freezing turns the weights into constants so TensorFlow folds BatchNorm into the
    convolutions; it is markedly faster than calling the Keras model. With ``cache_root``
    the graph is also kept as the sessions would rewrite it (:func:`forward_graph`).
    """
    from ..graph import GraphRunner

    graph_def, optimized = forward_graph(backbone, cache_root)
    return GraphRunner(graph_def, optimized=optimized)


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
