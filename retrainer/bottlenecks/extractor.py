"""The backbone's fastest forward pass: the Keras model frozen into a constant graph."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..tfload import import_tensorflow


def graphs_dir() -> Path:
    """Where frozen backbone graphs are kept: in the cache dir, apart from any bottleneck dir.

    A frozen graph belongs to the backbone's weights, not to a data set, so every bottleneck
    dir (``--bottleneck-dir``) shares it, as retrain.py's ``--model_dir`` kept its graph apart
    from its ``--bottleneck_dir``: a new data set does not pay for freezing again.
    """
    from .cache import default_cache_dir

    return default_cache_dir() / "graphs"


def graph_path(cache_root: str | Path, backbone: Any, precision: str | None = None) -> Path:
    """Where the frozen graph of ``backbone`` at ``precision`` is kept under ``cache_root``."""
    tf = import_tensorflow()

    from .. import __version__

    ident = backbone.id_for(precision or backbone.precision)
    return Path(cache_root) / ident / f"frozen-graph-tf{tf.__version__}-r{__version__}.pb"


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


def make_forward(backbone: Any, cache_root: str | Path | None = None
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, 3) RGB 0..255 -> (N, feature_dim) float32, through a frozen graph.

    Freezing turns the weights into constants so TensorFlow folds BatchNorm into the
    convolutions; it is markedly faster than calling the Keras model.
    """
    from ..graph import GraphRunner

    return GraphRunner(backbone_graph(backbone, cache_root))
