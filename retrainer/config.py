"""Every default in one place: the CLI reads its option defaults from these dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field

#: Where ``train`` exports and ``label``/``evaluate``/``serve``/``export`` read, by default.
DEFAULT_MODEL_DIR = "retrained"


#: The regularisation grid of the cross-validated head, in scikit-learn's ``C`` terms (the
#: inverse L2 strength per unit of summed loss, on standardised bottlenecks): a decade apart
#: from 1e-4 (nearly constant) to 100 (nearly unregularised), as LogisticRegressionCV would
#: search it. Chosen by principle, not by any data set.
C_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


@dataclass
class HeadConfig:
    """How the new softmax head is trained on cached bottlenecks.

    ``search="cv"`` (the default) fits an L2-regularised softmax regression by L-BFGS, chooses
    its strength ``C`` from ``cv_grid`` by stratified k-fold cross-validation on the training
    and validation images, and refits on all of them; ``learning_rate`` to ``patience`` are then
    unused. ``search="off"`` is the single mini-batch Adam fit with early stopping on the
    validation split, which uses them.
    """

    search: str = "cv"  # "cv" or "off"
    cv_folds: int = 5  # fewer when the smallest class has fewer images
    cv_grid: tuple[float, ...] = C_GRID
    cv_score: str = "log_loss"  # or "accuracy": what the folds' held-out images choose C by
    # Adam (search="off"); defaults measured with bench/quality.py (see docs/quality.md).
    learning_rate: float = 0.001
    epochs: int = 100  # an upper bound: early stopping usually ends sooner
    steps: int | None = None  # when set, overrides epochs (retrain.py's --how_many_training_steps)
    batch_size: int = 64  # the largest batch; small sets use smaller ones (see head.py)
    dropout: float = 0.5  # on the (standardised) bottleneck
    l2: float = 1e-2
    label_smoothing: float = 0.0  # 0.1 cost 1-4 points on the small sets
    seed: int = 0
    patience: int = 20  # early stopping: epochs without a better validation loss
    class_weight: str = "balanced"  # or "none"


@dataclass
class TrainConfig:
    """One ``retrainer train`` run."""

    image_dir: str | None = None
    db: str | None = None  # a SQL database (URL or SQLite path) instead of image_dir
    db_where: str | None = None  # which of its images to use (retrainer.db.filters)
    output_dir: str = DEFAULT_MODEL_DIR
    architecture: str = "inception_v3"
    weights: str | None = None
    feature_layer: str | None = None
    precision: str = "fp32"
    # What runs the backbone: auto (the fastest installed here, measured once and kept),
    # tensorflow, onnxruntime, openvino or litert (retrainer.runtimes).
    runtime: str = "auto"
    # Test-time augmentation folded into the backbone: "flip" averages each image's features
    # with its mirror's (two backbone passes per image), at training and in every export alike.
    tta: str = "none"
    bottleneck_dir: str | None = None  # None: the user cache dir
    validation_percentage: float = 10.0
    testing_percentage: float = 10.0
    extract_batch_size: int = 16  # measured best or equal for lite0 and inception_v3 on CPU
    workers: int | None = None
    engine: str = "local"
    spark_master: str | None = None  # --engine spark: local[N], spark://HOST:PORT, yarn...
    head: HeadConfig = field(default_factory=HeadConfig)
    output_graph: str | None = None  # explicit retrained_graph.pb path (retrain.py users)
    output_labels: str | None = None
    # graph, saved_model, tflite, int8, onnx (retrainer.export.FORMATS); int8 and onnx cost more
    export_formats: tuple[str, ...] = ("graph", "saved_model", "tflite")
    print_misclassified: bool = False
    # Identical files under two labels are left out of training and evaluation unless kept.
    keep_conflicting_duplicates: bool = False
    assert_accuracy_at_least: float | None = None
    summaries_dir: str | None = None  # TensorBoard logs of the head training
    # Cached augmentation (retrain.py's names; percentages): on when any distortion is set.
    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0
    augment_variants: int = 4  # distorted copies of each training image, each cached
    # Optional second stage: unfreeze the backbone's top layers (BatchNorm stays frozen).
    fine_tune: bool = False
    fine_tune_layers: int = 12  # weighted layers counted from the top
    fine_tune_epochs: int = 5
    fine_tune_learning_rate: float = 1e-5  # 1e-4 cost flowers 4 points on one split


@dataclass
class LabelConfig:
    """One ``retrainer label`` run."""

    model_dir: str = DEFAULT_MODEL_DIR
    graph: str | None = None
    labels: str | None = None
    top_k: int = 5
    batch_size: int = 16  # as extraction: the best CPU batch for lite0, equal for inception_v3
    min_confidence: float | None = None  # below it the answer is "unknown"
    runtime: str = "auto"  # auto: the export's model.tflite on LiteRT when installed
