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
class SourceConfig:
    """Where the images come from, and how they are split."""

    image_dir: str | None = None
    db: str | None = None  # a SQL database (URL or SQLite path) instead of image_dir
    db_where: str | None = None  # which of its images to use (retrainer.db.filters)
    validation_percentage: float = 10.0
    testing_percentage: float = 10.0
    # Identical files under two labels are left out of training and evaluation unless kept.
    keep_conflicting_duplicates: bool = False


@dataclass
class BackboneConfig:
    """The pretrained network and how it runs: everything that decides a bottleneck's value
    (and so its cache entry)."""

    name: str = "inception_v3"  # a registered backbone (list_backbones()) or a .keras path
    weights: str | None = None  # a local weights file, or "random"; None: the pretrained ones
    feature_layer: str | None = None  # with a .keras model: the bottleneck layer
    precision: str = "fp32"  # or "bf16" (extraction only: exports are fp32)
    # What runs the backbone: auto (the fastest installed here, measured once and kept),
    # tensorflow, onnxruntime, openvino or litert (retrainer.runtimes).
    runtime: str = "auto"
    # Test-time augmentation folded into the backbone: "flip" averages each image's
    # bottleneck with its mirror's (two backbone passes per image), at training and in every
    # export alike.
    tta: str = "none"


@dataclass
class ExtractionConfig:
    """Where bottlenecks are cached and what computes them; none of it changes their values."""

    bottleneck_dir: str | None = None  # None: the user cache dir
    batch_size: int = 16  # measured best or equal for lite0 and inception_v3 on CPU
    workers: int | None = None  # image decoding threads; None: one per core
    engine: str = "local"  # or "spark"
    spark_master: str | None = None  # engine "spark": local[N], spark://HOST:PORT, yarn...


@dataclass
class AugmentConfig:
    """Cached augmentation (retrain.py's names; percentages): on when any distortion is set."""

    flip_left_right: bool = False
    random_crop: float = 0.0  # % margin cropped away at random
    random_scale: float = 0.0  # % the image is enlarged by at most, before cropping
    random_brightness: float = 0.0  # % the pixel values are multiplied up or down by at most
    variants: int = 4  # distorted copies of each training image, each cached

    @property
    def enabled(self) -> bool:
        return self.variants > 0 and (self.flip_left_right or self.random_crop > 0
                                      or self.random_scale > 0 or self.random_brightness > 0)


@dataclass
class FineTuneConfig:
    """The optional second stage: the backbone's top layers trained with the head (BatchNorm
    stays frozen)."""

    layers: int = 12  # weighted layers counted from the top
    epochs: int = 5
    learning_rate: float = 1e-5  # 1e-4 cost flowers 4 points on one split


@dataclass
class ExportConfig:
    """What is written, where, and the accuracy it takes to write anything."""

    output_dir: str = DEFAULT_MODEL_DIR
    # graph, saved_model, tflite, int8, onnx (retrainer.export.FORMATS); int8 and onnx cost more
    formats: tuple[str, ...] = ("graph", "saved_model", "tflite")
    output_graph: str | None = None  # explicit retrained_graph.pb path (retrain.py users)
    output_labels: str | None = None
    # Below this test (else validation) accuracy, nothing is exported (AccuracyGateFailed).
    assert_accuracy_at_least: float | None = None


@dataclass
class TrainConfig:
    """One ``retrainer train`` run: source -> backbone bottlenecks -> head -> export.

    ``fine_tune`` is off unless given (``FineTuneConfig()`` turns it on with its defaults)."""

    source: SourceConfig = field(default_factory=SourceConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fine_tune: FineTuneConfig | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    summaries_dir: str | None = None  # TensorBoard logs of the head training


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
