"""``retrainer export``."""
from __future__ import annotations

import click

from ..config import DEFAULT_MODEL_DIR
from .common import echo_json, json_option, note

#: Mirrors retrainer.export.FORMATS (not imported: ``--help`` must not import TensorFlow).
FORMAT_NAMES = ("graph", "saved_model", "tflite", "int8", "onnx")


def parse_formats(ctx: click.Context | None, param: click.Parameter | None,
                  value: str | None) -> tuple[str, ...] | None:
    """'onnx,int8' -> ('onnx', 'int8'); 'all' -> every format; unknown names are refused."""
    if value is None:
        return None
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return FORMAT_NAMES
    unknown = [n for n in names if n not in FORMAT_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown format {', '.join(map(repr, unknown)) or '(none)'}; "
                                 f"choose from {', '.join(FORMAT_NAMES)} (comma-separated), "
                                 "or 'all'.")
    return tuple(dict.fromkeys(names))


@click.command()
@click.option("--model-dir", default=DEFAULT_MODEL_DIR, show_default=True,
              type=click.Path(exists=True, file_okay=False),
              help="Folder written by 'retrainer train'.")
@click.option("--format", "formats", required=True, callback=parse_formats, metavar="LIST",
              help=f"Comma-separated: {', '.join(FORMAT_NAMES)}, or 'all'.")
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Training images to calibrate int8 on (default: the folder the model was "
                   "trained on, as metadata.json records it).")
@json_option
def export(model_dir: str, formats: tuple[str, ...], image_dir: str | None,
           as_json: bool) -> None:
    """Write more formats of a trained model, from its frozen graph, without retraining.

    \b
      retrainer export --model-dir retrained --format onnx,int8
    """
    from ..export import export_existing

    note(f"exporting {', '.join(formats)} ...")
    written = export_existing(model_dir, formats, image_dir)
    if as_json:
        echo_json(written)
        return
    for kind in formats:
        if kind in written:
            click.echo(f"{kind}: {written[kind]}")
