"""``train``: source -> split -> bottlenecks -> head -> export, one straight line."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from . import __version__
from .config import TrainConfig
from .errors import AccuracyGateFailed, DatasetError
from .evaluation import FITTED_IMAGES_FILE, EvaluationReport, evaluate_predictions, write_fitted_images
from .sources.base import TESTING, TRAINING, VALIDATION, Dataset, ImageRecord, Skipped

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did: counts, accuracies, timings and where the export went."""

    labels: list[str]
    counts: dict[str, dict[str, int]]
    bottlenecks_cached: int
    bottlenecks_computed: int
    skipped: list[Skipped]
    history: list[dict[str, float]]
    best_epoch: int
    validation_accuracy: float | None
    test: EvaluationReport | None
    outputs: dict[str, str]
    backbone: str
    cache_dir: str
    timings: dict[str, float] = field(default_factory=dict)
    duplicates: dict[str, Any] = field(default_factory=dict)  # split.Grouping.to_dict()
    #: "out-of-fold" (cross-validation over the images the head was fitted on) or "held-out"
    #: (the validation split, not fitted on); None without a validation figure.
    validation_kind: str | None = None
    #: Head search "cv": folds, grid, chosen C, per-C held-out scores.
    cv: dict[str, Any] | None = None
    #: How many images the head was fitted on or chosen with (their hashes are exported).
    fitted_images: int = 0

    @property
    def test_accuracy(self) -> float | None:
        return self.test.accuracy if self.test and self.test.n else None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("test", "skipped")}
        data["skipped"] = [{"name": s.name, "reason": s.reason} for s in self.skipped]
        data["test"] = self.test.to_dict() if self.test else None
        data["test_accuracy"] = self.test_accuracy
        return data


