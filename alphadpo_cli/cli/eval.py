"""`alphadpo eval {alpacaeval, arena-hard, preference, reward}`: thin click commands over the evaluation API
(and, for `reward`, the rewards API)."""

from __future__ import annotations

import click

from .common import friendly


def _model_options(fn):
    for opt in reversed([
        click.option("--model", "-m", help="Base model: hub id, local dir, .gguf, pkg:..., tiny-random, or a training output dir."),
        click.option("--adapter", help="A LoRA adapter directory (a training output dir works too)."),
        click.option("--preset", "-p", help="Take decoding settings (and the model, if --model is not given) from a preset."),
        click.option("--name", help="Name of the model in outputs (default: from the model/adapter path)."),
        click.option("--output-dir", "-o", help="Default: outputs/eval/<name>/<benchmark>/"),
        click.option("--max-instances", type=int, help="Only this many prompts (a quick run)."),
        click.option("--max-new-tokens", type=int, help="Override the preset's answer length."),
        click.option("--batch-size", type=int, help="Generation batch size (transformers backend)."),
        click.option("--backend", type=click.Choice(["auto", "vllm", "transformers"]), default="auto", show_default=True,
                     help="auto: vLLM when installed and a GPU is present, else transformers."),
        click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True),
        click.option("--overwrite", is_flag=True, help="Discard previously generated answers in the output dir."),
    ]):
        fn = opt(fn)
    return fn


def _judge_options(fn):
    for opt in reversed([
        click.option("--no-judge", "no_judge", is_flag=True, help="Only generate the answers."),
        click.option("--judge-base-url", help="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)."),
        click.option("--judge-model", help="Judge model name (default: gpt-4-1106-preview, as the papers)."),
        click.option("--judge-api-key-env", default="OPENAI_API_KEY", show_default=True,
                     help="Environment variable holding the judge's API key."),
        click.option("--judge-concurrency", type=int, default=8, show_default=True, help="Parallel judge requests."),
        click.option("--judge-max-retries", type=int, default=6, show_default=True),
        click.option("--judge-timeout", type=float, default=300.0, show_default=True, help="Seconds per request."),
        click.option("--judge-backoff", type=float, default=1.0, show_default=True,
                     help="First retry delay in seconds (doubles, with jitter); 429s follow Retry-After."),
        click.option("--rejudge-malformed", is_flag=True, help="Ask the judge again where it answered unusably."),
    ]):
        fn = opt(fn)
    return fn


def _console():
    from rich.console import Console

    return Console(stderr=True)


