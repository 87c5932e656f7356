"""Keras layers the backbones use (imports Keras: only loaded when a model is built)."""
from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="retrainer")
class ChannelNormalisation(keras.layers.Layer):
    """``(x[..., order] - mean) / std`` per channel, on raw RGB 0..255 input.

    With ``channels="BGR"`` the channels are reversed first (the "caffe" mode of
    ``keras.applications``: ResNet50, VGG16/19 expect BGR minus the ImageNet mean).
    """

    def __init__(self, mean: Any, std: Any, channels: str = "RGB", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)]
        self.std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)]
        if channels not in ("RGB", "BGR"):
            raise ValueError(f"channels must be 'RGB' or 'BGR', not {channels!r}")
        self.channels = channels

    def call(self, x: Any) -> Any:
        from keras import ops

        if self.channels == "BGR":
            x = ops.flip(x, axis=-1)
        scale = ops.convert_to_tensor([1.0 / s for s in self.std], dtype=x.dtype)
        offset = ops.convert_to_tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=x.dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "std": self.std,
                "channels": self.channels}