def train(config: TrainConfig, dataset: Dataset | None = None) -> TrainResult:
    """Train a classifier as ``config`` says and export it; see :class:`TrainResult`."""
    from .bottlenecks.fill import fill
    from .export import check_formats

    check_formats(config.export.formats)  # before hours of extraction, not after
    t0 = time.perf_counter()
    filled = fill(config, dataset)
    spec, dataset, backbone, cache = filled.spec, filled.dataset, filled.backbone, filled.cache
    keys, skipped = filled.keys, filled.skipped
    n_cached, n_computed = filled.cached, filled.computed
    timings = {"setup": filled.timings["setup"],
               "bottlenecks": filled.timings["hash"] + filled.timings["extract"]}

    usable = [(k, r) for k, r in zip(keys, dataset.records) if k is not None and k in cache]
    class_index = {label: i for i, label in enumerate(dataset.classes)}
    by_split = {s: [(k, r) for k, r in usable if r.split == s] for s in (TRAINING, VALIDATION, TESTING)}
    _check_classes(dataset.classes, usable, by_split[TRAINING])

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        pairs = by_split[split]
        x = cache.load([k for k, _ in pairs]) if pairs else np.zeros((0, spec.feature_dim), np.float32)
        y = np.array([class_index[r.label] for _, r in pairs], dtype=int)
        return x, y, [r.display for _, r in pairs]

    x_tr, y_tr, tr_paths = arrays(TRAINING)
    x_val, y_val, val_paths = arrays(VALIDATION)
    x_te, y_te, te_paths = arrays(TESTING)
    counts = {s: {label: sum(1 for _, r in pairs if r.label == label) for label in dataset.classes}
              for s, pairs in by_split.items()}
    x_aug, y_aug, aug_groups = _augment(config, spec, cache, backbone, by_split[TRAINING],
                                        class_index, timings)

    t = time.perf_counter()
    val_acc = None
    val_report = None
    validation_kind = None
    if config.head.search == "cv":
        head, val_report = _cv_head(config, dataset.classes, (x_tr, y_tr, tr_paths),
                                    (x_val, y_val, val_paths), (x_aug, y_aug, aug_groups))
        if val_report is not None:
            val_acc, validation_kind = val_report.accuracy, "out-of-fold"
    elif config.head.search == "off":
        from .head import train_head

        log.info("training on %d, validating on %d, testing on %d images",
                 len(x_tr) + len(x_aug), len(x_val), len(x_te))
        head = train_head(np.concatenate([x_tr, x_aug]), np.concatenate([y_tr, y_aug]),
                          len(dataset.classes), config.head, x_val, y_val,
                          summaries_dir=config.summaries_dir)
    else:
        raise ValueError(f"unknown head search {config.head.search!r} (use 'cv' or 'off')")
    timings["head"] = time.perf_counter() - t
    probs = {VALIDATION: head.predict(x_val), TESTING: head.predict(x_te)}
    if config.fine_tune is not None:
        probs = _fine_tune(config, spec, backbone, head, by_split, class_index, timings)
    # The validation split is held out from the fit with --head-search off and with
    # fine-tuning; otherwise the head was fitted on it and only its out-of-fold figure counts.
    if len(x_val) and (config.head.search == "off" or config.fine_tune is not None):
        val_report = evaluate_predictions(y_val, probs[VALIDATION], dataset.classes, val_paths,
                                          split=VALIDATION)
        val_acc, validation_kind = val_report.accuracy, "held-out"
    test = None
    if len(x_te):
        test = evaluate_predictions(y_te, probs[TESTING], dataset.classes, te_paths,
                                    split=TESTING)
    else:
        log.info("no test images (testing percentage 0 or a tree without test/)")

    gate_acc = test.accuracy if test else val_acc
    threshold = config.export.assert_accuracy_at_least
    if threshold is not None:
        if gate_acc is None or gate_acc < threshold:
            shown = "no test or validation images" if gate_acc is None else f"{gate_acc:.4f}"
            raise AccuracyGateFailed(
                f"accuracy {shown} is below the required {threshold}; "
                "nothing was exported.")

    t = time.perf_counter()
    result = TrainResult(
        labels=dataset.classes, counts=counts, bottlenecks_cached=n_cached,
        bottlenecks_computed=n_computed, skipped=skipped, history=head.history,
        best_epoch=head.best_epoch, validation_accuracy=val_acc, test=test, outputs={},
        backbone=spec.name, cache_dir=str(cache.dir), timings=timings,
        duplicates=filled.grouping.to_dict() if filled.grouping else {},
        validation_kind=validation_kind, cv=head.cv)
    # Every image the head was fitted on or chosen with (training and validation: the refit
    # uses both; the Adam fit and fine-tuning choose their epoch on validation): 'evaluate'
    # leaves these out by content.
    fitted = sorted({k for s in (TRAINING, VALIDATION) for k, _ in by_split[s]})
    result.fitted_images = len(fitted)
    metadata = {
        "retrainer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": spec.to_dict(),
        "backbone_cache_id": backbone.cache_id,
        "precision": config.backbone.precision,
        "input": {"name": "input", "shape": [None, *spec.input_size, 3],
                  "pixels": "RGB 0..255, float32; normalisation is inside the graph"},
        "output": {"name": "final_result", "kind": "softmax"},
        "training": {"image_source": dataset.root, "counts": counts, "head": asdict(config.head),
                     "best_epoch": head.best_epoch, "validation_accuracy": val_acc,
                     "validation_kind": validation_kind, "cv": head.cv,
                     "fine_tuned": config.fine_tune is not None,
                     "test_accuracy": result.test_accuracy,
                     "fitted_images": {"file": FITTED_IMAGES_FILE, "count": len(fitted),
                                       "hash": "sha256 of each image's bytes, one per line"}},
    }
    from .bottlenecks.extractor import backbone_graph, backbone_tflite, graphs_dir
    from .export import export_graph, tflite_with_head
    from .graph import compose, dense_softmax_graph

    # The backbone's kept frozen graph (and TFLite model) plus the head: no second freeze or
    # conversion of the whole classifier. Exports are fp32 whatever the extraction precision.
    # A fine-tuned backbone has new weights: freeze and convert it afresh instead.
    fitted_path = write_fitted_images(config.export.output_dir, fitted)
    kept = None if config.fine_tune is not None else graphs_dir()
    frozen = backbone_graph(backbone, kept, "fp32")
    classifier = compose(frozen, dense_softmax_graph(head.kernel, head.bias))
    tflite = None
    if kept is not None and "tflite" in config.export.formats:
        tflite = tflite_with_head(backbone_tflite(backbone, kept, frozen), head.kernel, head.bias)
    from .export import representative_images

    def representative() -> list[np.ndarray]:  # for the int8 model: training images only
        return representative_images([r for _, r in by_split[TRAINING]], spec.input_size,
                                     spec.resize)

    out = config.export
    result.outputs = export_graph(classifier, dataset.classes, metadata, out.output_dir,
                                  out.formats, out.output_graph, out.output_labels,
                                  tflite, representative)
    result.outputs["fitted_images"] = str(fitted_path)
    report = test or val_report
    if report is not None:
        result.outputs.update(report.write(config.export.output_dir, {"backbone": spec.name}))
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return result


