"""A user's own ``.keras`` model as the backbone (RGB 0..255 in, preprocessing built in)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import WeightsUnavailable
from .registry import BackboneSpec


def spec_for_file(path: str | Path, feature_layer: str | None = None) -> BackboneSpec:
    """Inspect a ``.keras`` file and describe it as a backbone."""
    model = load_features(path, feature_layer)
    height, width = model.input_shape[1:3]
    if height is None or width is None:
        raise WeightsUnavailable(f"'{path}' has no fixed input size.",
                                 "Save the model with a fixed input shape, e.g. (224, 224, 3).")
    name = f"file:{Path(path).name}" + (f"@{feature_layer}" if feature_layer else "")
    return BackboneSpec(
        name=name, input_size=(int(height), int(width)), mean=0.0, std=1.0,
        feature_dim=int(model.output_shape[-1]),
        builder=lambda spec, weights: model,
        weights=str(Path(path).resolve()),
        description="user model; preprocessing is the model's own",
    )


def load_features(path: str | Path, feature_layer: str | None = None) -> Any:
    import keras

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"model file '{path}' does not exist.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - many failure kinds for a bad file
        raise WeightsUnavailable(f"cannot load '{path}' as a Keras model: {exc}") from None
    if feature_layer:
        try:
            out = model.get_layer(feature_layer).output
        except ValueError:
            names = ", ".join(layer.name for layer in model.layers[-8:])
            raise WeightsUnavailable(f"'{path}' has no layer {feature_layer!r}.",
                                     f"Its last layers are: {names}.") from None
        model = keras.Model(model.inputs, out)
    if len(model.output_shape) == 4:
        out = keras.layers.GlobalAveragePooling2D(name="avg_pool")(model.output)
        model = keras.Model(model.inputs, out)
    if len(model.output_shape) != 2:
        raise WeightsUnavailable(f"'{path}' gives output shape {model.output_shape}, "
                                 "expected (batch, features).",
                                 "Pick the feature layer with --feature-layer NAME.")
    return model
