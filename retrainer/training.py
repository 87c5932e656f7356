"""``train``: source -> split -> bottlenecks -> head -> export, one straight line."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig
from .errors import AccuracyGateFailed, DatasetError
from .evaluation import (FITTED_IMAGES_FILE, REPORT_FILE, EvaluationReport, evaluate_predictions,
                         fitted_images_text)
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
    from .export import check_formats, check_output_dir

    check_formats(config.export.formats)  # before hours of extraction, not after
    out = config.export
    check_output_dir(out.output_dir)
    for path, flag in ((out.output_graph, "--output-graph"), (out.output_labels, "--output-labels")):
        if path:
            check_output_dir(Path(path).parent, flag)
    if config.summaries_dir:
        check_output_dir(config.summaries_dir, "--summaries-dir")
    t0 = time.perf_counter()
    helper: list[Any] = []  # the export helper, once the backbone is known (where it helps)

    def start_helper(backbone: Any) -> None:
        worker = _export_helper(config, backbone)
        if worker is not None:
            helper.append(worker)

    try:
        filled = fill(config, dataset, on_backbone=start_helper)  # source -> split -> bottlenecks
        timings = {"setup": filled.timings["setup"],
                   "bottlenecks": filled.timings["hash"] + filled.timings["extract"],
                   "split": filled.timings.get("split", 0.0)}
        splits = _splits(filled)
        augmented = _augment(config, filled, splits[TRAINING].pairs, timings)
        fitted = _fit(config, filled, splits, augmented, timings)
        _check_accuracy(fitted, config.export.assert_accuracy_at_least)
        t = time.perf_counter()
        result = _result(filled, splits, fitted, timings)
        result.outputs = _export(config, filled, splits, fitted, result,
                                 helper[0] if helper else None)
    finally:
        for worker in helper:
            worker.close()
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return result


def _export_helper(config: TrainConfig, backbone: Any) -> Any:
    """An :class:`retrainer.export_worker.ExportWorker` started now, or None where it would
    not help: when this process has not started TensorFlow and extraction and the head will
    not need it, only the export does, and a helper process can start it meanwhile."""
    import sys

    from .bottlenecks.extractor import forward_files, graph_path, graphs_dir
    from .bottlenecks.runtime_choice import kept_choice

    if ("tensorflow" in sys.modules or config.fine_tune is not None
            or config.head.search != "cv" or "int8" in config.export.formats
            or not {"graph", "saved_model", "tflite"} & set(config.export.formats)):
        return None
    runtime = backbone.runtime or "tensorflow"
    if runtime == "auto":  # not measured yet: measuring converts the backbone with TensorFlow
        kept = kept_choice(graphs_dir(), backbone, backbone.precision)
        runtime = kept["runtime"] if kept else "tensorflow"
    if runtime == "tensorflow":
        return None
    files = [graph_path(graphs_dir(), backbone, "fp32"),
             *forward_files(backbone, graphs_dir(), runtime)]
    if not all(path.is_file() for path in files):  # converting them starts TensorFlow here
        return None
    from .export_worker import ExportWorker

    spec = backbone.spec
    return ExportWorker.start(spec.input_size, spec.resize)


@dataclass
class _Split:
    """One split's images that have a bottleneck: (content key, record), bottlenecks, class
    indices and display paths, in the same order."""

    pairs: list[tuple[str, ImageRecord]]
    x: np.ndarray
    y: np.ndarray
    paths: list[str]


@dataclass
class _Fitted:
    """The head and how it scored: the validation figure reported (``validation_kind``:
    "out-of-fold" or "held-out") and the test split's report."""

    head: Any
    validation: EvaluationReport | None
    validation_kind: str | None
    test: EvaluationReport | None

    @property
    def validation_accuracy(self) -> float | None:
        return self.validation.accuracy if self.validation is not None else None