def _augment(config: TrainConfig, spec: Any, cache: Any, backbone: Any,
             pairs: list[tuple[str, ImageRecord]], class_index: dict[str, int],
             timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bottlenecks and labels of the cached augmented variants of the training images (when
    enabled), and for each variant the index in ``pairs`` of the image it was made from."""
    from .augment import augmented_bottlenecks, variant_key

    none = (np.zeros((0, cache.dim), np.float32), np.zeros(0, int), np.zeros(0, np.int64))
    aug = config.augment
    if not aug.enabled:
        return none
    from .bottlenecks import get_engine
    from .bottlenecks.extractor import graphs_dir, make_forward

    def extract(items: list) -> list:
        ext = config.extraction
        engine = get_engine(ext.engine, workers=ext.workers, master=ext.spark_master)
        return engine.extract(items, make_forward(backbone, graphs_dir()), spec.input_size,
                              spec.resize, cache, batch_size=ext.batch_size)

    t = time.perf_counter()
    x_aug, y_aug, computed, skipped = augmented_bottlenecks(
        aug, pairs, class_index, spec.input_size, spec.resize, cache, extract)
    # The variants come back in (image, variant) order, those that could be made: the same
    # walk over the keys gives each one's image, so that a fold keeps an image and its variants.
    origin = np.array([j for j, (key, _) in enumerate(pairs) for i in range(aug.variants)
                       if variant_key(aug, key, i, spec.input_size, spec.resize) in cache],
                      np.int64)
    timings["augmentation"] = time.perf_counter() - t
    log.info("augmentation: %d variants of %d training images (%d computed now, %d skipped)",
             len(x_aug), len(pairs), computed, len(skipped))
    if len(origin) != len(x_aug):  # the cache changed under us: no variants rather than leaks
        log.warning("augmentation: the cached variants changed while loading; not using them")
        return none
    return x_aug, y_aug, origin


def _cv_head(config: TrainConfig, classes: list[str], train: tuple, val: tuple, aug: tuple
             ) -> tuple[Any, EvaluationReport | None]:
    """The head chosen by cross-validation and refitted; the out-of-fold report.

    The training and validation images are fitted on together (fine-tuning keeps the
    validation split apart: it chooses its epoch there). Augmented variants join their
    image's fold and are not scored. The report scores each image by the fold that held it out.
    """
    from .head import fit_head_cv

    x_tr, y_tr, tr_paths = train
    x_val, y_val, val_paths = val if config.fine_tune is None else (
        train[0][:0], train[1][:0], [])
    x_aug, y_aug, origin = aug
    n = len(x_tr) + len(x_val)
    x = np.concatenate([x_tr, x_val, x_aug])
    y = np.concatenate([y_tr, y_val, y_aug]).astype(int)
    groups = np.concatenate([np.arange(n), origin])
    scored = np.arange(len(x)) < n
    log.info("choosing the head by cross-validation on %d images (%d augmented variants)",
             n, len(x_aug))
    head = fit_head_cv(x, y, len(classes), config.head, groups, scored)
    if config.summaries_dir:
        from .head import write_cv_summaries

        write_cv_summaries(config.summaries_dir, head)
    if head.oof_probs is None:
        return head, None
    paths = list(tr_paths) + list(val_paths)
    held = np.flatnonzero(~np.isnan(head.oof_probs[:n, 0]))  # a large set: its CV sample
    report = evaluate_predictions(y[held], head.oof_probs[held], classes,
                                  [paths[i] for i in held], split="cross-validation")
    return head, report


def _fine_tune(config: TrainConfig, spec: Any, backbone: Any, head: Any,
               by_split: dict[str, list[tuple[str, ImageRecord]]], class_index: dict[str, int],
               timings: dict[str, float]) -> dict[str, np.ndarray]:
    """Fine-tune the backbone's top with the head (in place); new validation/test probabilities."""
    from .finetune import fine_tune, load_pixels_of, predict

    tuning = config.fine_tune
    assert tuning is not None
    t = time.perf_counter()
    pixels, labels = {}, {}
    for split, pairs in by_split.items():
        pixels[split] = load_pixels_of([r for _, r in pairs], spec.input_size, spec.resize,
                                       config.extraction.workers)
        labels[split] = np.array([class_index[r.label] for _, r in pairs], dtype=int)
    result = fine_tune(backbone.model, head.model, len(class_index), pixels[TRAINING],
                       labels[TRAINING], pixels[VALIDATION], labels[VALIDATION],
                       layers=tuning.layers, epochs=tuning.epochs,
                       learning_rate=tuning.learning_rate,
                       label_smoothing=config.head.label_smoothing,
                       flip=config.augment.flip_left_right, seed=config.head.seed)
    head.history += [{**row, "fine_tune": 1.0} for row in result.history]
    head.kernel, head.bias = head.model.get_layer("final_layer").get_weights()

    def model(x: Any) -> Any:
        return head.model(backbone.model(x, training=False), training=False)

    out = {split: predict(model, pixels[split]) if len(pixels[split]) else
           np.zeros((0, len(class_index)), np.float32) for split in (VALIDATION, TESTING)}
    timings["fine_tune"] = time.perf_counter() - t
    return out


def _check_classes(classes: list[str], usable: list[tuple[str, ImageRecord]],
                   training: list[tuple[str, ImageRecord]]) -> None:
    have = {r.label for _, r in usable}
    empty = [c for c in classes if c not in have]
    if empty:
        raise DatasetError(f"class {', '.join(repr(c) for c in empty)} has no usable image.",
                           "Add images to it or remove the folder.")
    untrained = sorted({c for c in classes} - {r.label for _, r in training})
    if untrained:
        raise DatasetError(
            f"class {', '.join(repr(c) for c in untrained)} has no training image.",
            "Put some of its images in the train/ folder.")
