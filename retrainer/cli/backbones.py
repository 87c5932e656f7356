"""``retrainer backbones``."""
from __future__ import annotations

import click

from .common import echo_json, json_option


@click.command()
@click.argument("pattern", default="*")
@json_option
def backbones(pattern: str, as_json: bool) -> None:
    """List the backbones --backbone accepts (PATTERN filters, e.g. 'eff*').

    The default (what train uses without --backbone) is marked with '*'. Names joined by
    '+' (--backbone efficientnet_lite0+efficientnet_lite2) make one backbone whose
    bottleneck is theirs concatenated; they are not listed.
    """
    from ..backbones import get_spec, list_backbones
    from ..config import BackboneConfig

    default = BackboneConfig().name
    specs = [get_spec(name) for name in list_backbones(pattern)]
    if not specs and "+" in pattern:  # a composite, shown when asked for by name
        specs = [get_spec(pattern)]
    if as_json:
        echo_json([{**s.to_dict(), "default": s.name == default} for s in specs])
        return
    click.echo(f"  {'name':<20} {'input':>7} {'dim':>5} {'GFLOPs':>6}  weights")
    for s in specs:
        h, w = s.input_size
        mark = "*" if s.name == default else " "
        size = f"{h}x{w}" if h != w else str(h)
        click.echo(f"{mark} {s.name:<20} {size:>7} {s.feature_dim:>5} {s.gflops:>6.2f}  "
                   f"{s.source.describe() if s.source.kind != 'none' else s.weights}")
    if any(s.name == default for s in specs):
        click.echo(f"* default (train --backbone {default}); GFLOPs per image at the input "
                   "size; 'retrainer backbones --json' gives each one's preprocessing and licence.")
