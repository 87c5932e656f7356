"""A user's own ``.keras`` model as the backbone (RGB 0..255 in, preprocessing built in).

The file is loaded with ``safe_mode=True`` (no Lambda code, no unsafe deserialisation): a model
file from elsewhere cannot run code when loaded. Its cache id covers the model's configuration
as well as its weights, so re-saving it with a changed layer config is a new backbone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from ..errors import WeightsUnavailable
from ..files import not_a_file
from .registry import BackboneSpec

log = logging.getLogger(__name__)

CONFIG_MAX_BYTES = 64 << 20  # a config.json larger than this is not a model we will read


def spec_for_file(path: str | Path, feature_layer: str | None = None) -> BackboneSpec:
    """Inspect a ``.keras`` file and describe it as a backbone."""
    model, config_digest = _load(path, feature_layer)
    if not feature_layer and (scores := _class_scores_layer(model)):
        before = model.layers[-2].name if len(model.layers) > 1 else None
        log.warning("'%s' ends in a classifier (%s): the head would train on its class scores, "
                    "not on image features. Pass --feature-layer NAME%s to use a layer before "
                    "it.", path, scores, f" (e.g. {before!r})" if before else "")
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
        preprocess="in-model",
        options=(("config_sha256", config_digest),),
    )


def _class_scores_layer(model: Any) -> str | None:
    """The model's last layer, described, where it turns features into class scores (a Dense
    or Activation layer with a softmax or sigmoid): a whole classifier, not a feature
    extractor."""
    last = model.layers[-1] if model.layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if type(last).__name__ == "Softmax":
        activation = "softmax"
    if activation not in ("softmax", "sigmoid"):
        return None
    return f"layer {last.name!r}, {activation} over {int(model.output_shape[-1])} outputs"


def load_features(path: str | Path, feature_layer: str | None = None) -> Any:
    return _load(path, feature_layer)[0]


def config_digest(path: str | Path, model: Any = None) -> str:
    """SHA-256 of the model's configuration, canonicalised (key order and spacing ignored).

    For a ``.keras`` archive, its ``config.json``; otherwise (a legacy ``.h5`` file) the
    loaded ``model``'s own config.
    """
    path = Path(path)
    config: Any = None
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > CONFIG_MAX_BYTES:
                raise WeightsUnavailable(f"'{path}' has a {info.file_size}-byte config.json.",
                                         "Is this a Keras model file?")
            config = json.loads(archive.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, UnicodeDecodeError):
        config = None
    if config is None:
        if model is None:
            raise WeightsUnavailable(f"cannot read the model configuration of '{path}'.")
        config = model.get_config()
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _load_error(path: Path, exc: Exception) -> WeightsUnavailable:
    full = str(exc)
    if "Lambda" in full or "safe_mode" in full or "unsafe" in full.lower():
        return WeightsUnavailable(
            f"'{path}' holds Python code (a Lambda layer or an unsafe object); it is not loaded, "
            "as that code could do anything.",
            "Rebuild the model from plain Keras layers.")
    located = re.search(r"Could not locate (?:class|function) '?([\w.]+)'?", full)
    if located:
        return WeightsUnavailable(
            f"'{path}' needs {located.group(1)!r}, which is not part of Keras.",
            "Save the model with plain Keras layers only.")
    reason = full.splitlines()[0][:300] if full else type(exc).__name__
    return WeightsUnavailable(f"cannot load '{path}' as a Keras model: {reason}",
                              "Is this a Keras 3 '.keras' model file?")


def _load(path: str | Path, feature_layer: str | None = None) -> tuple[Any, str]:
    import keras

    path = Path(path)
    if why := not_a_file(path):
        raise WeightsUnavailable(f"model file '{path}' {why}.")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise WeightsUnavailable(f"'{path}' is not a Keras model file (a .keras file is a zip "
                                 "archive).", "Save the model with model.save('NAME.keras').")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - many failure kinds for a bad file
        raise _load_error(path, exc) from None
    digest = config_digest(path, model)
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
                                 "Pick the feature layer with feature_layer=NAME.")
    return model, digest