def _splits(filled: Any) -> dict[str, _Split]:
    """The cached bottlenecks of each split; every class must have some, training ones too."""
    dataset, cache = filled.dataset, filled.cache
    usable = [(k, r) for k, r in zip(filled.keys, dataset.records)
              if k is not None and k in cache]
    by_split = {s: [(k, r) for k, r in usable if r.split == s]
                for s in (TRAINING, VALIDATION, TESTING)}
    _check_classes(dataset.classes, usable, by_split[TRAINING],
                   filled.grouping.excluded if filled.grouping else 0)
    class_index = {label: i for i, label in enumerate(dataset.classes)}

    def split(pairs: list[tuple[str, ImageRecord]]) -> _Split:
        x = (cache.load([k for k, _ in pairs]) if pairs
             else np.zeros((0, filled.spec.feature_dim), np.float32))
        y = np.array([class_index[r.label] for _, r in pairs], dtype=int)
        return _Split(pairs, x, y, [r.display for _, r in pairs])

    return {s: split(pairs) for s, pairs in by_split.items()}


def _fit(config: TrainConfig, filled: Any, splits: dict[str, _Split], augmented: tuple,
         timings: dict[str, float]) -> _Fitted:
    """The head on the training bottlenecks (and their augmented variants), fine-tuned with
    the backbone when asked; its validation and test reports."""
    classes = filled.dataset.classes
    train, val, test = splits[TRAINING], splits[VALIDATION], splits[TESTING]
    t = time.perf_counter()
    validation, kind = None, None
    if config.head.search == "cv":
        head, validation = _cv_head(config, classes, train, val, augmented)
        kind = "out-of-fold" if validation is not None else None
    elif config.head.search == "off":
        from .head import train_head

        x_aug, y_aug, _ = augmented
        log.info("training on %d, validating on %d, testing on %d images",
                 len(train.x) + len(x_aug), len(val.x), len(test.x))
        head = train_head(np.concatenate([train.x, x_aug]), np.concatenate([train.y, y_aug]),
                          len(classes), config.head, val.x, val.y,
                          summaries_dir=config.summaries_dir)
    else:
        raise ValueError(f"unknown head search {config.head.search!r} (use 'cv' or 'off')")
    timings["head"] = time.perf_counter() - t
    probs = {VALIDATION: head.predict(val.x), TESTING: head.predict(test.x)}
    if config.fine_tune is not None:
        probs = _fine_tune(config, filled, head, splits, timings)
    # The validation split is held out from the fit with head search "off" and with
    # fine-tuning; otherwise the head was fitted on it and only its out-of-fold figure counts.
    if len(val.x) and (config.head.search == "off" or config.fine_tune is not None):
        validation = evaluate_predictions(val.y, probs[VALIDATION], classes, val.paths,
                                          split=VALIDATION)
        kind = "held-out"
    tested = None
    if len(test.x):
        tested = evaluate_predictions(test.y, probs[TESTING], classes, test.paths, split=TESTING)
    else:
        log.info("no test images (testing percentage 0 or a tree without test/)")
    return _Fitted(head, validation, kind, tested)


def _check_accuracy(fitted: _Fitted, threshold: float | None) -> None:
    """The accuracy gate: the test (else validation) accuracy must reach ``threshold``."""
    if threshold is None:
        return
    accuracy = fitted.test.accuracy if fitted.test else fitted.validation_accuracy
    if accuracy is None or accuracy < threshold:
        shown = "no test or validation images" if accuracy is None else f"{accuracy:.4f}"
        raise AccuracyGateFailed(f"accuracy {shown} is below the required {threshold}; "
                                 "nothing was exported.")


def _result(filled: Any, splits: dict[str, _Split], fitted: _Fitted,
            timings: dict[str, float]) -> TrainResult:
    classes = filled.dataset.classes
    counts = {s: {label: sum(1 for _, r in split.pairs if r.label == label) for label in classes}
              for s, split in splits.items()}
    head = fitted.head
    return TrainResult(
        labels=classes, counts=counts, bottlenecks_cached=filled.cached,
        bottlenecks_computed=filled.computed, skipped=filled.skipped, history=head.history,
        best_epoch=head.best_epoch, validation_accuracy=fitted.validation_accuracy,
        test=fitted.test, outputs={}, backbone=filled.spec.name, cache_dir=str(filled.cache.dir),
        timings=timings, duplicates=filled.grouping.to_dict() if filled.grouping else {},
        validation_kind=fitted.validation_kind, cv=head.cv)


