"""Composite backbones: ``a+b`` is one backbone whose bottleneck is ``a``'s then ``b``'s.

``--architecture efficientnet_lite0+efficientnet_lite2`` names registered backbones joined by
``+`` (two or more, in the user's order: it fixes the layout of the bottleneck). The composite is
built as one Keras model, so it freezes into one graph and every export and runtime takes it as
any other backbone:

- its input is raw RGB 0..255 at the largest part's input size (by area; the first on a tie),
  resized as that part resizes;
- each part whose input size differs gets a bilinear ``Resizing`` layer to its own size (as the
  image pipeline resizes), then runs with its own normalisation, which stays inside it;
- the outputs are concatenated, so the spec's normalisation is the identity, its feature size
  and GFLOPs are the sums of the parts'.

The spec is made on demand from the parts' specs (:func:`composite_spec`), never registered, so
``retrainer backbones`` lists only real backbones. Its cache id differs from every part's (its
name, and the parts' identities folded into its weights digest).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import RetrainerError, UnknownBackbone
from .registry import BackboneSpec, WeightsSource

SEPARATOR = "+"
BUILDER = "retrainer.backbones.composite:build"


def is_composite_name(name: str) -> bool:
    return SEPARATOR in name


def is_composite(spec: BackboneSpec) -> bool:
    return spec.builder == BUILDER


def composite_spec(name: str) -> BackboneSpec:
    """The spec of ``a+b[+c...]`` from its registered parts (a one-line error otherwise)."""
    from .registry import get_spec

    names = name.split(SEPARATOR)
    if any(not n.strip() for n in names):
        raise UnknownBackbone(f"backbone {name!r} has an empty part.",
                              "Join registered backbone names with '+', e.g. "
                              "efficientnet_lite0+efficientnet_lite2.")
    names = [n.strip() for n in names]
    if len(set(names)) != len(names):
        raise UnknownBackbone(f"backbone {name!r} names a part twice.",
                              "Concatenate different backbones: the same one twice adds nothing.")
    parts = []
    for part in names:
        try:
            parts.append(get_spec(part))
        except UnknownBackbone as exc:
            raise UnknownBackbone(f"unknown backbone {part!r} in {name!r}.", exc.hint) from None
    return _spec(SEPARATOR.join(names), parts)


def _spec(name: str, parts: list[BackboneSpec]) -> BackboneSpec:
    largest = max(parts, key=lambda s: s.input_size[0] * s.input_size[1])  # first on a tie
    sources = [s.source for s in parts]
    offline = all(s.offline for s in sources)
    licenses = list(dict.fromkeys(s.license for s in parts if s.license))
    layout = ", ".join(f"{s.name} ({s.feature_dim})" for s in parts)
    return BackboneSpec(
        name=name,
        input_size=largest.input_size,
        mean=0.0, std=1.0, channels="RGB", preprocess="in-model",
        feature_dim=sum(s.feature_dim for s in parts),
        builder=BUILDER,
        weights=" + ".join(s.weights for s in parts),
        license=" + ".join(licenses),
        description=f"concatenated bottlenecks of {layout}, in that order; each part resizes "
                    "the input to its own size and normalises it itself",
        resize=largest.resize,
        gflops=round(sum(s.gflops for s in parts), 4),
        source=WeightsSource(
            "composite",
            requirement=", ".join(s.requirement for s in sources if s.requirement),
            file=" + ".join(s.describe() for s in sources),
            offline=offline),
        options=(("parts", tuple(s.name for s in parts)),
                 # The parts' input sizes and normalisations change the bottleneck too: the
                 # factory folds this into the weights digest, hence into the cache id.
                 ("config_sha256", _parts_digest(parts))),
    )


def _parts_digest(parts: list[BackboneSpec]) -> str:
    blob = json.dumps([p.identity() for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def parts_of(spec: BackboneSpec) -> list[BackboneSpec]:
    from .registry import get_spec

    return [get_spec(n) for n in spec.option("parts", ())]


def check_weights(spec: BackboneSpec, weights: str | None) -> None:
    """A composite takes each part's own weights (or ``random``), never one file."""
    if weights is not None and str(weights).lower() != "random":
        raise RetrainerError(f"weights=FILE is not supported with the composite backbone "
                             f"{spec.name!r}.",
                             "Each part uses its own pretrained weights: leave weights=FILE out, "
                             "or train on one backbone with its weights file.")


def build(spec: BackboneSpec, weights: str | None) -> Any:
    """Registry entry point: raw RGB 0..255 at ``spec.input_size`` -> the concatenated parts."""
    import keras

    from .factory import _build

    check_weights(spec, weights)
    parts = parts_of(spec)
    height, width = spec.input_size
    inputs = keras.Input((height, width, 3), name="input")
    outputs = []
    for i, part in enumerate(parts):
        model = _build(part, weights)  # checks the part's feature size
        # A name of its own in the composite (two parts' models may share a default name).
        model = keras.Model(model.input, model.output, name=f"part{i}_{_safe(part.name)}")
        x = inputs
        if tuple(part.input_size) != (height, width):
            x = keras.layers.Resizing(*part.input_size, interpolation="bilinear",
                                      name=f"resize{i}_{_safe(part.name)}")(x)
        outputs.append(model(x))
    features = keras.layers.Concatenate(axis=-1, name="concat")(outputs)
    return keras.Model(inputs, features, name=_safe(spec.name))


def pretrained_weights_file(spec: BackboneSpec) -> list[Path] | None:
    """Every part's local weights file (the factory's lazy memo), or None if one is unknown."""
    from .factory import _weights_file

    files = []
    for part in parts_of(spec):
        path = _weights_file(part, None)
        if path is None:
            return None
        files.extend(path if isinstance(path, list) else [path])
    return files


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_" else "_" for c in name)
