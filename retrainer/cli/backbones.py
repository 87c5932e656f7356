"""``retrainer backbones``."""
from __future__ import annotations

import click

from .common import echo_json, json_option


@click.command()
@click.argument("pattern", default="*")
@json_option
def backbones(pattern: str, as_json: bool) -> None:
    """List the backbones --architecture accepts (PATTERN filters, e.g. 'eff*')."""
    from ..backbones import get_spec, list_backbones

    specs = [get_spec(name) for name in list_backbones(pattern)]
    if as_json:
        echo_json([s.to_dict() for s in specs])
        return
    for s in specs:
        h, w = s.input_size
        click.echo(f"{s.name:<20} {h}x{w}  {s.feature_dim:>5}-d  {s.description}")
        click.echo(f"{'':<20} weights: {s.weights}")
