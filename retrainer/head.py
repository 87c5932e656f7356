"""The new softmax head, trained on cached bottlenecks in seconds.

The features of a whole data set fit in memory, so the head is trained by a plain TensorFlow
loop: one compiled function runs a whole epoch of mini-batch Adam steps over tensors already on
the device (Keras ``fit`` spent most of its time in per-batch Python overhead). The features are
standardised with the training set's mean and deviation, which lets one learning rate suit every
backbone; the standardisation is folded into the exported Dense layer, so the export is still a
single softmax layer on the raw bottleneck.
"""
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
    """The trained head (a Keras model for export), its per-epoch history and the kept epoch."""

    model: Any
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    kernel: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities for bottlenecks ``x`` (N, dim), without Keras overhead."""
        return softmax(np.asarray(x, np.float32) @ self.kernel + self.bias)


def softmax(logits: np.ndarray) -> np.ndarray:
    if not logits.size:
        return logits.astype(np.float32)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def build_head(feature_dim: int, n_classes: int, cfg: HeadConfig | None = None) -> Any:
    """One softmax layer on the bottleneck (dropout only matters in training, so it is not here)."""
    import keras

    inputs = keras.Input((feature_dim,), name="bottleneck")
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="final_layer")(inputs)
    return keras.Model(inputs, outputs, name="head")


#: Small sets use smaller batches so that every epoch still has this many Adam steps (with a
#: few hundred images and batches of 64, early stopping saw too few updates per epoch).
MIN_STEPS_PER_EPOCH = 8
MIN_BATCH = 16


def batch_size_for(cfg: HeadConfig, n_train: int) -> int:
    """``cfg.batch_size``, or smaller for small sets (never below 16 or above ``n_train``)."""
    wanted = max(MIN_BATCH, math.ceil(n_train / MIN_STEPS_PER_EPOCH))
    return int(max(1, min(cfg.batch_size, wanted, n_train)))


def epochs_for(cfg: HeadConfig, n_train: int) -> int:
    if cfg.steps:
        per_epoch = max(1, math.ceil(n_train / batch_size_for(cfg, n_train)))
        return max(1, math.ceil(cfg.steps / per_epoch))
    return max(1, cfg.epochs)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights: 'balanced' gives every class the same total weight."""
    if mode == "none":
        return np.ones(n_classes, np.float32)
    if mode != "balanced":
        raise ValueError(f"unknown class weighting {mode!r} (use 'balanced' or 'none')")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w.astype(np.float32)


