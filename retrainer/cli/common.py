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


def err(message: str) -> None:
    click.echo(message, err=True)


def isatty() -> bool:
    return sys.stdout.isatty()
