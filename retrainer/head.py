"""The new softmax head, trained on cached bottlenecks in seconds.

The features of a whole data set fit in memory and the layer is small, so the head is trained
by mini-batch Adam in NumPy (see :class:`_SoftmaxSGD`); TensorFlow is only needed to export it.
The features are standardised with the training set's mean and deviation, which lets one
learning rate suit every backbone; the standardisation is folded into the exported layer, so
the export is still a single softmax layer on the raw bottleneck.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import HeadConfig
from .progress import bar
from ._tf_internals import import_tensorflow

log = logging.getLogger(__name__)


@dataclass
class HeadResult:
    """The trained layer (on raw bottlenecks), its per-epoch history and the kept epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    kernel: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        """The layer as a Keras model (built on first use: fine-tuning trains it further)."""
        if self._model is None:
            self._model = build_head(self.kernel.shape[0], self.kernel.shape[1])
            self._model.get_layer("final_layer").set_weights([self.kernel, self.bias])
        return self._model

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
    x_train = np.asarray(x_train, np.float32)
    y_train = np.asarray(y_train, np.int64)
    has_val = x_val is not None and y_val is not None and len(x_val) > 0
    dim = x_train.shape[1]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6 * (1.0 + np.abs(mean))
    std[std < 1e-6] = 1.0

    def norm(x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32)

    rng = np.random.default_rng(cfg.seed)
    xt = norm(x_train)
    weights = class_weights(y_train, n_classes, cfg.class_weight)
    smooth = float(cfg.label_smoothing)
    targets = (np.eye(n_classes, dtype=np.float32)[y_train] * (1.0 - smooth)
               + smooth / n_classes).astype(np.float32)
    sgd = _SoftmaxSGD(dim, n_classes, cfg, rng)
    batch = batch_size_for(cfg, len(x_train))
    epochs = epochs_for(cfg, len(x_train))
    max_steps = cfg.steps or 0

    xv = norm(x_val) if has_val else None
    yv = np.asarray(y_val, np.int64) if has_val else None
    # Training accuracy is reported on (up to) a fixed few thousand training images, without
    # dropout: scoring all of a large set after every epoch cost as much as the epoch itself.
    shown = np.sort(rng.permutation(len(x_train))[:TRAIN_SCORE_SAMPLE])
    x_shown, y_shown = xt[shown], y_train[shown]
    writer = _summary_writer(summaries_dir)
    history: list[dict[str, float]] = []
    best_score, best_epoch = None, 0
    best = sgd.weights()
    since_best = 0
    steps_per_epoch = math.ceil(len(x_train) / batch)
    steps_done = 0
    with bar(epochs, "training head", unit="epoch") as progress:
        for epoch in range(1, epochs + 1):
            n_steps = steps_per_epoch
            if max_steps:
                n_steps = min(n_steps, max_steps - steps_done)
            train_loss = sgd.epoch(xt, targets, weights[y_train], rng.permutation(len(x_train)),
                                   batch, n_steps)
            steps_done += n_steps
            train_acc, _ = sgd.score(x_shown, y_shown)
            row = {"epoch": epoch, "accuracy": train_acc, "loss": train_loss}
            if has_val:
                row["val_accuracy"], row["val_loss"] = sgd.score(xv, yv)
                score = -row["val_loss"]
                text = (f"epoch {epoch}/{epochs}: train accuracy {train_acc:.3f}, validation "
                        f"accuracy {row['val_accuracy']:.3f}, validation loss {row['val_loss']:.4f}")
            else:
                score = float(epoch)
                text = f"epoch {epoch}/{epochs}: train accuracy {train_acc:.3f}, loss {train_loss:.4f}"
            history.append(row)
            log.info(text)
            if writer is not None:
                _write_summaries(writer, row, sgd.kernel, sgd.bias, epoch)
            if best_score is None or score > best_score:
                best_score, best_epoch, since_best = score, epoch, 0
                best = sgd.weights()
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
    return HeadResult(history=history, best_epoch=best_epoch, kernel=w_raw, bias=b_raw)


#: How many training images the per-epoch training accuracy is measured on.
TRAIN_SCORE_SAMPLE = 4096


