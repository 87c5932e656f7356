"""The new softmax head, trained on cached bottlenecks in seconds.

The features of a whole data set fit in memory and the layer is small, so the head is fitted in
NumPy; TensorFlow is only needed to export it. By default (:func:`fit_head_cv`) it is an
L2-regularised softmax regression fitted by L-BFGS, its strength chosen by stratified k-fold
cross-validation and then refitted on every image; ``search="off"`` is one mini-batch Adam fit
early-stopped on the validation split (:func:`train_head`, :class:`_SoftmaxAdam`).
The features are standardised with the fitted images' mean and deviation; the standardisation
is folded into the exported layer, so the export is still a single softmax layer on the raw
bottleneck.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import HeadConfig
from .errors import RetrainerError
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
    #: search="cv": folds, grid, chosen C, per-C held-out scores (see :func:`fit_head_cv`).
    cv: dict[str, Any] | None = None
    #: search="cv": the chosen C's out-of-fold probabilities of every input row.
    oof_probs: np.ndarray | None = field(default=None, repr=False)
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


def build_head(feature_dim: int, n_classes: int) -> Any:
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
    adam = _SoftmaxAdam(dim, n_classes, cfg, rng)
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
    best = adam.weights()
    since_best = 0
    steps_per_epoch = math.ceil(len(x_train) / batch)
    steps_done = 0
    with bar(epochs, "training head", unit="epoch") as progress:
        for epoch in range(1, epochs + 1):
            n_steps = steps_per_epoch
            if max_steps:
                n_steps = min(n_steps, max_steps - steps_done)
            train_loss = adam.epoch(xt, targets, weights[y_train], rng.permutation(len(x_train)),
                                   batch, n_steps)
            steps_done += n_steps
            train_acc, _ = adam.score(x_shown, y_shown)
            row = {"epoch": epoch, "accuracy": train_acc, "loss": train_loss}
            if has_val:
                row["val_accuracy"], row["val_loss"] = adam.score(xv, yv)
                score = -row["val_loss"]
                text = (f"epoch {epoch}/{epochs}: train accuracy {train_acc:.3f}, validation "
                        f"accuracy {row['val_accuracy']:.3f}, validation loss {row['val_loss']:.4f}")
            else:
                score = float(epoch)
                text = f"epoch {epoch}/{epochs}: train accuracy {train_acc:.3f}, loss {train_loss:.4f}"
            history.append(row)
            log.info(text)
            if writer is not None:
                _write_summaries(writer, row, adam.kernel, adam.bias, epoch)
            if best_score is None or score > best_score:
                best_score, best_epoch, since_best = score, epoch, 0
                best = adam.weights()
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
    if not (np.isfinite(best[0]).all() and np.isfinite(best[1]).all()):
        raise RetrainerError(f"the head's weights became nan or infinite while training "
                             f"(learning_rate={cfg.learning_rate:g}, l2={cfg.l2:g}); nothing "
                             "was exported.",
                             f"Train again with a smaller learning rate or L2 penalty (defaults: "
                             f"{HeadConfig.learning_rate:g} and {HeadConfig.l2:g}).")
    # Fold the standardisation into the layer: ((x - m) / s) @ W + b == x @ (W / s) + (b - (m / s) @ W)
    w_raw = (best[0] / std[:, None]).astype(np.float32)
    b_raw = (best[1] - (mean / std) @ best[0]).astype(np.float32)
    return HeadResult(history=history, best_epoch=best_epoch, kernel=w_raw, bias=b_raw)


# ---------------------------------------------------------------------------------------------
# Head selection by cross-validation (search="cv")

#: L-BFGS limits. Along the C path each fit starts from the previous C's solution; the refit
#: starts from the folds' mean solution. The folds and the refit are solved to the same
#: tolerances (on the class-weighted mean loss): with looser folds (gtol 1e-4), large C's were
#: scored as if early-stopped and chosen, then refitted further, and cats_vs_dogs lost 1 point.
CV_MAX_ITER = 200
REFIT_MAX_ITER = 300
CV_TOL = (1e-5, 1e-9)  # scipy L-BFGS-B (gtol, ftol)
REFIT_TOL = CV_TOL
#: The path stops this many grid points (two decades of C) past the best mean held-out score:
#: the score of an L2 path rises to one optimum and falls, and the weakest regularisation
#: (largest C) is the slowest to fit.
PATH_PATIENCE = 2
#: Larger sets choose C on a stratified sample of this many images (and refit on all): the
#: CV's cost grows with the rows and its held-out estimate hardly improves past a few
#: thousand. No shared quality set is this large (the largest has 2000 training images).
CV_MAX_IMAGES = 2000
#: ... in 3 folds (of 1333 training images each) instead of 5 (of 1600): 10k bottlenecks of 10
#: classes took 18 s with 5 folds on 2 cores shared with other work (load 9.7).
LARGE_SET_FOLDS = 3
#: When the smallest class has a single image, C cannot be cross-validated; this is
#: scikit-learn's LogisticRegression default.
DEFAULT_C = 1.0


class _SoftmaxProblem:
    """Class-weighted softmax cross-entropy plus L2 on the kernel, over row blocks of features.

    Loss: ``sum_i w_i CE_i / S + ||W||^2 / (2 C S)`` with ``S = sum_i w_i``: scikit-learn's
    ``C * sum_i w_i CE_i + ||W||^2 / 2`` divided by ``C S``, so ``C`` means what it means in
    ``LogisticRegression`` and the tolerances are on a mean loss. The bias is not penalised.
    Rows come as blocks (views of one array) so that a fold's training rows need no copy.
    Products run in float32 (BLAS sgemm); L-BFGS itself works in float64.
    """

    def __init__(self, blocks: list[np.ndarray], labels: list[np.ndarray],
                 weights: list[np.ndarray], n_classes: int) -> None:
        self.blocks = blocks
        self.labels = labels
        self.total = float(sum(w.sum() for w in weights))
        self.weights = [(w / self.total).astype(np.float32) for w in weights]
        self.dim = blocks[0].shape[1]
        self.k = n_classes

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.dim * self.k
        return (theta[:n].reshape(self.dim, self.k).astype(np.float32),
                theta[n:].astype(np.float32))

    def loss_grad(self, theta: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
        kernel, bias = self.split(theta)
        loss = 0.0
        g_kernel = np.zeros_like(kernel)
        g_bias = np.zeros_like(bias)
        for x, y, w in zip(self.blocks, self.labels, self.weights):
            if not len(x):
                continue
            z = x @ kernel
            z += bias
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            total = z.sum(axis=1)
            rows = np.arange(len(y))
            p_true = z[rows, y] / total
            loss -= float(w @ np.log(np.maximum(p_true, 1e-30)))
            z /= total[:, None]
            z[rows, y] -= 1.0
            z *= w[:, None]
            g_kernel += x.T @ z
            g_bias += z.sum(axis=0)
        loss += 0.5 * lam * float(np.vdot(kernel, kernel))
        g_kernel += lam * kernel
        return loss, np.concatenate([g_kernel.ravel(), g_bias]).astype(np.float64)

    def fit(self, c: float, theta0: np.ndarray, max_iter: int,
            tol: tuple[float, float] = CV_TOL) -> tuple[np.ndarray, int]:
        from scipy.optimize import minimize

        lam = 1.0 / (c * self.total)
        res = minimize(self.loss_grad, theta0, args=(lam,), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": tol[0], "ftol": tol[1]})
        return res.x, int(res.nit)


def stratified_folds(y_groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold (0..k-1) for every group, each class's groups dealt round the folds in a random
    order (the class's start rotating, so fold sizes stay even)."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y_groups), np.int64)
    start = 0
    for label in np.unique(y_groups):
        members = np.flatnonzero(y_groups == label)
        members = members[rng.permutation(len(members))]
        folds[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return folds


def fit_head_cv(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig,
                groups: np.ndarray | None = None, scored: np.ndarray | None = None
                ) -> HeadResult:
    """See :func:`_fit_head_cv`; BLAS runs on one thread (see :data:`BLAS_THREADS`)."""
    import scipy.optimize  # noqa: F401 - loads SciPy's own BLAS first, so that it is limited too
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return _fit_head_cv(x, y, n_classes, cfg, groups, scored)


#: The fits' products are small (a few thousand rows by ~1000 features by ~10 classes):
#: OpenBLAS threads cost more than they give, and on a busy machine they spin-wait for cores.
#: Measured on 2 shared cores (hymenoptera, 244 x 1280): 100 loss evaluations took 0.017 s on
#: one thread against 0.56-1.3 s on two. SciPy's L-BFGS-B has its own OpenBLAS: left
#: unlimited, its tiny vector operations took 10 s of a 20 s selection on 10k bottlenecks.
BLAS_THREADS = 1


def write_cv_summaries(summaries_dir: str, head: HeadResult) -> None:
    """TensorBoard scalars of each C's held-out log-loss and accuracy (step = the C's place on
    the grid, from the strongest regularisation) and histograms of the refitted layer."""
    writer = _summary_writer(summaries_dir)
    for step, row in enumerate((head.cv or {}).get("scores", []), start=1):
        _write_summaries(writer, {"cv_log_loss": row["log_loss"], "cv_accuracy": row["accuracy"],
                                  "cv_log10_C": math.log10(row["C"])},
                         head.kernel, head.bias, step)
    writer.close()


def _fit_head_cv(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig,
                 groups: np.ndarray | None = None, scored: np.ndarray | None = None
                 ) -> HeadResult:
    """Choose C by stratified k-fold CV on ``x``, then refit on all of it (LogisticRegressionCV
    with ``refit=True``).

    ``groups`` ties rows together (an image and its augmented variants): a group is never
    split across folds. Only rows in ``scored`` (the original images, not their variants) are
    scored on the held-out folds. C is chosen by the mean held-out log-loss (class-weighted
    like the fit) by default: a proper scoring rule, it ranks C's smoothly where accuracy moves
    in steps of one image and ties across many C's on small or easy sets; of the C's within
    one standard error of the best, the smallest is taken (:func:`_one_standard_error`). With
    ``cfg.cv_score == "accuracy"``, the best held-out accuracy (ties: the smallest C). Sets of
    more than :data:`CV_MAX_IMAGES` images choose on a stratified sample. The result carries
    ``cv``: folds, grid, chosen C, per-C scores, and the out-of-fold predictions of the chosen
    C (for an honest validation figure).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    n, dim = x.shape
    groups = np.arange(n) if groups is None else np.asarray(groups, np.int64)
    scored = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    if cfg.cv_score not in ("log_loss", "accuracy"):
        raise ValueError(f"unknown CV score {cfg.cv_score!r} (use 'log_loss' or 'accuracy')")
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6 * (1.0 + np.abs(mean))
    std[std < 1e-6] = 1.0
    xs = (x - mean) / std

    # One label per group (its first row's), and the number of groups in the smallest class.
    _, first = np.unique(groups, return_index=True)
    group_ids = groups[first]
    group_labels = y[first]
    per_class = np.bincount(group_labels, minlength=n_classes)
    smallest = int(per_class[per_class > 0].min())
    k = min(int(cfg.cv_folds), smallest)
    grid = sorted(float(c) for c in cfg.cv_grid)  # from the strongest regularisation
    size = dim * n_classes + n_classes
    cv: dict[str, Any] = {"folds": k if k >= 2 else 0, "grid": grid, "score": cfg.cv_score,
                          "images": int(scored.sum()), "rows": int(n)}
    if k < 2 or len(grid) == 1:
        chosen = grid[0] if len(grid) == 1 else DEFAULT_C
        if k < 2:
            cv["skipped"] = (f"the smallest class has {smallest} image(s): C={chosen:g} "
                             "without cross-validation")
            log.warning("head: %s", cv["skipped"])
        cv.update(C=chosen, scores=[], validation_accuracy=None)
        theta, nit = _refit(xs, y, n_classes, cfg, chosen, np.zeros(size))
        return _cv_result(theta, nit, mean, std, dim, n_classes, cv, None)

    folds_of_groups = np.full(len(group_ids), -1, np.int64)
    sample = np.ones(len(group_ids), bool)
    if len(group_ids) > CV_MAX_IMAGES:
        # A large set: C is chosen on a stratified sample of its images (with their variants);
        # the refit still uses every row.
        k = cv["folds"] = min(k, LARGE_SET_FOLDS)
        sample = _stratified_sample(group_labels, CV_MAX_IMAGES, k, cfg.seed)
        cv["sampled_images"] = int(sample.sum())
    folds_of_groups[sample] = stratified_folds(group_labels[sample], k, cfg.seed)
    fold_of_group = dict(zip(group_ids.tolist(), folds_of_groups.tolist()))
    fold_all = np.array([fold_of_group[g] for g in groups.tolist()], np.int64)
    in_cv = np.flatnonzero(fold_all >= 0)
    order = in_cv[np.argsort(fold_all[in_cv], kind="stable")]
    xs_all, y_all = xs, y
    xs, y, fold, scored_o = xs[order], y[order], fold_all[order], scored[order]
    bounds = np.searchsorted(fold, np.arange(k + 1))
    problems = []
    for f in range(k):
        lo, hi = bounds[f], bounds[f + 1]
        ytr = np.concatenate([y[:lo], y[hi:]])
        w = class_weights(ytr, n_classes, cfg.class_weight)
        problems.append(_SoftmaxProblem([xs[:lo], xs[hi:]], [y[:lo], y[hi:]],
                                        [w[y[:lo]], w[y[hi:]]], n_classes))
    w_all = class_weights(y, n_classes, cfg.class_weight)
    thetas = [np.zeros(size) for _ in range(k)]
    oof = np.zeros((len(y), n_classes), np.float32)
    scores: list[dict[str, float]] = []
    best_i = -1
    kept: list[tuple[np.ndarray, list[np.ndarray]]] = []
    rows = np.arange(len(y))

    def fit_fold(f: int, c: float) -> int:
        thetas[f], nit = problems[f].fit(c, thetas[f], CV_MAX_ITER)
        lo, hi = bounds[f], bounds[f + 1]
        kernel, bias = problems[f].split(thetas[f])
        oof[lo:hi] = softmax(xs[lo:hi] @ kernel + bias)
        progress.update(1)
        return nit

    # The folds are independent: they run side by side, each on one BLAS thread (the products
    # release the GIL). Each fold's result depends on its own data only: deterministic.
    with bar(k * len(grid), "choosing the head's regularisation", unit="fit") as progress, \
            ThreadPoolExecutor(max(1, min(k, os.cpu_count() or 1))) as pool:
        for i, c in enumerate(grid):
            iters = sum(pool.map(fit_fold, range(k), [c] * k))
            sw = w_all[y][scored_o]
            losses = -np.log(np.clip(oof[rows, y], 1e-15, None))[scored_o] * (sw / sw.mean())
            row = {"C": c, "log_loss": float(losses.mean()),
                   "log_loss_se": float(losses.std() / np.sqrt(len(losses))),
                   "accuracy": float((oof.argmax(1) == y)[scored_o].mean()),
                   "iterations": iters}
            scores.append(row)
            kept.append((oof.copy(), [t.copy() for t in thetas]))
            log.info("head CV: C=%g log-loss %.4f accuracy %.4f (%d L-BFGS iterations)",
                     c, row["log_loss"], row["accuracy"], iters)
            if best_i < 0 or _better(row, scores[best_i], cfg.cv_score):
                best_i = i
            elif i - best_i >= PATH_PATIENCE:
                progress.update(k * (len(grid) - i - 1))
                break
    best_i = _one_standard_error(scores, best_i) if cfg.cv_score == "log_loss" else best_i
    best_oof, best_thetas = kept[best_i]
    chosen = grid[best_i]
    oof_probs = np.full((n, n_classes), np.nan, np.float32)
    oof_probs[order] = best_oof
    cv.update(C=chosen, scores=scores, validation_accuracy=scores[best_i]["accuracy"])
    log.info("head: C=%g chosen by %d-fold cross-validation (%s), out-of-fold accuracy %.4f",
             chosen, k, cfg.cv_score.replace("_", "-"), scores[best_i]["accuracy"])
    theta, nit = _refit(xs_all, y_all, n_classes, cfg, chosen,
                        np.mean(best_thetas, axis=0))
    return _cv_result(theta, nit, mean, std, dim, n_classes, cv, oof_probs)


