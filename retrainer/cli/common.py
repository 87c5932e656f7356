"""Options and output helpers shared by the subcommands."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON on stdout.")


def echo_json(data: Any) -> None:
    """One JSON document (or one JSON Lines row) on stdout."""
    click.echo(json.dumps(data, ensure_ascii=False, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def model_options(fn: Callable) -> Callable:
    """--model-dir, --graph, --labels: where an export is read from."""
    fn = click.option("--labels", type=click.Path(dir_okay=False),
                      help="Labels file (with --graph; default: the model dir's).")(fn)
    fn = click.option("--graph", type=click.Path(dir_okay=False),
                      help="A frozen graph file instead of --model-dir.")(fn)
    fn = click.option("--model-dir", default="retrained", show_default=True,
                      type=click.Path(file_okay=False),
                      help="Folder written by 'retrainer train'.")(fn)
    return fn


RUNTIME_CHOICES = ("auto", "tensorflow", "onnxruntime", "openvino", "litert")


def runtime_option(help: str) -> Callable[[Callable], Callable]:
    """--runtime: what runs the model (retrainer.runtimes; no import of any runtime here)."""
    return click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto",
                        show_default=True, help=help)


#: --runtime for commands that run an export (label, evaluate, serve).
export_runtime_option = runtime_option(
    "What runs the model: auto is the export's model.tflite on LiteRT when installed, else "
    "TensorFlow; onnxruntime converts the graph once (kept in the cache dir).")


def backbone_options(fn: Callable) -> Callable:
    """The backbone and its bottleneck cache: shared by train and bottlenecks, so a cache filled
    by one is found by the other with the same flags."""
    from ..config import TrainConfig

    t = TrainConfig()
    options = [
        click.option("--architecture", default=t.architecture, show_default=True,
                     help="Backbone name (see 'retrainer backbones'), names joined by '+' (their "
                          "bottlenecks concatenated), or the path of a .keras model."),
        click.option("--weights", default=None,
                     help="Local weights file for the backbone, or 'random' "
                          "(default: its pretrained weights)."),
        click.option("--feature-layer", default=None,
                     help="With a .keras model: the layer whose output is the bottleneck."),
        click.option("--bottleneck-dir", type=click.Path(file_okay=False), default=None,
                     help="Bottleneck cache folder (default: the user cache dir)."),
        click.option("--extract-batch-size", default=t.extract_batch_size, show_default=True,
                     type=click.IntRange(min=1), help="Images per backbone forward pass."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=t.precision,
                     show_default=True,
                     help="Backbone arithmetic during extraction; bf16 is ~1.6x faster on CPUs "
                          "with AVX512-BF16/AMX. Exports stay fp32."),
        runtime_option("What runs the backbone: auto is the fastest installed runtime on this "
                       "machine, measured once per backbone and kept in the cache dir."),
        click.option("--tta", type=click.Choice(["none", "flip"]), default=t.tta,
                     show_default=True,
                     help="Test-time augmentation in the backbone: 'flip' averages each "
                          "image's bottleneck with its left-right mirror's (2x extraction "
                          "cost); exports apply it too, so 'label' needs no flag."),
        click.option("--workers", default=None, type=click.IntRange(min=1),
                     help="Image decoding threads on this machine."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def err(message: str) -> None:
    click.echo(message, err=True)


def isatty() -> bool:
    return sys.stdout.isatty()