def _export(config: TrainConfig, filled: Any, splits: dict[str, _Split], fitted: _Fitted,
            result: TrainResult, helper: Any = None) -> dict[str, str]:
    """Write the model (:func:`retrainer.export.export_classifier`; in ``helper``, an
    :class:`retrainer.export_worker.ExportWorker`, where it can), the hashes of the images
    it was fitted on and its evaluation report; what went where."""
    from .bottlenecks.extractor import backbone_graph, backbone_tflite, graph_path, graphs_dir
    from .export import export_classifier, json_bytes, model_metadata, representative_images

    spec, out, head = filled.spec, config.export, fitted.head
    # Every image the head was fitted on or chosen with (training and validation: the refit
    # uses both; the Adam fit and fine-tuning choose their epoch on validation): 'evaluate'
    # leaves these out by content.
    fitted_keys = sorted({k for s in (TRAINING, VALIDATION) for k, _ in splits[s].pairs})
    result.fitted_images = len(fitted_keys)
    metadata = model_metadata(spec, filled.backbone.cache_id, config.backbone.precision, training={
        "image_source": filled.dataset.root, "counts": result.counts,
        "head": asdict(config.head), "best_epoch": head.best_epoch,
        "validation_accuracy": result.validation_accuracy,
        "validation_kind": result.validation_kind, "cv": head.cv,
        "fine_tuned": config.fine_tune is not None, "test_accuracy": result.test_accuracy,
        "fitted_images": {"file": FITTED_IMAGES_FILE, "count": len(fitted_keys),
                          "hash": "sha256 of each image's bytes, one per line"}})

    def representative() -> list[np.ndarray]:  # for the int8 model: training images only
        return representative_images([r for _, r in splits[TRAINING].pairs], spec.input_size,
                                     spec.resize)

    # The backbone's kept frozen graph and TFLite model take the head; a fine-tuned backbone
    # has new weights: frozen afresh, and converted to TFLite with its head.
    backbone = filled.backbone
    kept = None if config.fine_tune is not None else graphs_dir()
    report = fitted.test or fitted.validation
    # The hashes and the report are files of this model: written with it, as one set, so a
    # run stopped half-way (or another run exporting to the same folder) never leaves them
    # beside a model they do not describe.
    more_files = {"fitted_images": (FITTED_IMAGES_FILE, fitted_images_text(fitted_keys))}
    if report is not None:
        more_files["report"] = (REPORT_FILE, json_bytes({**report.to_dict(),
                                                         "backbone": spec.name}))
    outputs, png = None, None
    if helper is not None and kept is not None:
        from .evaluation import confusion_png
        from .export_worker import ExportJob

        helper.submit(ExportJob(
            str(graph_path(kept, backbone, "fp32")),
            str(graph_path(kept, backbone, "fp32", kind="tflite")), head.kernel, head.bias,
            filled.dataset.classes, metadata, out, log.getEffectiveLevel(), more_files))
        png = confusion_png(report) if report is not None else None  # while the model is written
        outputs = helper.result()
    if outputs is None:
        frozen = backbone_graph(backbone, kept, "fp32")
        outputs = export_classifier(
            frozen, head.kernel, head.bias, filled.dataset.classes, metadata, out,
            backbone_tflite=(lambda: backbone_tflite(backbone, kept, frozen)) if kept else None,
            representative=representative, more_files=more_files)
    if report is not None and report.confusion:
        picture = report.write_png(out.output_dir, png, more_files["report"][1])
        if picture:
            outputs["confusion_png"] = picture
    return outputs


