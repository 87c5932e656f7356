"""The new softmax head, trained on cached bottlenecks (seconds, not minutes)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import HeadConfig
from .progress import bar

log = logging.getLogger(__name__)


@dataclass
class HeadResult:
    model: Any
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def build_head(feature_dim: int, n_classes: int, cfg: HeadConfig) -> Any:
    """Dropout on the bottleneck, then one L2-regularised softmax layer."""
    import keras

    inputs = keras.Input((feature_dim,), name="bottleneck")
    x = keras.layers.Dropout(cfg.dropout, name="bottleneck_dropout")(inputs) if cfg.dropout else inputs
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 else None
    outputs = keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg,
                                 name="final_layer")(x)
    return keras.Model(inputs, outputs, name="head")


def epochs_for(cfg: HeadConfig, n_train: int) -> int:
    if cfg.steps:
        per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
        return max(1, math.ceil(cfg.steps / per_epoch))
    return max(1, cfg.epochs)


def train_head(x_train: np.ndarray, y_train: np.ndarray, n_classes: int, cfg: HeadConfig,
               x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> HeadResult:
    """Train with Adam; validate after each epoch and keep the best epoch's weights.

    The best epoch has the lowest validation loss (on a few dozen validation images accuracy
    moves in coarse steps and picks under-trained epochs); without validation, the last epoch.
    """
    import keras

    keras.utils.set_random_seed(cfg.seed)
    model = build_head(x_train.shape[1], n_classes, cfg)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=loss,
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    epochs = epochs_for(cfg, len(x_train))
    has_val = x_val is not None and len(x_val) > 0
    y_train_1h = keras.utils.to_categorical(y_train, n_classes)
    val = (x_val, keras.utils.to_categorical(y_val, n_classes)) if has_val else None
    keeper = _KeepBest(has_val, epochs)
    model.fit(x_train, y_train_1h, batch_size=cfg.batch_size, epochs=epochs,
              validation_data=val, shuffle=True, verbose=0, callbacks=[keeper])
    keeper.close()
    if keeper.best_weights is not None:
        model.set_weights(keeper.best_weights)
    log.info("kept the weights of epoch %d of %d", keeper.best_epoch, epochs)
    return HeadResult(model=model, history=keeper.history, best_epoch=keeper.best_epoch)


def _keras_callback_base() -> type:
    import keras

    return keras.callbacks.Callback


class _KeepBest(_keras_callback_base()):  # type: ignore[misc]
    def __init__(self, has_val: bool, epochs: int) -> None:
        super().__init__()
        self.has_val = has_val
        self.epochs = epochs
        self.best: float | None = None
        self.best_weights: list[np.ndarray] | None = None
        self.best_epoch = 0
        self.history: list[dict[str, float]] = []
        self.progress = bar(epochs, "training head", unit="epoch")

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, "accuracy": float(logs.get("accuracy", 0.0)),
               "loss": float(logs.get("loss", 0.0))}
        if self.has_val:
            row["val_accuracy"] = float(logs.get("val_accuracy", 0.0))
            row["val_loss"] = float(logs.get("val_loss", 0.0))
            score = -row["val_loss"]
            text = (f"epoch {epoch + 1}/{self.epochs}: train accuracy {row['accuracy']:.3f}, "
                    f"validation accuracy {row['val_accuracy']:.3f}, "
                    f"validation loss {row['val_loss']:.4f}")
        else:
            score = float(epoch)
            text = (f"epoch {epoch + 1}/{self.epochs}: train accuracy {row['accuracy']:.3f}, "
                    f"loss {row['loss']:.4f}")
        self.history.append(row)
        if self.best is None or score > self.best:
            self.best, self.best_epoch = score, epoch + 1
            self.best_weights = self.model.get_weights()
        log.info(text)
        self.progress.set_postfix_str(text.split(": ", 1)[1][:60])
        self.progress.update(1)

    def close(self) -> None:
        self.progress.close()
