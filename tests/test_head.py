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


# --- head selection by cross-validation -------------------------------------------------------

def test_cv_refit_matches_scikit_learns_logistic_regression_at_the_chosen_c():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from retrainer.head import fit_head_cv

    x, y = blobs(40, n_classes=3, dim=20, spread=2.5, seed=2)
    result = fit_head_cv(x, y, 3, HeadConfig(class_weight="none"))
    c = result.cv["C"]
    assert c in result.cv["grid"] and result.cv["folds"] == 5
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=5000).fit(scaler.transform(x), y)
    np.testing.assert_allclose(result.predict(x), ref.predict_proba(scaler.transform(x)),
                               atol=2e-3)


def test_cv_chooses_strong_regularisation_for_noise_and_weak_for_clean_data():
    from retrainer.head import fit_head_cv

    rng = np.random.default_rng(0)
    noise_x = rng.normal(0, 1, (150, 40)).astype(np.float32)
    noise_y = rng.integers(0, 3, 150)
    noisy = fit_head_cv(noise_x, noise_y, 3, HeadConfig())
    clean = fit_head_cv(*blobs(50, n_classes=3, dim=40, spread=0.3), 3, HeadConfig())
    assert noisy.cv["C"] <= 1e-3 < clean.cv["C"]
    assert noisy.cv["validation_accuracy"] < 0.5 and clean.cv["validation_accuracy"] == 1.0


def test_a_group_never_spans_folds_so_duplicates_cannot_leak():
    """Random labels, every image present 4 times (as augmented variants are): with the copies
    kept in one fold, out-of-fold accuracy stays near chance; split up, it would be ~100 %."""
    from retrainer.head import fit_head_cv

    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (90, 120)).astype(np.float32)  # enough dimensions to memorise
    labels = rng.integers(0, 3, 90)
    x = np.concatenate([base] + [base + rng.normal(0, 0.01, base.shape).astype(np.float32)
                                 for _ in range(3)])
    y = np.tile(labels, 4)
    groups = np.tile(np.arange(90), 4)
    scored = np.arange(len(x)) < 90
    grouped = fit_head_cv(x, y, 3, HeadConfig(cv_grid=(100.0,) * 2), groups, scored)
    leaky = fit_head_cv(x, y, 3, HeadConfig(cv_grid=(100.0,) * 2))
    assert grouped.cv["validation_accuracy"] < 0.6 < 0.9 < leaky.cv["validation_accuracy"]
    assert grouped.cv["images"] == 90 and grouped.oof_probs.shape == (360, 3)


def test_stratified_folds_keep_class_shares():
    from retrainer.head import stratified_folds

    y = np.array([0] * 50 + [1] * 10 + [2] * 7)
    folds = stratified_folds(y, 5, seed=0)
    for f in range(5):
        held = y[folds == f]
        assert (held == 0).sum() == 10 and (held == 1).sum() == 2 and 1 <= (held == 2).sum() <= 2
    assert (stratified_folds(y, 5, seed=0) == folds).all()


def test_large_sets_choose_c_on_a_sample_and_refit_on_everything(monkeypatch):
    import retrainer.head as head_module

    monkeypatch.setattr(head_module, "CV_MAX_IMAGES", 60)
    x, y = blobs(50, n_classes=3, dim=16, spread=1.5)
    result = head_module.fit_head_cv(x, y, 3, HeadConfig())
    assert result.cv["sampled_images"] == 60 and result.cv["folds"] == 3
    assert np.isnan(result.oof_probs[:, 0]).sum() == 150 - 60
    assert (result.predict(x).argmax(1) == y).mean() > 0.9


def test_cv_loss_gradient_matches_finite_differences():
    from retrainer.head import _SoftmaxProblem

    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (10, 5)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    w = rng.uniform(0.5, 2, 10).astype(np.float32)
    problem = _SoftmaxProblem([x[:6], x[6:]], [y[:6], y[6:]], [w[:6], w[6:]], 3)
    theta = rng.normal(0, 0.3, 5 * 3 + 3)
    _, grad = problem.loss_grad(theta, 0.1)
    eps = 1e-3
    numeric = np.array([(problem.loss_grad(theta + eps * e, 0.1)[0]
                         - problem.loss_grad(theta - eps * e, 0.1)[0]) / (2 * eps)
                        for e in np.eye(len(theta))])
    np.testing.assert_allclose(grad, numeric, rtol=2e-2, atol=2e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow, on the way there
def test_weights_that_blow_up_to_nan_are_an_error_not_an_export():
    from retrainer.errors import RetrainerError

    x, y = blobs(20)
    with pytest.raises(RetrainerError, match="nan or infinite.*l2=1e\\+308"):
        train_head(x, y, 4, HeadConfig(epochs=3, l2=1e308))