class _SoftmaxSGD:
    """Mini-batch Adam on one softmax layer, in NumPy with hand-written gradients.

    The layer is small (features x classes), so each step is a few dozen tiny array operations:
    NumPy runs them several times faster than a TensorFlow loop (whose per-op overhead and
    per-element dropout random numbers dominated), and training needs no TensorFlow at all.
    Loss: class-weighted softmax cross-entropy (with label smoothing in the targets) plus
    ``l2 * sum(kernel**2)``; inverted dropout on the standardised features.
    """

    def __init__(self, dim: int, n_classes: int, cfg: HeadConfig, rng: np.random.Generator,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7) -> None:
        self.kernel = np.zeros((dim, n_classes), np.float32)
        self.bias = np.zeros(n_classes, np.float32)
        self.m = [np.zeros_like(self.kernel), np.zeros_like(self.bias)]
        self.v = [np.zeros_like(self.kernel), np.zeros_like(self.bias)]
        self.lr, self.b1, self.b2, self.eps = float(cfg.learning_rate), b1, b2, eps
        self.l2 = float(cfg.l2)
        self.t = 0
        self.rng = rng
        # Dropout masks come from random bits (the default keep probability, 1/2) or random
        # bytes compared with a threshold: several times cheaper than random floats. The keep
        # probability is then a multiple of 1/256, and the rescaling uses that exact value.
        keep = 1.0 - float(cfg.dropout)
        self.threshold = min(256, max(1, round(keep * 256))) if keep < 1.0 else 256
        self.scale = 256.0 / self.threshold

    def weights(self) -> list[np.ndarray]:
        return [self.kernel.copy(), self.bias.copy()]

    def _dropout_mask(self, shape: tuple[int, int]) -> np.ndarray:
        n = shape[0] * shape[1]
        if self.threshold == 128:
            bits = np.unpackbits(np.frombuffer(self.rng.bytes((n + 7) // 8), np.uint8))
            return bits[:n].reshape(shape)
        return np.frombuffer(self.rng.bytes(n), np.uint8).reshape(shape) < self.threshold

    def epoch(self, x: np.ndarray, targets: np.ndarray, sample_w: np.ndarray, order: np.ndarray,
              batch: int, n_steps: int) -> float:
        """``n_steps`` Adam steps over ``order``; the mean training loss."""
        total = 0.0
        for i in range(n_steps):
            idx = order[i * batch: (i + 1) * batch]
            xb = x[idx]
            if self.threshold < 256:
                np.multiply(xb, self._dropout_mask(xb.shape), out=xb)
            total += self._step(xb, targets[idx], sample_w[idx])
        return total / max(1, n_steps)

    def _step(self, xb: np.ndarray, tb: np.ndarray, wb: np.ndarray) -> float:
        """One Adam step on the batch ``xb`` (already masked); the batch's loss."""
        loss, grad_kernel, grad_bias = self.gradients(xb, tb, wb)
        self.t += 1
        step = self.lr * math.sqrt(1.0 - self.b2 ** self.t) / (1.0 - self.b1 ** self.t)
        for p, g, m, v in ((self.kernel, grad_kernel, self.m[0], self.v[0]),
                           (self.bias, grad_bias, self.m[1], self.v[1])):
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * np.square(g)
            p -= (step * m) / (np.sqrt(v) + self.eps)
        return loss

    def gradients(self, xb: np.ndarray, tb: np.ndarray, wb: np.ndarray
                  ) -> tuple[float, np.ndarray, np.ndarray]:
        """(loss, d loss / d kernel, d loss / d bias) on a masked batch; the dropout rescale
        is applied to the small products instead of the batch."""
        logits = xb @ self.kernel
        if self.threshold < 256:
            logits *= self.scale
        logits += self.bias
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        w = wb / wb.sum()
        loss = float(-(w @ (tb * log_p).sum(axis=1)) + self.l2 * np.vdot(self.kernel, self.kernel))
        grad_logits = np.exp(log_p)
        grad_logits -= tb
        grad_logits *= w[:, None]
        grad_kernel = xb.T @ grad_logits
        if self.threshold < 256:
            grad_kernel *= self.scale
        grad_kernel += (2.0 * self.l2) * self.kernel
        return loss, grad_kernel, grad_logits.sum(axis=0)

    def score(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the current weights, without dropout."""
        p = softmax(x @ self.kernel + self.bias)
        ce = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))
        return float((p.argmax(1) == y).mean()), float(ce.mean())


def _summary_writer(summaries_dir: str | None) -> Any:
    if not summaries_dir:
        return None
    try:
        import tensorboard  # noqa: F401 - tf.summary needs it for scalars and histograms
    except ImportError:
        from .errors import RetrainerError

        raise RetrainerError("--summaries-dir needs the tensorboard package.",
                             "Install it: pip install 'retrainer[tensorboard]'.") from None
    tf = import_tensorflow()

    return tf.summary.create_file_writer(summaries_dir)


def _write_summaries(writer: Any, row: dict[str, float], kernel: Any, bias: Any, epoch: int) -> None:
    """TensorBoard scalars (loss, accuracy, validation) and weight histograms for one epoch."""
    tf = import_tensorflow()

    with writer.as_default(step=epoch):
        for name, value in row.items():
            if name != "epoch":
                tf.summary.scalar(f"head/{name}", value)
        tf.summary.histogram("head/kernel", kernel)
        tf.summary.histogram("head/bias", bias)
    writer.flush()
