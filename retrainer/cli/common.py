"""Options and output helpers shared by the subcommands."""
from __future__ import annotations

import json
import logging
import math
import re
import sys
from dataclasses import fields
from typing import Any, Callable, TypeVar

import click

from ..config import DEFAULT_MODEL_DIR


class FloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and infinity: they pass its comparisons
    (``nan < 0`` is false) and would train or serve with nonsense."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON on stdout.")


#: A lone surrogate: a byte of a file name that is not UTF-8 (Python's surrogateescape).
_SURROGATE = re.compile("[\ud800-\udfff]")


def echo_json(data: Any) -> None:
    """One JSON document (or one JSON Lines row) on stdout, always valid UTF-8: a non-UTF-8
    byte of a file name is written as its escape (``"caf\\udce9.jpg"``), which Python's
    ``json.loads`` and ``os.fsencode`` turn back into the name, not as the raw byte."""
    text = json.dumps(data, ensure_ascii=False, default=_default)
    click.echo(_SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def model_options(fn: Callable) -> Callable:
    """--model-dir, --graph, --labels: where an export is read from."""
    fn = click.option("--labels", type=click.Path(dir_okay=False),
                      help="Labels file (with --graph; default: the model dir's, or the "
                           "retrained_labels.txt beside the graph).")(fn)
    fn = click.option("--graph", type=click.Path(dir_okay=False),
                      help="A frozen graph file instead of --model-dir.")(fn)
    fn = click.option("--model-dir", default=DEFAULT_MODEL_DIR, show_default=True,
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


G = TypeVar("G")


def config_group(cls: type[G], options: dict[str, Any], **renamed: str) -> G:
    """The config dataclass ``cls`` made of the command's ``options`` named as its fields
    (``renamed``: field=option name where they differ); those options are taken out of
    ``options``, so what a command has left over is its own."""
    names = {f.name: renamed.get(f.name, f.name) for f in fields(cls)}  # type: ignore[arg-type]
    given = {field: options.pop(name) for field, name in names.items() if name in options}
    return cls(**given)


def backbone_options(fn: Callable) -> Callable:
    """The backbone and its bottleneck cache: shared by train and bottlenecks, so a cache filled
    by one is found by the other with the same flags."""
    from ..config import BackboneConfig, ExtractionConfig

    b, e = BackboneConfig(), ExtractionConfig()
    options = [
        click.option("--backbone", "--architecture", "backbone", default=b.name, show_default=True,
                     metavar="NAME",
                     help="Backbone name (see 'retrainer backbones'), names joined by '+' (their "
                          "bottlenecks concatenated), or the path of a .keras model "
                          "(--architecture: retrain.py's name for it)."),
        click.option("--weights", default=None,
                     help="Local weights file for the backbone, or 'random' "
                          "(default: its pretrained weights)."),
        click.option("--feature-layer", default=None,
                     help="With a .keras model: the layer whose output is the bottleneck."),
        click.option("--bottleneck-dir", type=click.Path(file_okay=False), default=None,
                     help="Bottleneck cache folder (default: the user cache dir)."),
        click.option("--extract-batch-size", default=e.batch_size, show_default=True,
                     type=click.IntRange(min=1), help="Images per backbone forward pass."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=b.precision,
                     show_default=True,
                     help="Backbone arithmetic during extraction; bf16 is ~1.7x faster for "
                          "Inception-v3 on CPUs with AVX512-BF16/AMX (not for EfficientNet-Lite). "
                          "Exports stay fp32."),
        runtime_option("What runs the backbone: auto is the fastest installed runtime on this "
                       "machine, measured once per backbone and kept in the cache dir."),
        click.option("--tta", type=click.Choice(["none", "flip"]), default=b.tta,
                     show_default=True,
                     help="Test-time augmentation in the backbone: 'flip' averages each "
                          "image's bottleneck with its left-right mirror's (2x extraction "
                          "cost); exports apply it too, so 'label' needs no flag."),
        click.option("--workers", default=None, type=click.IntRange(min=1),
                     help="Image decoding threads on this machine (default: each runner lane "
                          "decodes its own share of a batch; N: a pool of N decoding threads)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def backbone_configs(options: dict[str, Any]) -> tuple[Any, Any]:
    """The BackboneConfig and ExtractionConfig of :func:`backbone_options` (and --engine,
    --spark-master), taken out of ``options``."""
    from ..config import BackboneConfig, ExtractionConfig

    return (config_group(BackboneConfig, options, name="backbone"),
            config_group(ExtractionConfig, options, batch_size="extract_batch_size"))


def err(message: str) -> None:
    click.echo(message, err=True)


def note(message: str) -> None:
    """A line of information on stderr (a summary, what is being done): -q leaves it out."""
    if logging.getLogger("retrainer").isEnabledFor(logging.INFO):
        click.echo(message, err=True)


def isatty() -> bool:
    return sys.stdout.isatty()
