"""`alphadpo data build`: the command-line face of :mod:`alphadpo_cli.rewards.build`.

Only the build package's constants are imported at the top (it imports neither torch nor
transformers), so `alphadpo --help` stays instant.
"""

from __future__ import annotations

import click

from ..rewards.build import DEFAULT_BATCH, NUM_SAMPLES, STRATEGIES, TEMPERATURE, TOP_P
from .common import console as err_console
from .common import friendly, results


def _shard(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        k, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not K/N (e.g. 0/4)") from None
    if not 0 <= k < n:
        raise click.BadParameter(f"'{value}': expected 0 <= K < N")
    return k, n


# `alphadpo data build`'s options, in --help order: one per `BuildOptions` field (but
# --allow-unfinished-chosen, the negation of `chosen_must_finish`, and --quiet)
BUILD_OPTIONS = [
    click.option("--dataset", "-d", required=True, help="Prompts: hub id, .jsonl/.json/.parquet file, or directory."),
    click.option("--split", default="train", show_default=True, help="The prompt split to build the training pairs from."),
    click.option("--test-split", help="A held-out prompt split (e.g. test_prefs): test.jsonl is built from it."),
    click.option("--test-dataset", help="Take the held-out prompts from this dataset (default: --dataset)."),
    click.option("--test-fraction", type=float, help="Hold out this share of the prompts for test.jsonl instead."),
    click.option("--test-size", type=int, help="Hold out this many prompts for test.jsonl instead."),
    click.option("--prompt-field", help="The column holding the prompt (default: prompt, else messages, else chosen)."),
    click.option("--max-prompts", type=int, help="Only the first N prompts of each prompt split."),
    click.option("--model", "-m", help="The policy that answers: hub id, local dir, .gguf, pkg:..., tiny-random, a run dir."),
    click.option("--adapter", help="A LoRA adapter directory on --model."),
    click.option("--preset", "-p", help="Answer length, stop ids, chat template (and the model) from a preset."),
    click.option("--chat-template", help="Override the model's chat template."),
    click.option("--reward", "-r", required=True,
                  help="module:function, path/file.py:function, or a reward model (e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1)."),
    click.option("--output-dir", "-o", required=True, help="Writes train.jsonl, test.jsonl, build.json (work in .work/)."),
    click.option("--num-samples", "-n", type=int, default=NUM_SAMPLES, show_default=True, help="Answers per prompt."),
    click.option("--temperature", type=float, help=f"Sampling temperature [default: {TEMPERATURE}]."),
    click.option("--top-p", type=float, help=f"[default: {TOP_P}]"),
    click.option("--max-new-tokens", type=int, help="[default: the preset's, else 1024]"),
    click.option("--seed", type=int, default=42, show_default=True),
    click.option("--batch-size", type=int,
                  help=f"Prompts per batch, the unit of resuming and sharding [default: {DEFAULT_BATCH['transformers']} "
                       f"with transformers, {DEFAULT_BATCH['vllm']} with vLLM]."),
    click.option("--backend", type=click.Choice(["auto", "vllm", "transformers"]), default="auto", show_default=True,
                  help="auto: vLLM when installed and a GPU is present, else transformers."),
    click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True),
    click.option("--gpu-memory-utilization", type=float, help="vLLM's share of the GPU memory."),
    click.option("--strategy", type=click.Choice(STRATEGIES), default="best-worst", show_default=True,
                  help="best-worst: best vs worst answer; all-pairs: every two answers; best-random: best vs a random other."),
    click.option("--min-gap", type=float, default=0.0, show_default=True, help="Keep a pair only when its score gap is larger."),
    click.option("--allow-unfinished-chosen", is_flag=True,
                  help="Let an answer cut off by the token budget be chosen (by default a chosen answer must end on its own)."),
    click.option("--keep-all", is_flag=True, help="Also write every answer and score (all_generated_responses, all_rm_scores)."),
    click.option("--score-decimals", type=int, help="Round the written scores."),
    click.option("--reward-batch-size", type=int, default=8, show_default=True, help="Reward model batch size."),
    click.option("--reward-dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True),
    click.option("--reward-max-length", type=int, default=4096, show_default=True, help="Reward model input tokens."),
    click.option("--trust-remote-code", is_flag=True, help="Run the reward model's own code (ArmoRM needs it)."),
    click.option("--shard", callback=_shard, metavar="K/N",
                  help="Take every N-th batch from the K-th [default: RANK/WORLD_SIZE from torchrun or accelerate]."),
    click.option("--work-dir", help="Answers and scores of finished batches [default: OUTPUT_DIR/.work]."),
    click.option("--max-batches", type=int, help="Stop after this many new batches (resume later)."),
    click.option("--generate-only", is_flag=True, help="Only sample the answers; a later run scores them."),
    click.option("--merge", "merge_only", is_flag=True, help="Only write the dataset from the shards' finished work."),
    click.option("--overwrite", is_flag=True, help="Start again: discard the work directory and the outputs."),
    click.option("--rescore", is_flag=True, help="Keep the answers, discard the scores (a new --reward)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary table."),
]


def _with_options(options: list):
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def register(main: click.Group) -> None:
    @main.group("data")
    def data_group():
        """Build preference data."""

    @data_group.command("build")
    @_with_options(BUILD_OPTIONS)
    @friendly
    def build_cmd(quiet, allow_unfinished_chosen, **kw):
        """Sample N answers per prompt from a model, score them with a reward, write chosen/rejected pairs.

        The paper's on-policy data (SimPO's recipe: 5 samples at T 0.8, top-p 0.95, ArmoRM) for any
        model; `alphadpo train --dataset OUTPUT_DIR` reads the result. Resumable batch by batch, and
        sharded over processes (torchrun / accelerate / --shard K/N). See docs/data-build.md.
        """
        from ..rewards.build import BuildOptions, build_dataset, print_summary

        opts = BuildOptions(chosen_must_finish=not allow_unfinished_chosen, **kw)
        summary = build_dataset(opts, console=err_console, quiet=quiet)
        if not quiet:
            print_summary(summary, results)
