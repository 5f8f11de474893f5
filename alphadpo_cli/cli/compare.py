"""`alphadpo compare`: methods × a grid × seeds, each an ordinary training run, with intervals and
paired differences (`alphadpo_cli.compare`, docs/compare.md)."""

from __future__ import annotations

import click

from .common import console, friendly


@click.command()
@click.option("--preset", "-p", help="A preset name (see `alphadpo presets list`).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML config (may `inherit: PRESET`).")
@click.option("--loss", "losses", default="alpha_dpo,simpo,dpo", show_default=True,
              help="Comma-separated methods, each with the preset's tuned settings for it.")
@click.option("--grid", multiple=True, metavar="[METHOD:]KEY=V1,V2,...",
              help="Sweep a config key (repeatable: the product), e.g. loss.params.alpha=0.01,0.05,0.1,0.2; a "
                   "loss.params key applies to the methods that have it. The setting is chosen per method on a "
                   "validation slice of the training prompts.")
@click.option("--seeds", default="1", show_default=True, metavar="N|S1,S2,...",
              help="How many seeds (training.seed, +1, ...), or the seeds themselves.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any key for every run.")
@click.option("--output-dir", "-o", default="outputs/compare", show_default=True)
@click.option("--reward", help="Judge the test answers with this reward: 'file.py:function', 'module:function' or a "
                               "reward model (default: held-out preference accuracy only).")
@click.option("--baseline-method", help="Compare every other method with this one, prompt by prompt (default: the "
                                        "first method against each of the others).")
@click.option("--validation", type=float, default=0.2, show_default=True,
              help="With --grid: the share of the training prompts carved off to choose the setting on.")
@click.option("--max-new-tokens", type=int, help="Answer length for the reward judge (default: the config's).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Generation batch size.")
@click.option("--overwrite", is_flag=True, help="Start again: delete this directory's comparison and its runs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages and no tables.")
@friendly
def compare(preset, config_file, losses, grid, seeds, overrides, output_dir, reward, baseline_method, validation,
            max_new_tokens, batch_size, overwrite, quiet):
    """Compare methods over a grid of settings and several seeds: every run an ordinary `train` run,
    the setting chosen on validation, mean ± SE, 95% intervals and paired differences on the test set."""
    from ..compare import CompareOptions, parse_seeds, run_compare

    options = CompareOptions(
        preset=preset, config_file=config_file, losses=tuple(s.strip() for s in losses.split(",") if s.strip()),
        grid=tuple(grid), seeds=parse_seeds(seeds), overrides=tuple(overrides), output_dir=output_dir,
        reward=reward, baseline_method=baseline_method, validation=validation, max_new_tokens=max_new_tokens,
        batch_size=batch_size, overwrite=overwrite, quiet=quiet)
    run_compare(options, console=console)


def register(main: click.Group) -> None:
    main.add_command(compare)
