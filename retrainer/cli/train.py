"""``retrainer train``."""
from __future__ import annotations

import click

from ..config import (AugmentConfig, ExportConfig, FineTuneConfig, HeadConfig, SourceConfig,
                      TrainConfig)
from .bottlenecks import check_engine, engine_options
from .common import (FloatRange, backbone_configs, backbone_options, config_group, echo_json,
                     json_option)
from .export import FORMAT_NAMES, parse_formats

_S = SourceConfig()
_H = HeadConfig()
_A = AugmentConfig()
_F = FineTuneConfig()
_E = ExportConfig()


def _percentage(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 <= value < 100:
        raise click.BadParameter("must be between 0 and 100.")
    return value


@click.command()
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder with one sub-folder of images per class (or train/ val/ test/ folders).")
@click.option("--db", default=None, metavar="URL",
              help="Train from a SQL database instead (see 'retrainer db import'): a URL or a "
                   "SQLite file path. Its roles are the split.")
@click.option("--where", "db_where", default=None, metavar="FILTER",
              help="With --db: which images, e.g. \"label IN ('cat', 'dog')\".")
@click.option("--output-dir", default=_E.output_dir, show_default=True, type=click.Path(file_okay=False),
              help="Where the model, labels and metadata are written.")
@backbone_options
@click.option("--validation-percentage", default=_S.validation_percentage, show_default=True,
              type=float, callback=_percentage, help="Share of images used for validation.")
@click.option("--testing-percentage", default=_S.testing_percentage, show_default=True,
              type=float, callback=_percentage, help="Share of images used for the final test.")
@click.option("--head-search", type=click.Choice(["cv", "off"]), default=None,
              help="cv (default): choose the head's L2 strength by 5-fold cross-validation on "
                   "the training and validation images, then refit on all of them. off: one "
                   "Adam fit with early stopping on the validation split (implied by the Adam "
                   "options --learning-rate, --epochs, --steps, --batch-size, --dropout, --l2, "
                   "--label-smoothing, --patience).")
@click.option("--learning-rate", default=_H.learning_rate, show_default=True, type=FloatRange(min=0, min_open=True))
@click.option("--epochs", default=_H.epochs, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Training steps (batches) instead of --epochs.")
@click.option("--batch-size", default=_H.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Head training batch size.")
@click.option("--seed", default=_H.seed, show_default=True, type=int, help="Seed for everything random.")
@click.option("--output-graph", type=click.Path(dir_okay=False), default=None,
              help="Explicit path for the frozen graph (retrain.py's --output_graph).")
@click.option("--output-labels", type=click.Path(dir_okay=False), default=None,
              help="Explicit path for the labels file (retrain.py's --output_labels).")
@click.option("--export-formats", callback=parse_formats, default=",".join(_E.formats),
              show_default=True, metavar="LIST",
              help=f"What to write, comma-separated: {', '.join(FORMAT_NAMES)}, or 'all' "
                   "(int8 and onnx: see 'retrainer export').")
@click.option("--print-misclassified", is_flag=True, help="List the test images the model gets wrong.")
@click.option("--keep-conflicting-duplicates", is_flag=True,
              help="Train and evaluate on identical files found under two labels too "
                   "(default: left out, counted).")
@click.option("--dropout", default=_H.dropout, show_default=True, type=FloatRange(0, 1, max_open=True),
              help="Dropout on the bottleneck while training the head.")
@click.option("--l2", default=_H.l2, show_default=True, type=FloatRange(min=0),
              help="L2 penalty on the head's weights.")
@click.option("--label-smoothing", default=_H.label_smoothing, show_default=True,
              type=FloatRange(0, 1, max_open=True))
@click.option("--patience", default=_H.patience, show_default=True, type=click.IntRange(min=0),
              help="Stop after this many epochs without a better validation loss (0: never).")
@click.option("--class-weight", default=_H.class_weight, show_default=True,
              type=click.Choice(["balanced", "none"]),
              help="'balanced' weighs each class's loss by its rarity.")
@click.option("--assert-accuracy-at-least", type=FloatRange(0, 1), default=None,
              help="Fail (exit 3) and export nothing if the test (or validation) accuracy is "
                   "below this, e.g. 0.9.")
@click.option("--summaries-dir", type=click.Path(file_okay=False), default=None,
              help="Write TensorBoard logs of the head training here.")
@click.option("--flip-left-right", is_flag=True,
              help="Augment: mirror half of the variants horizontally.")
@click.option("--random-crop", default=_A.random_crop, type=FloatRange(0, 100),
              help="Augment: percentage of margin cropped away at random.")
@click.option("--random-scale", default=_A.random_scale, type=FloatRange(0, 100),
              help="Augment: percentage the image is enlarged by at most before cropping.")
@click.option("--random-brightness", default=_A.random_brightness, type=FloatRange(0, 100),
              help="Augment: percentage the brightness is changed by at most.")
@click.option("--augment-variants", default=_A.variants, show_default=True,
              type=click.IntRange(min=1),
              help="Distorted variants per training image (each computed once and cached).")
@click.option("--fine-tune", is_flag=True,
              help="After the head converges, fine-tune the backbone's top layers with it "
                   "(slower: runs the backbone on every epoch).")
@click.option("--fine-tune-layers", default=_F.layers, show_default=True,
              type=click.IntRange(min=0), help="Weighted backbone layers to unfreeze, from the top.")
@click.option("--fine-tune-epochs", default=_F.epochs, show_default=True,
              type=click.IntRange(min=1))
@click.option("--fine-tune-learning-rate", default=_F.learning_rate, show_default=True,
              type=FloatRange(min=0, min_open=True))
@engine_options
@json_option
@click.pass_context
def train(ctx: click.Context, as_json: bool, seed: int, head_search: str | None,
          learning_rate: float, epochs: int, steps: int | None, batch_size: int, dropout: float,
          l2: float, label_smoothing: float, patience: int, class_weight: str,
          print_misclassified: bool, fine_tune: bool, summaries_dir: str | None,
          **options: object) -> None:
    """Train a new classifier head on a pretrained backbone and export it.

    \b
      retrainer train --image-dir cats/ --backbone efficientnet_lite0
    """
    from ..training import train as run_train

    if bool(options.get("image_dir")) == bool(options.get("db")):
        raise click.UsageError("give either --image-dir DIR or --db URL.")
    check_engine(str(options["engine"]), options.get("spark_master"))  # type: ignore[arg-type]
    head = HeadConfig(search=_head_search(ctx, head_search), learning_rate=learning_rate,
                      epochs=epochs, steps=steps, batch_size=batch_size, seed=seed,
                      dropout=dropout, l2=l2, label_smoothing=label_smoothing,
                      patience=patience, class_weight=class_weight)
    backbone, extraction = backbone_configs(options)
    tuning = config_group(FineTuneConfig, options, layers="fine_tune_layers",
                          epochs="fine_tune_epochs", learning_rate="fine_tune_learning_rate")
    config = TrainConfig(
        source=config_group(SourceConfig, options), backbone=backbone, extraction=extraction,
        head=head, augment=config_group(AugmentConfig, options, variants="augment_variants"),
        fine_tune=tuning if fine_tune else None,
        export=config_group(ExportConfig, options, formats="export_formats"),
        summaries_dir=summaries_dir)
    assert not options, f"options in no config group: {sorted(options)}"
    result = run_train(config)
    if as_json:
        echo_json(result.to_dict())
        return
    _print_summary(result, config.export.output_dir, print_misclassified)


#: Options of the single Adam fit: giving any of them means --head-search off.
ADAM_OPTIONS = ("learning_rate", "epochs", "steps", "batch_size", "dropout", "l2",
                "label_smoothing", "patience")


def _head_search(ctx: click.Context, head_search: str | None) -> str:
    """--head-search as given, else off when an Adam option is given, else cv."""
    from click.core import ParameterSource

    given = [f"--{name.replace('_', '-')}" for name in ADAM_OPTIONS
             if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
    if head_search == "cv" and given:
        raise click.UsageError(f"{', '.join(given)} set the Adam fit of --head-search off; "
                               "drop them, or use --head-search off.")
    return head_search or ("off" if given else "cv")


def _print_summary(result, output_dir: str, print_misclassified: bool) -> None:  # noqa: ANN001
    echo = click.echo
    if result.skipped:
        echo(f"Skipped {len(result.skipped)} unusable file(s):")
        for s in result.skipped:
            echo(f"  {s.name}: {s.reason}")
    echo(f"Bottlenecks: {result.bottlenecks_computed} computed, {result.bottlenecks_cached} cached")
    cv = result.cv
    if cv and cv.get("folds"):
        echo(f"Head: C={cv['C']:g} chosen by {cv['folds']}-fold cross-validation over "
             f"{len(cv['scores'])} of {len(cv['grid'])} values, refitted on {cv['images']} images")
    elif cv:
        echo(f"Head: {cv.get('skipped')}")
    if result.validation_accuracy is not None and result.validation_kind == "out-of-fold":
        echo(f"Validation accuracy (out-of-fold, cross-validation) "
             f"{result.validation_accuracy:.4f} (N={cv['images']})")
    elif result.validation_accuracy is not None:
        n_val = sum(result.counts["validation"].values())
        prefix = f"Best epoch {result.best_epoch}: v" if not cv else "V"
        echo(f"{prefix}alidation accuracy {result.validation_accuracy:.4f} (N={n_val})")
    test = result.test
    if test and test.n:
        echo(f"Final test accuracy = {100 * test.accuracy:.1f}% (N={test.n})")
        echo(test.table())
        if print_misclassified:
            echo("Misclassified test images:" + ("" if test.misclassified else " none"))
            for m in test.misclassified:
                echo(f"  {m.path}  true={m.true}  predicted={m.predicted} ({m.score:.3f})")
    echo(f"Exported to {output_dir}: " + ", ".join(
        f"{k}={v}" for k, v in sorted(result.outputs.items())))