def _augment(config: TrainConfig, filled: Any, pairs: list[tuple[str, ImageRecord]],
             timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bottlenecks and labels of the cached augmented variants of the training images (when
    enabled), and for each variant the index in ``pairs`` of the image it was made from."""
    from .augment import augmented_bottlenecks, variant_key

    spec, cache = filled.spec, filled.cache
    none = (np.zeros((0, cache.dim), np.float32), np.zeros(0, int), np.zeros(0, np.int64))
    aug = config.augment
    if not aug.enabled:
        return none
    class_index = {label: i for i, label in enumerate(filled.dataset.classes)}
    t = time.perf_counter()
    x_aug, y_aug, computed, skipped = augmented_bottlenecks(
        aug, pairs, class_index, spec.input_size, spec.resize, cache, filled.extract)
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


def _cv_head(config: TrainConfig, classes: list[str], train: _Split, val: _Split, aug: tuple
             ) -> tuple[Any, EvaluationReport | None]:
    """The head chosen by cross-validation and refitted; the out-of-fold report.

    The training and validation images are fitted on together (fine-tuning keeps the
    validation split apart: it chooses its epoch there). Augmented variants join their
    image's fold and are not scored. The report scores each image by the fold that held it out.
    """
    from .head import fit_head_cv

    x_tr, y_tr, tr_paths = train.x, train.y, train.paths
    x_val, y_val, val_paths = (val.x, val.y, val.paths) if config.fine_tune is None else (
        x_tr[:0], y_tr[:0], [])
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


def _fine_tune(config: TrainConfig, filled: Any, head: Any, splits: dict[str, _Split],
               timings: dict[str, float]) -> dict[str, np.ndarray]:
    """Fine-tune the backbone's top with the head (in place); new validation/test probabilities."""
    from .finetune import fine_tune, load_pixels_of, predict

    tuning = config.fine_tune
    assert tuning is not None
    spec, backbone, n_classes = filled.spec, filled.backbone, len(filled.dataset.classes)
    t = time.perf_counter()
    pixels = {s: load_pixels_of([r for _, r in split.pairs], spec.input_size, spec.resize,
                                config.extraction.workers) for s, split in splits.items()}
    result = fine_tune(backbone.model, head.model, n_classes, pixels[TRAINING],
                       splits[TRAINING].y, pixels[VALIDATION], splits[VALIDATION].y,
                       layers=tuning.layers, epochs=tuning.epochs,
                       learning_rate=tuning.learning_rate,
                       label_smoothing=config.head.label_smoothing,
                       flip=config.augment.flip_left_right, seed=config.head.seed)
    head.history += [{**row, "fine_tune": 1.0} for row in result.history]
    head.kernel, head.bias = head.model.get_layer("final_layer").get_weights()

    def model(x: Any) -> Any:
        return head.model(backbone.model(x, training=False), training=False)

    out = {split: predict(model, pixels[split]) if len(pixels[split]) else
           np.zeros((0, n_classes), np.float32) for split in (VALIDATION, TESTING)}
    timings["fine_tune"] = time.perf_counter() - t
    return out


def _check_classes(classes: list[str], usable: list[tuple[str, ImageRecord]],
                   training: list[tuple[str, ImageRecord]], excluded: int = 0) -> None:
    """``excluded``: identical files under two labels left out, which may have emptied one."""
    have = {r.label for _, r in usable}
    empty = [c for c in classes if c not in have]
    if empty:
        names = ", ".join(repr(c) for c in empty)
        what = f"class {names} has" if len(empty) == 1 else f"classes {names} have"
        if excluded:
            raise DatasetError(
                f"{what} no usable image once the {excluded} identical file(s) found under "
                "two labels are left out.",
                "Keep each file under its right label only, or train with "
                "keep_conflicting_duplicates=True.")
        raise DatasetError(f"{what} no usable image.", "Add images to it or remove the folder.")
    untrained = sorted({c for c in classes} - {r.label for _, r in training})
    if untrained:
        raise DatasetError(
            f"class {', '.join(repr(c) for c in untrained)} has no training image.",
            "Put some of its images in the train/ folder.")
