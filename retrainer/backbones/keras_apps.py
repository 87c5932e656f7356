"""Backbones from ``keras.applications``: ImageNet weights come from the normal Keras download
(into ``~/.keras/models``) on first use, or from a local file with ``--weights FILE``.

Every spec says, as data, which application it is (``options["app"]``), how its input is
normalised (keras.applications' ``preprocess_input`` modes: ``tf``, ``caffe``, ``torch``, or
``in-model`` for the families whose model normalises by itself), and which file Keras
downloads (``source.file``), which is also the file an offline user passes with ``--weights``.
This module registers the family's backbones (see the end of the file).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import WeightsUnavailable
from ..files import not_a_file
from .registry import BackboneSpec, WeightsSource, normalisation_layer, register, spec_for_mode


def build(spec: Any, weights: str | None) -> Any:
    """Feature model for ``spec``: raw RGB 0..255 in, pooled bottleneck out.

    ``weights``: None for ImageNet (downloaded once into ~/.keras/models), ``"random"``, or the
    path of a local weights file (the ``*_notop.h5`` file keras.applications downloads).
    """
    import keras

    app = getattr(keras.applications, spec.option("app"))
    if weights in (None, "imagenet"):
        source = "imagenet"
    elif weights == "random":
        source = None
    else:
        if why := not_a_file(weights):
            raise WeightsUnavailable(f"weights file '{weights}' {why}.",
                                     f"Pass the file keras.applications uses: {spec.source.file}.")
        source = weights
    height, width = spec.input_size
    inputs = keras.Input((height, width, 3), name="input")
    x = normalisation_layer(spec)(inputs)
    kwargs = dict(spec.option("kwargs", ()))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints download progress to stdout
            base = app(include_top=False, weights=source, input_shape=(height, width, 3),
                       pooling="avg", **kwargs)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a failed download
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if source != "imagenet":
            raise WeightsUnavailable(f"cannot load weights '{weights}' for {spec.name}: {reason}",
                                     f"Pass the file keras.applications uses: {spec.source.file}.") from None
        raise WeightsUnavailable(
            f"cannot download the ImageNet weights for {spec.name} (offline?): {reason}",
            f"Pass weights=FILE with a local copy of {spec.source.file}, or use "
            f"backbone=efficientnet_lite0, whose weights ship with retrainer.",
        ) from None
    outputs = base(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_features")


def pretrained_weights_file(spec: BackboneSpec) -> Path | None:
    """The Keras download, when it is already on disk (None otherwise: nothing is fetched)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = Path(home) / "models" / spec.source.file
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- the family

_DOWNLOADED = "keras.applications ImageNet (downloaded on first use)"


def _app(name: str, app: str, size: int, mode: str, dim: int, notop: str, gflops: float,
         about: str, **kwargs: Any) -> BackboneSpec:
    options: tuple[tuple[str, Any], ...] = (("app", app),)
    if kwargs:
        options += (("kwargs", tuple(sorted(kwargs.items()))),)
    return register(BackboneSpec(
        name=name, input_size=(size, size), feature_dim=dim,
        builder="retrainer.backbones.keras_apps:build",
        weights=_DOWNLOADED,
        source=WeightsSource("keras", file=notop),
        license="Apache-2.0" if not name.startswith("convnext") else "Apache-2.0 (code), MIT (weights)",
        gflops=gflops, options=options,
        description=f"{about}, {gflops:g} GFLOPs per image.",
        **spec_for_mode(mode),
    ))


_TF = "_weights_tf_dim_ordering_tf_kernels_notop.h5"

_app("inception_v3", "InceptionV3", 299, "tf", 2048, f"inception_v3{_TF}", 11.42,
     "Inception-v3, the retrain.py default: accurate")
_app("mobilenet_v2", "MobileNetV2", 224, "tf", 1280,
     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", 0.60,
     "MobileNetV2 1.0: small and fast")
_app("mobilenet_v3_large", "MobileNetV3Large", 224, "in-model", 960,
     "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", 0.43,
     "MobileNetV3-Large 1.0 (75.6 % ImageNet top-1): small and fast", include_preprocessing=True)
_app("resnet50", "ResNet50", 224, "caffe", 2048, f"resnet50{_TF}", 7.71,
     "ResNet-50 (74.9 % ImageNet top-1), BGR input minus the ImageNet mean")
_app("xception", "Xception", 299, "tf", 2048, f"xception{_TF}", 16.71,
     "Xception (79.0 % ImageNet top-1)")
_app("vgg16", "VGG16", 224, "caffe", 512, f"vgg16{_TF}", 30.69,
     "VGG16 (71.3 % ImageNet top-1): large and slow, 512-d")
_app("vgg19", "VGG19", 224, "caffe", 512, f"vgg19{_TF}", 39.02,
     "VGG19 (71.3 % ImageNet top-1): large and slow, 512-d")
for _v, _size, _dim, _gf, _top1 in (("b0", 224, 1280, 1.43, 78.7), ("b1", 240, 1280, 2.39, 79.8),
                                      ("b2", 260, 1408, 3.39, 80.5), ("b3", 300, 1536, 6.02, 82.0),
                                      ("s", 384, 1280, 16.73, 83.9)):
    _app(f"efficientnetv2_{_v}", f"EfficientNetV2{_v.upper()}", _size, "in-model", _dim,
         f"efficientnetv2-{_v}_notop.h5", _gf,
         f"EfficientNetV2-{_v.upper()} ({_top1} % ImageNet top-1)", include_preprocessing=True)
_app("convnext_tiny", "ConvNeXtTiny", 224, "in-model", 768, "convnext_tiny_notop.h5", 8.91,
     "ConvNeXt-Tiny (81.3 % ImageNet top-1)", include_preprocessing=True)
_app("convnext_small", "ConvNeXtSmall", 224, "in-model", 768, "convnext_small_notop.h5", 17.37,
     "ConvNeXt-Small (82.3 % ImageNet top-1)", include_preprocessing=True)
