"""``create_backbone``: the single way from a name (or a .keras path) to a ready model."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..precision import PRECISIONS  # noqa: F401 - re-exported
from .registry import BackboneSpec, get_spec, is_backbone

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    """A built backbone and the id its bottlenecks are cached under."""

    spec: BackboneSpec
    model: Any
    weights_digest: str
    precision: str = "fp32"

    @property
    def cache_id(self) -> str:
        """Changes whenever anything that changes a bottleneck changes."""
        return self.id_for(self.precision)

    def id_for(self, precision: str) -> str:
        """The cache id of this backbone run at ``precision``."""
        fields = {k: v for k, v in self.spec.to_dict().items()
                  if k not in ("description", "license", "builder")}
        blob = json.dumps([fields, self.weights_digest, precision], sort_keys=True)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.spec.name)
        return f"{safe}-{precision}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

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
                    feature_layer: str | None = None, precision: str = "fp32") -> Backbone:
    """Build the feature model for ``architecture`` and check its output size."""
    from ..precision import check_precision

    check_precision(precision)
    spec = (architecture if isinstance(architecture, BackboneSpec)
            else resolve_spec(architecture, feature_layer))
    log.info("building backbone %s (weights: %s)", spec.name, weights or spec.weights)
    model = spec.build(weights)
    out_dim = int(model.output_shape[-1])
    if out_dim != spec.feature_dim:
        raise ValueError(f"backbone {spec.name} gives {out_dim} features, spec says {spec.feature_dim}")
    return Backbone(spec=spec, model=model, weights_digest=weights_digest(model),
                    precision=precision)


def weights_digest(model: Any) -> str:
    """SHA-256 over every weight array: the same weights give the same cache id."""
    h = hashlib.sha256()
    for w in model.weights:
        arr = w.numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
