"""Backbones from ``keras.applications``: ImageNet weights come from the normal Keras download."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from ..errors import WeightsUnavailable

_APPS = {"inception_v3": "InceptionV3", "mobilenet_v2": "MobileNetV2"}
_NOTOP = {  # the files keras.applications downloads, for users who fetch them elsewhere
    "inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "mobilenet_v2": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
}


def build(spec: Any, weights: str | None) -> Any:
    """Feature model for ``spec``: raw RGB 0..255 in, pooled bottleneck out.

    ``weights``: None for ImageNet (downloaded once into ~/.keras/models), ``"random"``, or the
    path of a local weights file (e.g. ``inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5``).
    """
    import keras

    app = getattr(keras.applications, _APPS[spec.name])
    if weights in (None, "imagenet"):
        source = "imagenet"
    elif weights == "random":
        source = None
    else:
        if not os.path.isfile(weights):
            raise WeightsUnavailable(f"weights file '{weights}' does not exist.")
        source = weights
    height, width = spec.input_size
    inputs = keras.Input((height, width, 3), name="input")
    x = keras.layers.Rescaling(1.0 / spec.std, offset=-spec.mean / spec.std, name="preprocess")(inputs)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints download progress to stdout
            base = app(include_top=False, weights=source, input_shape=(height, width, 3),
                       pooling="avg")
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a failed download
        if source != "imagenet":
            raise WeightsUnavailable(f"cannot load weights '{weights}' for {spec.name}: {exc}",
                                     "Pass the notop weights file keras.applications uses.") from None
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsUnavailable(
            f"cannot download the ImageNet weights for {spec.name} (offline?): {reason}",
            f"Pass --weights FILE with a local copy of {_NOTOP[spec.name]}, or use "
            f"--architecture efficientnet_lite0, whose weights ship with retrainer.",
        ) from None
    outputs = base(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_features")
