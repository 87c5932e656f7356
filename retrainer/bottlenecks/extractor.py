"""The backbone's fastest forward pass: the Keras model frozen into a constant graph."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def make_forward(backbone: Any) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, 3) RGB 0..255 -> (N, feature_dim) float32, through a frozen graph.

    Freezing turns the weights into constants so TensorFlow folds BatchNorm into the
    convolutions; it is markedly faster than calling the Keras model.
    """
    from ..graph import GraphRunner, freeze

    return GraphRunner(freeze(backbone.model))