def _stratified_sample(labels: np.ndarray, size: int, least: int, seed: int) -> np.ndarray:
    """A mask choosing about ``size`` of ``labels``' items, each class in proportion (at least
    ``least`` of each, so that every fold can hold one out)."""
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(least, round(size * len(members) / len(labels)))
        mask[rng.permutation(members)[:take]] = True
    return mask


def _one_standard_error(scores: list[dict[str, float]], best: int) -> int:
    """The smallest C (strongest regularisation) whose held-out log-loss is within one
    standard error of the best one's: the "one-standard-error rule" (Hastie, Tibshirani and
    Friedman; glmnet's lambda.1se). Near its optimum the loss curve is flat and its minimum
    moves with a few images; the rule prefers the simpler model among those the data cannot
    tell apart."""
    limit = scores[best]["log_loss"] + scores[best]["log_loss_se"]
    return next(i for i, row in enumerate(scores[: best + 1]) if row["log_loss"] <= limit)


def _better(row: dict[str, float], best: dict[str, float], score: str) -> bool:
    """Strictly better (ties keep the smaller C, the stronger regularisation)."""
    if score == "accuracy":
        return row["accuracy"] > best["accuracy"]
    return row["log_loss"] < best["log_loss"]


def _refit(xs: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig,
           c: float, theta0: np.ndarray) -> tuple[np.ndarray, int]:
    w = class_weights(y, n_classes, cfg.class_weight)
    problem = _SoftmaxProblem([xs], [y], [w[y]], n_classes)
    return problem.fit(c, theta0, REFIT_MAX_ITER, REFIT_TOL)


def _cv_result(theta: np.ndarray, nit: int, mean: np.ndarray, std: np.ndarray, dim: int,
               n_classes: int, cv: dict[str, Any], oof: np.ndarray | None) -> HeadResult:
    n = dim * n_classes
    kernel = theta[:n].reshape(dim, n_classes)
    bias = theta[n:]
    cv["refit_iterations"] = nit
    # Fold the standardisation into the layer, as the Adam fit does.
    w_raw = (kernel / std[:, None]).astype(np.float32)
    b_raw = (bias - (mean / std) @ kernel).astype(np.float32)
    history = [{"C": s["C"], "cv_log_loss": s["log_loss"], "cv_accuracy": s["accuracy"]}
               for s in cv.get("scores", [])]
    return HeadResult(history=history, best_epoch=0, kernel=w_raw, bias=b_raw, cv=cv,
                      oof_probs=oof)


#: How many training images the per-epoch training accuracy is measured on.
TRAIN_SCORE_SAMPLE = 4096


class _SoftmaxAdam:
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
