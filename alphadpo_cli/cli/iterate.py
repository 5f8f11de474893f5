"""`alphadpo iterate`: the command-line face of :mod:`alphadpo_cli.iterate` (online α-DPO).

Only click and the options' constants are imported at the top (no torch), so `alphadpo --help`
stays instant; the experiment's code is imported inside the command body."""

from __future__ import annotations

import click

from ..rewards.build import NUM_SAMPLES, STRATEGIES, TEMPERATURE, TOP_P
from .common import console as err_console
from .common import friendly, results

ITERATE_OPTIONS = [
    click.option("--preset", "-p", help="The training preset of every round (model, method, batch, decoding length)."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A YAML config instead of a preset."),
    click.option("--loss", help="Switch method (alpha_dpo, simpo, dpo, ...), with the preset's tuned settings for it."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override a config key in every round's training, e.g. training.save_steps=4."),
    click.option("--model", "-m", help="The starting policy π0 [default: the preset's model]."),
    click.option("--prompts", "-d", required=True, help="Training prompts: hub id, .jsonl/.json/.parquet file, directory."),
    click.option("--split", default="train", show_default=True, help="The prompt split the rounds sample on."),
    click.option("--prompt-field", help="The column holding the prompt (default: prompt, else messages, else chosen)."),
    click.option("--max-prompts", type=int, help="Only the first N training prompts."),
    click.option("--heldout-split", help="A held-out prompt split to judge on (of --heldout-dataset, else --prompts)."),
    click.option("--heldout-dataset", help="Take the held-out prompts from this dataset."),
    click.option("--heldout-size", type=int, help="Or hold out this many of the training prompts."),
    click.option("--heldout-fraction", type=float, help="Or hold out this share of the training prompts."),
    click.option("--rounds", "-n", "rounds", type=int, default=3, show_default=True, help="Online rounds."),
    click.option("--prompts-per-round", type=int,
                 help="[default: the prompts split evenly into --rounds disjoint slices]"),
    click.option("--reuse-prompts", is_flag=True, help="Sample the same prompts every round."),
    click.option("--reward", "-r", required=True,
                 help="module:function, path/file.py:function, or a reward model (hub id or directory)."),
    click.option("--num-samples", type=int, default=NUM_SAMPLES, show_default=True, help="Answers per prompt."),
    click.option("--strategy", type=click.Choice(STRATEGIES), default="best-worst", show_default=True),
    click.option("--min-gap", type=float, default=0.0, show_default=True, help="Keep a pair only above this score gap."),
    click.option("--allow-unfinished-chosen", is_flag=True, help="Let an answer cut off by the token budget be chosen."),
    click.option("--temperature", type=float, help=f"Sampling temperature [default: {TEMPERATURE}]."),
    click.option("--top-p", type=float, help=f"[default: {TOP_P}]"),
    click.option("--max-new-tokens", type=int, help="Answer length, sampling and judging [default: the preset's]."),
    click.option("--seed", type=int, help="Sampling seed (round k uses seed + k - 1) [default: 42]."),
    click.option("--batch-size", type=int, help="Prompts per sampling batch (the unit of resuming)."),
    click.option("--judge-batch-size", type=int, help="Generation batch of the held-out answers."),
    click.option("--backend", type=click.Choice(["auto", "vllm", "transformers"]), default="auto", show_default=True),
    click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
                 help="Of sampling and judging (training: model.dtype)."),
    click.option("--reference", type=click.Choice(["previous", "initial"]), default="previous", show_default=True,
                 help="previous: round k's reference is π_{k-1}; initial: π0 throughout."),
    click.option("--reward-batch-size", type=int, default=8, show_default=True),
    click.option("--reward-dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True),
    click.option("--reward-max-length", type=int, default=4096, show_default=True),
    click.option("--trust-remote-code", is_flag=True, help="Run the reward model's own code (ArmoRM needs it)."),
    click.option("--output-dir", "-o", required=True, help="The experiment's directory (rounds, rounds.json, rounds.png)."),
    click.option("--compare-offline", is_flag=True,
                 help="Also train one offline round from π0 with the same pairs and steps, judged alike."),
    click.option("--overwrite", is_flag=True, help="Start the experiment again (discards its rounds)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress lines, bars or tables."),
]


def _with_options(fn):
    for option in reversed(ITERATE_OPTIONS):
        fn = option(fn)
    return fn


def options_from(kw: dict):
    """`IterateOptions` from the command's keywords (the decoding and reward parts gathered)."""
    from ..evaluation.options import DecodingOptions, RewardOptions
    from ..iterate import IterateOptions

    sampling = DecodingOptions(**{k: kw.pop(k) for k in ("temperature", "top_p", "max_new_tokens", "seed",
                                                         "batch_size")})
    reward = RewardOptions(kw.pop("reward"), kw.pop("reward_batch_size"), kw.pop("reward_max_length"),
                           kw.pop("reward_dtype"), kw.pop("trust_remote_code"))
    return IterateOptions(sampling=sampling, reward=reward, chosen_must_finish=not kw.pop("allow_unfinished_chosen"),
                          **kw)


@click.command("iterate")
@_with_options
@friendly
def iterate(**kw):
    """Online α-DPO: rounds of sample → score → pair → train → judge, resumable, one command.

    Round k samples --num-samples answers per prompt from π_{k-1} on its own slice of the prompts,
    scores and pairs them (as `data build`), trains π_k from π_{k-1} (as `train`, the preset's
    method), and judges π_k on the held-out prompts against π0 and π_{k-1} (as `eval reward`).
    Rerun the same command to resume; see docs/iterate.md.
    """
    from ..iterate import run_iterate
    from ..iterate.report import rounds_table

    opts = options_from(kw)
    record = run_iterate(opts, console=err_console)
    if not opts.quiet:
        results.print(rounds_table(record))
        results.print(f"rounds.json, rounds.png in {record['output_dir']}; final model: {record.get('final_model')}",
                      highlight=False, soft_wrap=True)


def register(main: click.Group) -> None:
    main.add_command(iterate)
