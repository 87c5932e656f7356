"""retrainer: retrain an image classifier on your own folder of photos.

The public API is imported lazily, so ``import retrainer`` (and ``retrainer --help``) loads no
TensorFlow; each name below is resolved from its module on first use::

    import retrainer
    from retrainer import BackboneConfig, SourceConfig, TrainConfig
    result = retrainer.train(TrainConfig(source=SourceConfig(image_dir="photos"),
                                         backbone=BackboneConfig("efficientnet_lite0")))
    for r in retrainer.Classifier.load("retrained").label_paths(["photo.jpg"]):
        print(r.path, r.predictions[0].label)
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: public name -> "module:attribute"
_PUBLIC = {
    "train": "retrainer.training:train",
    "TrainResult": "retrainer.training:TrainResult",
    "evaluate": "retrainer.evaluation:evaluate_folder",
    "Classifier": "retrainer.predict:Classifier",
    "TrainConfig": "retrainer.config:TrainConfig",
    "SourceConfig": "retrainer.config:SourceConfig",
    "BackboneConfig": "retrainer.config:BackboneConfig",
    "ExtractionConfig": "retrainer.config:ExtractionConfig",
    "HeadConfig": "retrainer.config:HeadConfig",
    "AugmentConfig": "retrainer.config:AugmentConfig",
    "FineTuneConfig": "retrainer.config:FineTuneConfig",
    "ExportConfig": "retrainer.config:ExportConfig",
    "LabelConfig": "retrainer.config:LabelConfig",
    "BackboneSpec": "retrainer.backbones.registry:BackboneSpec",
    "list_backbones": "retrainer.backbones.registry:list_backbones",
    "register_backbone": "retrainer.backbones.registry:register",
    "RetrainerError": "retrainer.errors:RetrainerError",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    target = _PUBLIC.get(name)
    if target is None:
        raise AttributeError(f"module 'retrainer' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