def train_head(x_train: np.ndarray, y_train: np.ndarray, n_classes: int, cfg: HeadConfig,
               x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
               summaries_dir: str | None = None) -> HeadResult:
    """Train with Adam; validate after each epoch and keep the best epoch's weights.

    The best epoch has the lowest validation loss (on a few dozen validation images accuracy
    moves in coarse steps and picks under-trained epochs); training stops ``cfg.patience``
    epochs after the last improvement. Without validation, the last epoch is kept.
    """
    import tensorflow as tf

    x_train = np.asarray(x_train, np.float32)
    y_train = np.asarray(y_train, np.int64)
    has_val = x_val is not None and y_val is not None and len(x_val) > 0
    dim = x_train.shape[1]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6 * (1.0 + np.abs(mean))
    std[std < 1e-6] = 1.0

    def norm(x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32)

    tf.random.set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    weights = class_weights(y_train, n_classes, cfg.class_weight)
    xt = tf.constant(norm(x_train))
    yt = tf.constant(y_train)
    sample_w = tf.constant(weights[y_train])
    kernel = tf.Variable(tf.zeros((dim, n_classes)), name="kernel")
    bias = tf.Variable(tf.zeros((n_classes,)), name="bias")
    params = [kernel, bias]
    adam = _Adam(params, cfg.learning_rate)
    smooth = float(cfg.label_smoothing)
    keep = 1.0 - float(cfg.dropout)
    l2 = float(cfg.l2)
    batch = batch_size_for(cfg, len(x_train))
    epochs = epochs_for(cfg, len(x_train))
    max_steps = cfg.steps or 0

    def loss_fn(x: Any, y: Any, w: Any) -> Any:
        logits = tf.matmul(x, kernel) + bias
        target = tf.one_hot(y, n_classes) * (1.0 - smooth) + smooth / n_classes
        ce = tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)
        return tf.reduce_sum(ce * w) / tf.reduce_sum(w) + l2 * tf.reduce_sum(tf.square(kernel))

    @tf.function(reduce_retracing=True)
    def run_epoch(order: Any, n_steps: Any, seed: Any) -> Any:
        total = tf.constant(0.0)
        n = tf.shape(order)[0]
        for i in tf.range(n_steps):
            idx = order[i * batch: tf.minimum((i + 1) * batch, n)]
            xb, yb, wb = tf.gather(xt, idx), tf.gather(yt, idx), tf.gather(sample_w, idx)
            if keep < 1.0:
                mask = tf.random.stateless_uniform(tf.shape(xb), seed=tf.stack([seed, tf.cast(i, tf.int64)])) < keep
                xb = tf.where(mask, xb / keep, 0.0)
            with tf.GradientTape() as tape:
                loss = loss_fn(xb, yb, wb)
            adam.apply(tape.gradient(loss, params))
            total += loss
        return total / tf.cast(n_steps, tf.float32)

    def scores(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        logits = x @ kernel.numpy() + bias.numpy()
        p = softmax(logits)
        ce = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))
        return float((p.argmax(1) == y).mean()), float(ce.mean())

    xv = norm(x_val) if has_val else None
    yv = np.asarray(y_val, np.int64) if has_val else None
    xtr_np = xt.numpy()
    writer = _summary_writer(summaries_dir)
    history: list[dict[str, float]] = []
    best_score, best_epoch = None, 0
    best = [kernel.numpy(), bias.numpy()]
    since_best = 0
    steps_per_epoch = math.ceil(len(x_train) / batch)
    steps_done = 0
    with bar(epochs, "training head", unit="epoch") as progress:
        for epoch in range(1, epochs + 1):
            n_steps = steps_per_epoch
            if max_steps:
                n_steps = min(n_steps, max_steps - steps_done)
            order = tf.constant(rng.permutation(len(x_train)))
            train_loss = float(run_epoch(order, tf.constant(n_steps), tf.constant(epoch, tf.int64)))
            steps_done += n_steps
            train_acc, _ = scores(xtr_np, y_train)
            row = {"epoch": epoch, "accuracy": train_acc, "loss": train_loss}
            if has_val:
                row["val_accuracy"], row["val_loss"] = scores(xv, yv)
                score = -row["val_loss"]
                text = (f"epoch {epoch}/{epochs}: train accuracy {train_acc:.3f}, validation "
                        f"accuracy {row['val_accuracy']:.3f}, validation loss {row['val_loss']:.4f}")
            else:
                score = float(epoch)
                text = f"epoch {epoch}/{epochs}: train accuracy {train_acc:.3f}, loss {train_loss:.4f}"
            history.append(row)
            log.info(text)
            if writer is not None:
                _write_summaries(writer, row, kernel, bias, epoch)
            if best_score is None or score > best_score:
                best_score, best_epoch, since_best = score, epoch, 0
                best = [kernel.numpy(), bias.numpy()]
            else:
                since_best += 1
            progress.set_postfix_str(text.split(": ", 1)[1][:60])
            progress.update(1)
            if has_val and cfg.patience and since_best >= cfg.patience:
                log.info("validation loss has not improved for %d epochs; stopping", since_best)
                break
            if max_steps and steps_done >= max_steps:
                break
    if writer is not None:
        writer.close()
    log.info("kept the weights of epoch %d of %d", best_epoch, len(history))
    # Fold the standardisation into the layer: ((x - m) / s) @ W + b == x @ (W / s) + (b - (m / s) @ W)
    w_raw = (best[0] / std[:, None]).astype(np.float32)
    b_raw = (best[1] - (mean / std) @ best[0]).astype(np.float32)
    model = build_head(dim, n_classes)
    model.get_layer("final_layer").set_weights([w_raw, b_raw])
    return HeadResult(model=model, history=history, best_epoch=best_epoch, kernel=w_raw, bias=b_raw)


class _Adam:
    """Adam on a few tf.Variables (Keras optimizers want Keras variables)."""

    def __init__(self, params: list, lr: float, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-7) -> None:
        import tensorflow as tf

        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, b1, b2, eps
        self.m = [tf.Variable(tf.zeros_like(p)) for p in params]
        self.v = [tf.Variable(tf.zeros_like(p)) for p in params]
        self.t = tf.Variable(0.0)

    def apply(self, grads: list) -> None:
        import tensorflow as tf

        self.t.assign_add(1.0)
        corr = tf.sqrt(1.0 - self.b2 ** self.t) / (1.0 - self.b1 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.assign(self.b1 * m + (1.0 - self.b1) * g)
            v.assign(self.b2 * v + (1.0 - self.b2) * tf.square(g))
            p.assign_sub(self.lr * corr * m / (tf.sqrt(v) + self.eps))


def _summary_writer(summaries_dir: str | None) -> Any:
    if not summaries_dir:
        return None
    try:
        import tensorboard  # noqa: F401 - tf.summary needs it for scalars and histograms
    except ImportError:
        from .errors import RetrainerError

        raise RetrainerError("--summaries-dir needs the tensorboard package.",
                             "Install it: pip install 'retrainer[tensorboard]'.") from None
    import tensorflow as tf

    return tf.summary.create_file_writer(summaries_dir)


def _write_summaries(writer: Any, row: dict[str, float], kernel: Any, bias: Any, epoch: int) -> None:
    """TensorBoard scalars (loss, accuracy, validation) and weight histograms for one epoch."""
    import tensorflow as tf

    with writer.as_default(step=epoch):
        for name, value in row.items():
            if name != "epoch":
                tf.summary.scalar(f"head/{name}", value)
        tf.summary.histogram("head/kernel", kernel)
        tf.summary.histogram("head/bias", bias)
    writer.flush()