def register(main: click.Group) -> None:
    @main.group("eval")
    def eval_group():
        """Evaluate a model: AlpacaEval 2, Arena-Hard, an offline preference report, or a reward (no judge)."""

    @eval_group.command("alpacaeval")
    @_model_options
    @click.option("--model-outputs", type=click.Path(dir_okay=False), help="Judge these outputs (alpaca_eval JSON) instead of generating.")
    @click.option("--eval-set", type=click.Path(dir_okay=False), help="The 805 instructions with reference outputs (JSON).")
    @click.option("--temperature", type=float, help="Override the preset's temperature (0 = greedy).")
    @click.option("--top-p", type=float)
    @click.option("--seed", type=int, help="Sampling seed.")
    @_judge_options
    @click.option("--annotator-backend", type=click.Choice(["builtin", "alpaca_eval"]), default="builtin", show_default=True,
                  help="builtin: the weighted_alpaca_eval_gpt4_turbo protocol implemented here; alpaca_eval: the package (alphadpo[eval]).")
    @click.option("--lc-dir", type=click.Path(file_okay=False), help="Directory with df_gamed.csv / instruction_difficulty.csv for the official LC win rate.")
    @friendly
    def alpacaeval_cmd(model, adapter, preset, name, output_dir, max_instances, max_new_tokens, batch_size, backend, dtype,
                       overwrite, model_outputs, eval_set, temperature, top_p, seed, no_judge, judge_base_url, judge_model,
                       judge_api_key_env, judge_concurrency, judge_max_retries, judge_timeout, judge_backoff,
                       rejudge_malformed, annotator_backend, lc_dir):
        """AlpacaEval 2: answers, weighted GPT-4-Turbo-style annotation, LC and raw win rates."""
        from ..evaluation.alpacaeval import print_result, run_alpacaeval

        console = _console()
        result = run_alpacaeval(
            model=model, adapter=adapter, preset=preset, model_outputs=model_outputs, name=name, output_dir=output_dir,
            eval_set=eval_set, max_instances=max_instances, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, backend=backend, dtype=dtype,
            overwrite=overwrite, judge=not no_judge, judge_base_url=judge_base_url, judge_model=judge_model,
            judge_api_key_env=judge_api_key_env, judge_concurrency=judge_concurrency,
            judge_max_retries=judge_max_retries, judge_timeout=judge_timeout, judge_backoff=judge_backoff,
            annotator_backend=annotator_backend, rejudge_malformed=rejudge_malformed, lc_dir=lc_dir, console=console)
        from rich.console import Console

        print_result(result, Console())

    @eval_group.command("arena-hard")
    @_model_options
    @click.option("--answers", type=click.Path(dir_okay=False), help="Judge these answers (arena-hard-auto JSONL) instead of generating.")
    @click.option("--questions", type=click.Path(dir_okay=False), help="The v0.1 questions (question.jsonl).")
    @click.option("--baseline", type=click.Path(dir_okay=False), help="The gpt-4-0314 answers (model_answer/gpt-4-0314.jsonl).")
    @click.option("--bootstrap-rounds", type=int, default=100, show_default=True)
    @_judge_options
    @friendly
    def arena_hard_cmd(model, adapter, preset, name, output_dir, max_instances, max_new_tokens, batch_size, backend, dtype,
                       overwrite, answers, questions, baseline, bootstrap_rounds, no_judge, judge_base_url, judge_model,
                       judge_api_key_env, judge_concurrency, judge_max_retries, judge_timeout, judge_backoff,
                       rejudge_malformed):
        """Arena-Hard v0.1: greedy answers, two swapped games per question, Bradley-Terry score with CI."""
        from ..evaluation.arenahard import print_result, run_arena_hard

        console = _console()
        result = run_arena_hard(
            model=model, adapter=adapter, preset=preset, answers=answers, name=name, output_dir=output_dir,
            questions=questions, baseline=baseline, max_instances=max_instances, max_new_tokens=max_new_tokens,
            batch_size=batch_size, backend=backend, dtype=dtype, overwrite=overwrite, judge=not no_judge,
            judge_base_url=judge_base_url, judge_model=judge_model, judge_api_key_env=judge_api_key_env,
            judge_concurrency=judge_concurrency, judge_max_retries=judge_max_retries, judge_timeout=judge_timeout,
            judge_backoff=judge_backoff, rejudge_malformed=rejudge_malformed, bootstrap_rounds=bootstrap_rounds,
            console=console)
        from rich.console import Console

        print_result(result, Console())

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
        from rich.console import Console

        print_result(result, Console())

    _register_reward(eval_group)


def _register_reward(eval_group: click.Group) -> None:
    @eval_group.command("reward")
    @_model_options
    @click.option("--reward", "-r", "reward_spec", required=True,
                  help="module:function, path/file.py:function (e.g. examples/verifiable_reward.py:reward) or a reward model.")
    @click.option("--data", required=True, help="Held-out prompts: a preference (or prompt) file, directory, pkg:... or hub id.")
    @click.option("--split", default="test", show_default=True)
    @click.option("--baseline", help="Answers to compare with: a model, adapter or run dir, an answers file (.json/.jsonl), "
                                     "or 'none' (default: the base model of --model/--adapter).")
    @click.option("--temperature", type=float, help="Sample at this temperature (default: greedy).")
    @click.option("--top-p", type=float)
    @click.option("--seed", type=int, help="Sampling seed.")
    @click.option("--reward-batch-size", type=int, default=8, show_default=True, help="Pairs per batch of a reward model.")
    @click.option("--reward-max-length", type=click.IntRange(min=8), default=4096, show_default=True,
                  help="Reward model input tokens; a longer item keeps its end (the prompt is cut from the left) and is counted.")
    @click.option("--trust-remote-code", is_flag=True, help="Let a reward model run its own code (ArmoRM).")
    @click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
    @friendly
    def reward_cmd(model, adapter, preset, name, output_dir, max_instances, max_new_tokens, batch_size, backend, dtype,
                   overwrite, reward_spec, data, split, baseline, temperature, top_p, seed, reward_batch_size,
                   reward_max_length, trust_remote_code, as_json):
        """Answers on held-out prompts scored by a reward: mean ± SE, win rate vs a baseline, lengths."""
        from ..rewards.evaluate import print_result, run_reward_eval

        result = run_reward_eval(
            reward=reward_spec, data=data, split=split, model=model, adapter=adapter, preset=preset, baseline=baseline,
            name=name, output_dir=output_dir, max_instances=max_instances, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, backend=backend, dtype=dtype,
            overwrite=overwrite, reward_batch_size=reward_batch_size, reward_max_length=reward_max_length,
            trust_remote_code=trust_remote_code, console=_console())
        if as_json:
            import json

            click.echo(json.dumps(result, indent=2))
            return
        from rich.console import Console

        print_result(result, Console())
