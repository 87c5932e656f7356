"""``create_backbone``: the single way from a name (or a .keras path) to a ready model."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..errors import RetrainerError
from ..images import PIXELS_VERSION
from .composite import check_weights, is_composite
from .registry import BackboneSpec, get_spec, is_backbone

log = logging.getLogger(__name__)

#: Test-time augmentation folded into the backbone: ``none``, or ``flip`` (the bottleneck is the
#: mean of the features of the image and of its left-right mirror; two backbone passes).
TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> str:
    """The TTA mode, or a one-line error saying which ones exist."""
    if tta not in TTA_MODES:
        raise RetrainerError(f"unknown test-time augmentation {tta!r}.",
                             f"Use one of: {', '.join(TTA_MODES)}.")
    return tta


class Backbone:
    """A built backbone and the id its bottlenecks are cached under.

    ``model`` may be built lazily (see ``create_backbone(lazy=True)``): a warm run whose
    bottlenecks and frozen graph are all cached never needs the Keras model. With ``tta`` other
    than ``none`` the model already applies it (see :func:`mirror_average`), and ``spec``
    records it in its options (``tta``), so metadata written from the spec says so.
    """

    def __init__(self, spec: BackboneSpec, model: Any, weights_digest: str,
                 precision: str = "fp32", build: Callable[[], Any] | None = None,
                 tta: str = "none") -> None:
        self.spec = spec
        self._model = model
        self._build = build
        self.weights_digest = weights_digest
        self.precision = precision
        self.tta = check_tta(tta)
        # What runs it during extraction (retrainer.runtimes); bf16 off TensorFlow is cached
        # apart, since each runtime rounds differently.
        self.runtime = "tensorflow"

    @property
    def model(self) -> Any:
        if self._model is None and self._build is not None:
            self._model, self._build = self._build(), None
        return self._model

    @property
    def is_built(self) -> bool:
        return self._model is not None

    @property
    def cache_id(self) -> str:
        """Changes whenever anything that changes a bottleneck changes."""
        from ..runtimes import cache_tag

        return self.id_for(cache_tag(self.precision, self.runtime))

    def id_for(self, precision: str) -> str:
        """The cache id of this backbone run at ``precision``."""
        fields = self.spec.identity()
        parts: list[Any] = [fields, self.weights_digest, precision, PIXELS_VERSION]
        if self.tta != "none":  # plain backbones keep the ids they always had
            parts.append({"tta": self.tta})
        blob = json.dumps(parts, sort_keys=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.spec.name)
        tta = "" if self.tta == "none" else f"-tta{self.tta}"
        return f"{safe}-{precision}{tta}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def model_for(self, precision: str | None = None) -> Any:
        """The Keras model computing in ``precision`` (default: the backbone's own)."""
        from ..precision import with_precision

        return with_precision(self.model, precision or self.precision)


def resolve_spec(architecture: str, feature_layer: str | None = None) -> BackboneSpec:
    """A registered name, or the path of a ``.keras`` file."""
    if is_backbone(architecture) or not (architecture.endswith(".keras") or Path(architecture).exists()):
        return get_spec(architecture)
    from .keras_file import spec_for_file

    return spec_for_file(architecture, feature_layer)


def create_backbone(architecture: str | BackboneSpec, weights: str | None = None,
                    feature_layer: str | None = None, precision: str = "fp32",
                    lazy: bool = False, tta: str = "none") -> Backbone:
    """Build the feature model for ``architecture`` and check its output size.

    With ``lazy``, when the weights come from a file whose digest is already known (same path,
    size and modification time), the Keras model is only built if ``.model`` is used.

    ``tta="flip"`` makes the model itself average the features of each image and of its
    left-right mirror, so everything built from it (the cache, the frozen graph, every export,
    ``label``) applies the same averaging. Its cache id differs from the plain backbone's.
    """
    from ..precision import check_precision

    check_precision(precision)
    check_tta(tta)
    spec = (architecture if isinstance(architecture, BackboneSpec)
            else resolve_spec(architecture, feature_layer))
    if is_composite(spec):
        check_weights(spec, weights)
    memo_key = _weights_file_key(spec, weights) if lazy else None
    plain = spec
    if tta != "none":
        spec = replace(spec, options=(*((k, v) for k, v in spec.options if k != "tta"),
                                      ("tta", tta)))
    digests = _DigestMemo()
    if memo_key and (digest := digests.get(memo_key)):
        log.info("backbone %s: weights known, model built only if needed", spec.name)
        return Backbone(spec, None, digest, precision, tta=tta,
                        build=lambda: _with_tta(_build(plain, weights), tta))
    model = _build(plain, weights)
    digest = model_digest(plain, model)  # of the weights: the same with or without TTA
    if memo_key:
        digests.put(memo_key, digest)
    return Backbone(spec, _with_tta(model, tta), digest, precision, tta=tta)


def _with_tta(model: Any, tta: str) -> Any:
    return mirror_average(model) if tta == "flip" else model


def mirror_average(model: Any) -> Any:
    """A model computing ``(f(x) + f(x mirrored left-right)) / 2`` for the feature model ``f``.

    Both halves run as one batch of 2N through ``f`` (one copy of the weights in every graph
    built from it, one call per batch); the two halves of its output are then averaged.
    """
    import keras

    ops = keras.ops
    inputs = keras.Input(model.input_shape[1:], name="input")
    both = ops.concatenate([inputs, ops.flip(inputs, axis=2)], axis=0)  # NHWC: W is axis 2
    features = model(both)
    dim = int(model.output_shape[-1])
    pairs = ops.reshape(features, (2, -1, dim))
    outputs = ops.mean(pairs, axis=0)
    return keras.Model(inputs, outputs, name=f"{model.name}_mirror_average")


def _build(spec: BackboneSpec, weights: str | None) -> Any:
    log.info("building backbone %s (weights: %s)", spec.name, weights or spec.weights)
    model = spec.build(weights)
    out_dim = int(model.output_shape[-1])
    if out_dim != spec.feature_dim:
        raise ValueError(f"backbone {spec.name} gives {out_dim} features, spec says {spec.feature_dim}")
    return model


def _weights_file(spec: BackboneSpec, weights: str | None) -> Path | list[Path] | None:
    """The file the weights are read from, when that is known without building.

    For a spec's default weights, its builder's module says (``pretrained_weights_file``);
    a family without that hook is simply never built lazily. A composite backbone reads one
    file per part (a list).
    """
    if weights is not None and str(weights).lower() == "random":
        return None  # new random weights every build
    if weights is not None:
        return Path(weights) if Path(weights).is_file() else None
    if spec.name.startswith("file:"):
        return Path(spec.weights) if Path(spec.weights).is_file() else None
    module = spec.builder_module()
    hook = getattr(module, "pretrained_weights_file", None) if module is not None else None
    return hook(spec) if hook is not None else None


def _weights_file_key(spec: BackboneSpec, weights: str | None) -> str | None:
    try:
        found = _weights_file(spec, weights)
        if found is None:
            return None
        paths = found if isinstance(found, list) else [found]
        files = [[str(p.resolve()), (st := p.resolve().stat()).st_size, st.st_mtime_ns]
                 for p in paths]
    except (OSError, RuntimeError):
        return None
    from .. import __version__

    fields = {k: v for k, v in spec.to_dict().items() if k not in ("description", "license")}
    # One file keeps the key it always had: [fields, path, size, mtime, version].
    where = files[0] if len(files) == 1 and not isinstance(found, list) else [files]
    blob = json.dumps([fields, *where, __version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _DigestMemo:
    """weights-file key -> weights digest, in the user cache dir (a lost file costs one build)."""

    def __init__(self) -> None:
        from ..files import default_cache_dir

        self.path = default_cache_dir() / "weights-digests.json"

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> str | None:
        value = self._read().get(key)
        return value if isinstance(value, str) else None

    def put(self, key: str, digest: str) -> None:
        from ..files import atomic_write

        data = self._read()
        data[key] = digest
        text = json.dumps(data, indent=1, sort_keys=True)
        try:
            atomic_write(self.path, lambda fh: fh.write(text.encode()))
        except OSError as exc:
            log.debug("cannot keep the weights digest (%s)", exc)


def model_digest(spec: BackboneSpec, model: Any) -> str:
    """The weights digest, with the model's configuration folded in when the spec carries
    one (``config_sha256``: a user's model file, whose layers the registry does not fix)."""
    digest = weights_digest(model)
    config = spec.option("config_sha256")
    if config:
        digest = hashlib.sha256(f"{digest}:{config}".encode()).hexdigest()
    return digest


def weights_digest(model: Any) -> str:
    """SHA-256 over every weight array: the same weights give the same cache id."""
    h = hashlib.sha256()
    for w in model.weights:
        arr = w.numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
