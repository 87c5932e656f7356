"""Optional second stage: fine-tune the top of the backbone together with the converged head.

Only the last ``layers`` weighted layers of the backbone are unfrozen, with a small learning
rate; BatchNormalization layers stay frozen and run in inference mode (their moving statistics
came from millions of images and a few hundred cannot re-estimate them). The epoch with the
lowest validation loss is kept, and "epoch 0" (the head alone) counts, so fine-tuning never
makes the validation loss worse than the head it started from.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .progress import bar
from .sources.base import ImageRecord
from ._tf_internals import import_tensorflow

log = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    trainable_layers: list[str] = field(default_factory=list)


def load_pixels_of(records: Sequence[ImageRecord], size: tuple[int, int], resize: str,
                   workers: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 pixels of ``records``, in order (uint8 keeps 224 px images at 150 kB)."""
    from .decoding import decode_stream, default_workers

    out = np.zeros((len(records), *size, 3), np.uint8)
    items = ((str(i), rec) for i, rec in enumerate(records))
    with bar(len(records), "decoding for fine-tuning") as progress:
        for key, rec, pixels, error in decode_stream(items, size, resize,
                                                     workers or default_workers(), window=64):
            if pixels is None:
                log.warning("fine-tuning: cannot decode %s (%s); using a blank image",
                            rec.display, error)
            else:
                out[int(key)] = pixels  # whole numbers in 0..255 (resized uint8)
            progress.update(1)
    return out


def unfreeze_top(backbone_model: Any, layers: int) -> list[Any]:
    """Make the last ``layers`` weighted, non-BatchNorm layers trainable; freeze the rest."""
    import keras

    weighted = [layer for layer in backbone_model.layers
                if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    for layer in backbone_model.layers:
        layer.trainable = False
    top = weighted[-layers:] if layers > 0 else []
    for layer in top:
        layer.trainable = True
    backbone_model.trainable = True  # the container; its frozen layers stay frozen
    for layer in backbone_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return top


def fine_tune(backbone_model: Any, head_model: Any, n_classes: int,
              x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              layers: int = 12, epochs: int = 5, learning_rate: float = 1e-4,
              batch_size: int = 16, label_smoothing: float = 0.1, flip: bool = False,
              seed: int = 0) -> FineTuneResult:
    """Fine-tune in place; on return both models hold the best epoch's weights."""
    import keras
    tf = import_tensorflow()

    top = unfreeze_top(backbone_model, layers)
    variables = [v for layer in top for v in layer.trainable_weights] + \
        list(head_model.trainable_weights)
    optimizer = keras.optimizers.Adam(learning_rate)
    smooth = float(label_smoothing)

    def forward(x: Any) -> Any:
        return head_model(backbone_model(x, training=False), training=False)

    @tf.function(reduce_retracing=True)
    def step(x: Any, y: Any) -> Any:
        if flip:
            x = tf.where(tf.random.uniform((tf.shape(x)[0], 1, 1, 1)) < 0.5,
                         tf.reverse(x, axis=[2]), x)
        target = tf.one_hot(y, n_classes) * (1.0 - smooth) + smooth / n_classes
        with tf.GradientTape() as tape:
            probs = forward(x)
            loss = -tf.reduce_mean(tf.reduce_sum(target * tf.math.log(probs + 1e-7), axis=1))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    predict_fn = tf.function(forward, reduce_retracing=True)

    def evaluate(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        probs = predict(predict_fn, x, batch_size * 2)
        ce = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
        return float((probs.argmax(1) == y).mean()), float(ce.mean())

    def snapshot() -> list[list[np.ndarray]]:
        return [[v.numpy() for v in layer.weights] for layer in top] + \
            [[v.numpy() for v in head_model.weights]]

    def restore(saved: list[list[np.ndarray]]) -> None:
        for layer, weights in zip(top, saved[:-1]):
            layer.set_weights(weights)
        head_model.set_weights(saved[-1])

    tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    has_val = len(x_val) > 0
    result = FineTuneResult(trainable_layers=[layer.name for layer in top])
    best_loss = evaluate(x_val, y_val)[1] if has_val else None
    best = snapshot()
    if has_val:
        log.info("fine-tuning %d layers (%s ... %s); validation loss before: %.4f",
                 len(top), top[0].name if top else "-", top[-1].name if top else "-", best_loss)
    with bar(epochs, "fine-tuning", unit="epoch") as progress:
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(x_train))
            losses = []
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                losses.append(float(step(tf.constant(x_train[idx], tf.float32),
                                         tf.constant(y_train[idx]))))
            row = {"epoch": epoch, "loss": float(np.mean(losses))}
            text = f"fine-tune epoch {epoch}/{epochs}: loss {row['loss']:.4f}"
            if has_val:
                row["val_accuracy"], row["val_loss"] = evaluate(x_val, y_val)
                text += (f", validation accuracy {row['val_accuracy']:.3f}, "
                         f"validation loss {row['val_loss']:.4f}")
                if row["val_loss"] < best_loss:
                    best_loss, result.best_epoch, best = row["val_loss"], epoch, snapshot()
            else:
                result.best_epoch, best = epoch, snapshot()
            result.history.append(row)
            log.info(text)
            progress.set_postfix_str(text.split(": ", 1)[1][:60])
            progress.update(1)
    restore(best)
    log.info("fine-tuning kept epoch %d of %d (0 = the head alone)", result.best_epoch, epochs)
    for layer in backbone_model.layers:
        layer.trainable = False
    return result


def predict(fn: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run ``fn`` over uint8 pixels in batches; (N, classes) float probabilities."""
    tf = import_tensorflow()

    if not len(x):
        return np.zeros((0, 0), np.float32)
    out = [fn(tf.constant(x[i:i + batch_size], tf.float32)).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)
