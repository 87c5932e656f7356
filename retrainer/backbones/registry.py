"""The one backbone registry: name -> :class:`BackboneSpec`.

A spec is plain data (input size, normalisation, feature size, where weights come from) plus
the dotted path of its builder, so listing backbones never imports TensorFlow. Builders return a
Keras model that maps raw RGB pixels (float32, 0..255, NHWC) to ``(N, feature_dim)``
bottlenecks, with the normalisation built in as its first layer.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import UnknownBackbone

Builder = Callable[["BackboneSpec", "str | None"], Any]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything about a backbone that preprocessing, caching and export need to agree on."""

    name: str
    input_size: tuple[int, int]  # (height, width)
    mean: float  # normalised = (pixel - mean) / std, built into the model
    std: float
    feature_dim: int
    builder: str | Builder = field(compare=False)  # "pkg.module:function" or a callable
    weights: str = "none"  # where pretrained weights come from, for people and for the cache id
    license: str = ""
    description: str = ""
    resize: str = "bilinear"  # how images are brought to input_size

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (the builder only by name)."""
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["builder"] = self.builder if isinstance(self.builder, str) else _qualname(self.builder)
        return data

    def build(self, weights: str | None = None) -> Any:
        """Build the Keras feature extractor; ``weights`` overrides the default source."""
        return _resolve(self.builder)(self, weights)


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
    """Look a backbone up by name; an unknown name gets the closest match as a hint."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
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
