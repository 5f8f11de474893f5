"""`alphadpo presets list | show NAME` (the YAML files in the repository's presets/, shipped inside
the wheel as `alphadpo_cli.presets`) and `alphadpo losses` (the loss registry, alphadpo_cli.losses)."""

from __future__ import annotations

import click

from .common import friendly, results


@click.group()
def presets():
    """List and show the shipped presets."""


@presets.command("list")
@friendly
def presets_list():
    """Every preset with its one-line description."""
    from rich.table import Table

    from ..config import load_preset_dict, preset_names

    t = Table(title="presets")
    t.add_column("name")
    t.add_column("method")
    t.add_column("model")
    t.add_column("description")
    for name in preset_names():
        d = load_preset_dict(name)
        t.add_row(name, (d.get("loss") or {}).get("name", "alpha_dpo"), (d.get("model") or {}).get("name_or_path", ""),
                  d.get("description", ""))
    results.print(t)


@presets.command("show")
@click.argument("name")
@click.option("--loss", help="Show the preset switched to another method.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@friendly
def presets_show(name, loss, overrides):
    """Print the resolved config of a preset as YAML."""
    from ..config import resolve_config

    click.echo(resolve_config(preset=name, overrides=overrides, loss=loss).to_yaml())


@click.command("losses")
def losses():
    """The loss registry: every method, what it needs, its hyperparameters."""
    import dataclasses

    from rich.table import Table

    from ..losses import LOSSES, make_params

    t = Table(title="loss methods")
    for col in ("name", "reference", "log-probs", "hyperparameters (defaults)"):
        t.add_column(col)
    for name, m in LOSSES.items():
        params = make_params(name)  # the row's defaults: an ablation changes some of its method's
        defaults = ", ".join(f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(params))
        t.add_row(name, "yes" if m.needs_reference else "no", "averaged" if m.length_normalized else "summed", defaults)
    results.print(t)
