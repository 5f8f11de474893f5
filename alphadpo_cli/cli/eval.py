"""`alphadpo eval {alpacaeval, arena-hard, preference, reward}`: thin click commands over the evaluation API
(and, for `reward`, the rewards API)."""

from __future__ import annotations

import click

from . import options as opt
from .common import console, friendly, results


def register(main: click.Group) -> None:
    @main.group("eval")
    def eval_group():
        """Evaluate a model: AlpacaEval 2, Arena-Hard, an offline preference report, or a reward (no judge)."""

    @eval_group.command("alpacaeval")
    @opt.options(*opt.GENERATION)
    @click.option("--model-outputs", type=click.Path(dir_okay=False), help="Judge these outputs (alpaca_eval JSON) instead of generating.")
    @click.option("--eval-set", type=click.Path(dir_okay=False), help="The 805 instructions with reference outputs (JSON).")
    @opt.options(*opt.SAMPLING)
    @opt.options(*opt.JUDGE)
    @click.option("--annotator-backend", type=click.Choice(["builtin", "alpaca_eval"]), default="builtin", show_default=True,
                  help="builtin: the weighted_alpaca_eval_gpt4_turbo protocol implemented here; alpaca_eval: the package (alphadpo[eval]).")
    @click.option("--lc-dir", type=click.Path(file_okay=False), help="Directory with df_gamed.csv / instruction_difficulty.csv for the official LC win rate.")
    @friendly
    def alpacaeval_cmd(**kw):
        """AlpacaEval 2: answers, weighted GPT-4-Turbo-style annotation, LC and raw win rates."""
        from ..evaluation.alpacaeval import AlpacaEvalOptions, print_result, run_alpacaeval

        options = AlpacaEvalOptions(model=opt.model_spec(kw), decoding=opt.decoding(kw), judge=opt.judge(kw),
                                    output=opt.output(kw), **kw)
        _print(print_result, run_alpacaeval(options, console=console))

    @eval_group.command("arena-hard")
    @opt.options(*opt.GENERATION)
    @click.option("--answers", type=click.Path(dir_okay=False), help="Judge these answers (arena-hard-auto JSONL) instead of generating.")
    @click.option("--questions", type=click.Path(dir_okay=False), help="The v0.1 questions (question.jsonl).")
    @click.option("--baseline", type=click.Path(dir_okay=False), help="The gpt-4-0314 answers (model_answer/gpt-4-0314.jsonl).")
    @click.option("--bootstrap-rounds", type=int, default=100, show_default=True)
    @opt.options(*opt.JUDGE)
    @friendly
    def arena_hard_cmd(**kw):
        """Arena-Hard v0.1: greedy answers, two swapped games per question, Bradley-Terry score with CI."""
        from ..evaluation.arenahard import ArenaHardOptions, print_result, run_arena_hard

        options = ArenaHardOptions(model=opt.model_spec(kw), decoding=opt.decoding(kw), judge=opt.judge(kw),
                                   output=opt.output(kw), **kw)
        _print(print_result, run_arena_hard(options, console=console))

    _register_preference(eval_group)
    _register_reward(eval_group)


def _print(print_result, result: dict) -> None:
    """A benchmark's result table, on stdout."""
    print_result(result, results)


def _register_preference(eval_group: click.Group) -> None:
    @eval_group.command("preference")
    @click.option("--model", "-m", help="Policy: base model, or a training output dir.")
    @click.option("--adapter", help="A LoRA adapter directory.")
    @click.option("--ref-model", help="Reference for a full (non-LoRA) model (default: adapters disabled, or the run's base).")
    @click.option("--data", required=True, help="Preference data: file, directory or hub id.")
    @click.option("--split", default="test", show_default=True)
    @click.option("--preset", "-p", help="Take max lengths, truncation and chat template from a preset.")
    @click.option("--max-samples", type=int, help="Only the first N pairs.")
    @click.option("--batch-size", type=int, default=8, show_default=True)
    @click.option("--max-length", type=int)
    @click.option("--max-prompt-length", type=int)
    @click.option("--kl-samples", type=int, default=8, show_default=True, help="Responses sampled for the KL estimate (0: off).")
    @click.option("--kl-max-new-tokens", type=int, default=128, show_default=True)
    @click.option("--seed", type=int, default=42, show_default=True)
    @click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
    @click.option("--output", "-o", type=click.Path(dir_okay=False), help="JSON report (default: outputs/eval/<name>/preference/report.json).")
    @friendly
    def preference_cmd(model, adapter, ref_model, data, split, preset, max_samples, batch_size, max_length,
                       max_prompt_length, kl_samples, kl_max_new_tokens, seed, dtype, output):
        """Offline report on held-out pairs: reward accuracies, margins, KL to the reference, lengths."""
        from ..evaluation.preference import print_result, run_preference

        result = run_preference(data=data, model=model, adapter=adapter, ref_model=ref_model, split=split, preset=preset,
                                max_samples=max_samples, batch_size=batch_size, max_length=max_length,
                                max_prompt_length=max_prompt_length, kl_samples=kl_samples,
                                kl_max_new_tokens=kl_max_new_tokens, seed=seed, dtype=dtype, output=output)
        _print(print_result, result)


def _register_reward(eval_group: click.Group) -> None:
    @eval_group.command("reward")
    @opt.options(*opt.GENERATION)
    @click.option("--reward", "-r", "reward_spec", required=True,
                  help="module:function, path/file.py:function (e.g. examples/verifiable_reward.py:reward) or a reward model.")
    @click.option("--data", required=True, help="Held-out prompts: a preference (or prompt) file, directory, pkg:... or hub id.")
    @click.option("--split", default="test", show_default=True)
    @click.option("--baseline", help="Answers to compare with: a model, adapter or run dir, an answers file (.json/.jsonl), "
                                     "or 'none' (default: the base model of --model/--adapter).")
    @click.option("--temperature", type=float, help="Sample at this temperature (default: greedy).")
    @opt.options("top_p", "seed")
    @click.option("--reward-batch-size", type=int, default=8, show_default=True, help="Pairs per batch of a reward model.")
    @click.option("--reward-max-length", type=click.IntRange(min=8), default=4096, show_default=True,
                  help="Reward model input tokens; a longer item keeps its end (the prompt is cut from the left) and is counted.")
    @click.option("--trust-remote-code", is_flag=True, help="Let a reward model run its own code (ArmoRM).")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
    @friendly
    def reward_cmd(**kw):
        """Answers on held-out prompts scored by a reward: mean ± SE, win rate vs a baseline, lengths."""
        _reward_command(**kw)


def _reward_command(*, reward_spec: str, as_json: bool, **kw) -> None:
    """`alphadpo eval reward`: the command's flags as a `RewardEvalOptions`, then `run_reward_eval`."""
    from ..evaluation.options import RewardOptions
    from ..rewards.evaluate import RewardEvalOptions, print_result, run_reward_eval

    reward = RewardOptions(reward_spec, batch_size=kw.pop("reward_batch_size"), max_length=kw.pop("reward_max_length"),
                           trust_remote_code=kw.pop("trust_remote_code"))
    options = RewardEvalOptions(reward=reward, model=opt.model_spec(kw), decoding=opt.decoding(kw),
                                output=opt.output(kw), **kw)
    result = run_reward_eval(options, console=console)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
        return
    _print(print_result, result)
