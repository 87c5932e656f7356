"""The head's training loop on synthetic features: speed, regularisers, early stopping, export."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from retrainer.config import HeadConfig
from retrainer.head import class_weights, train_head


def blobs(n_per_class: int, n_classes: int = 4, dim: int = 64, spread: float = 1.0,
          seed: int = 0, offset: float = 5.0, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters on an un-normalised scale (like real bottlenecks: shifted, scaled)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim))
    return (offset + scale * x).astype(np.float32), y


def test_a_few_hundred_samples_train_in_seconds_and_generalise():
    x, y = blobs(150, spread=1.2)
    xv, yv = blobs(40, spread=1.2, seed=0)
    xv, yv = xv[1::2], yv[1::2]
    import tensorflow  # noqa: F401 - time the training, not the import

    t = time.perf_counter()
    result = train_head(x, y, 4, HeadConfig(epochs=40, patience=0), xv, yv)
    elapsed = time.perf_counter() - t
    assert elapsed < 8, elapsed  # Keras fit took ~9 s for this
    assert len(result.history) == 40
    assert result.history[-1]["val_accuracy"] > 0.9
    assert 1 <= result.best_epoch <= 40


def test_exported_keras_head_matches_the_folded_numpy_weights():
    x, y = blobs(50)
    result = train_head(x, y, 4, HeadConfig(epochs=5, dropout=0.3, label_smoothing=0.1))
    keras_probs = result.model.predict(x[:16], verbose=0)
    np.testing.assert_allclose(keras_probs, result.predict(x[:16]), rtol=1e-4, atol=1e-5)
    assert np.allclose(keras_probs.sum(axis=1), 1.0, atol=1e-5)
    assert [layer.name for layer in result.model.layers] == ["bottleneck", "final_layer"]


def test_early_stopping_keeps_the_best_validation_epoch():
    # Labels unrelated to the features: validation loss only gets worse after a few epochs.
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (120, 32)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    xv = rng.normal(0, 1, (60, 32)).astype(np.float32)
    yv = rng.integers(0, 3, 60)
    cfg = HeadConfig(epochs=200, patience=5, learning_rate=0.05, l2=0.0, dropout=0.0)
    result = train_head(x, y, 3, cfg, xv, yv)
    assert len(result.history) < 200
    assert len(result.history) == result.best_epoch + 5
    losses = [row["val_loss"] for row in result.history]
    assert min(losses) == losses[result.best_epoch - 1]
    best_probs = result.predict(xv)
    loss = -np.log(best_probs[np.arange(60), yv]).mean()
    assert loss == pytest.approx(min(losses), rel=1e-3)


def test_steps_cap_the_number_of_batches():
    x, y = blobs(20)
    result = train_head(x, y, 4, HeadConfig(steps=7, batch_size=16))  # 5 batches per epoch
    assert len(result.history) == 2


def test_balanced_class_weights_help_a_rare_class():
    assert class_weights(np.array([0, 0, 0, 1]), 3, "balanced").tolist() == pytest.approx(
        [4 / 6, 2.0, 1.0])
    assert class_weights(np.array([0, 1]), 2, "none").tolist() == [1.0, 1.0]
    x, y = blobs(200, n_classes=2, spread=3.0, dim=16, seed=5)
    keep = (y == 0) | (np.arange(len(y)) % 20 == 0)  # class 1 is 10 images vs 200
    xt, yt = x[keep], y[keep]
    xv, yv = blobs(200, n_classes=2, spread=3.0, dim=16, seed=5)
    recalls = {}
    for mode in ("none", "balanced"):
        r = train_head(xt, yt, 2, HeadConfig(epochs=60, class_weight=mode, dropout=0, patience=0))
        pred = r.predict(xv).argmax(1)
        recalls[mode] = float((pred[yv == 1] == 1).mean())
    assert recalls["balanced"] > recalls["none"] + 0.05, recalls


def test_summaries_dir_gets_tensorboard_events(tmp_path: Path):
    import tensorflow as tf

    x, y = blobs(20)
    train_head(x, y, 4, HeadConfig(epochs=3), x[:20], y[:20], summaries_dir=str(tmp_path / "tb"))
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    seen: dict[str, list[int]] = {}
    for event in tf.compat.v1.train.summary_iterator(str(files[0])):
        for value in event.summary.value:
            seen.setdefault(value.tag, []).append(event.step)
    assert {"head/loss", "head/accuracy", "head/val_accuracy", "head/val_loss",
            "head/kernel", "head/bias"} <= set(seen)
    assert seen["head/val_loss"] == [1, 2, 3]


def test_hand_written_gradients_match_finite_differences():
    from retrainer.head import _SoftmaxAdam

    rng = np.random.default_rng(5)
    adam = _SoftmaxAdam(6, 3, HeadConfig(dropout=0.5, l2=0.05), rng)
    adam.kernel = rng.normal(0, 0.5, (6, 3)).astype(np.float64)
    adam.bias = rng.normal(0, 0.5, 3).astype(np.float64)
    x = rng.normal(0, 1, (8, 6))
    targets = np.eye(3)[rng.integers(0, 3, 8)] * 0.9 + 0.1 / 3  # label smoothing 0.1
    w = rng.uniform(0.5, 2.0, 8)
    _, grad_kernel, grad_bias = adam.gradients(x, targets, w)
    eps = 1e-6
    for params, grad in ((adam.kernel, grad_kernel), (adam.bias, grad_bias)):
        numeric = np.zeros_like(params)
        for i in np.ndindex(params.shape):
            old = params[i]
            params[i] = old + eps
            up = adam.gradients(x, targets, w)[0]
            params[i] = old - eps
            down = adam.gradients(x, targets, w)[0]
            params[i] = old
            numeric[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dropout", [0.5, 0.3, 0.8])
def test_dropout_masks_keep_the_configured_share(dropout):
    from retrainer.head import _SoftmaxAdam

    adam = _SoftmaxAdam(4, 2, HeadConfig(dropout=dropout), np.random.default_rng(0))
    mask = adam._dropout_mask((500, 400)).astype(np.float64)
    assert mask.shape == (500, 400) and set(np.unique(mask)) == {0.0, 1.0}
    assert abs(mask.mean() - (1 - dropout)) < 0.005
    assert abs(mask.mean() * adam.scale - 1.0) < 0.01  # inverted dropout keeps the expectation
