"""The three phases of a round, each resumable through its own mechanism, each returning the
summary that `progress.jsonl` records and the round table shows:

* `sample`: `data build` with π_{k-1} on the round's prompts (N answers each, scored, paired);
  a kill resumes from its work directory, batch by batch;
* `train`: `train` from π_{k-1} with the chosen reference (`layout.Models.train_overrides`); a kill
  resumes from the run's newest checkpoint (`--set training.save_steps=N` makes them); launched
  over several processes as `alphadpo train` is when the config asks for them;
* `judge`: `eval reward` of π_k on the held-out prompts against π_0's and π_{k-1}'s answers (both
  generated once, in their own eval directories, and read back as answer files); a kill resumes
  from the saved answers and the score cache.
"""

from __future__ import annotations

from pathlib import Path

from ..artefacts import read_lines
from ..config import ConfigError, load_config_file, resolve_config, save_config
from ..evaluation.options import DecodingOptions, ModelSpec, OutputOptions
from ..io import atomic_write_json
from ..prompts import PromptRow
from .options import IterateOptions
from .prompts import write_prompt_file

SEED = 42


def sample(opts: IterateOptions, rows: list[PromptRow], prompts_file: Path, data_dir: Path, model: str,
           seed_offset: int, console=None) -> dict:
    """Answers of `model` to `rows`, scored and paired into `data_dir/train.jsonl`."""
    from ..rewards.build import BuildOptions, build_dataset

    write_prompt_file(prompts_file, rows)
    r, s = opts.reward, opts.sampling
    build = BuildOptions(
        dataset=str(prompts_file), output_dir=str(data_dir), model=model, reward=r.reward, preset=opts.preset,
        num_samples=opts.num_samples, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
        seed=(SEED if s.seed is None else s.seed) + seed_offset, batch_size=s.batch_size, backend=opts.backend,
        dtype=opts.dtype, strategy=opts.strategy, min_gap=opts.min_gap,
        chosen_must_finish=opts.chosen_must_finish, reward_batch_size=r.batch_size,
        reward_dtype=r.dtype, reward_max_length=r.max_length, trust_remote_code=r.trust_remote_code, shard=(0, 1))
    summary = build_dataset(build, console=console, quiet=opts.quiet)
    record = summary.record or {}
    train = (record.get("splits") or {}).get("train") or {}
    if not train.get("pairs"):
        raise ConfigError(f"{data_dir}: no pair was kept from {len(rows)} prompts (dropped: "
                          f"{train.get('dropped')}); sample more answers (--num-samples), lower --min-gap, or "
                          "check that the reward tells the answers apart")
    gap = train.get("score_gap") or {}
    return {"prompts": len(rows), "pairs": train["pairs"], "score_gap": gap.get("mean"),
            "dropped": train.get("dropped"), "finished": train.get("finished_share"),
            "seconds_generation": (record.get("throughput") or {}).get("generation_seconds")}


def training_config(opts: IterateOptions, sets: list[str]):
    """The preset (or config file) with the user's `--set` items, then the round's own."""
    return resolve_config(preset=opts.preset, config_file=opts.config_file, loss=opts.loss,
                          overrides=list(opts.overrides) + sets)


def _resume_state(out: Path) -> tuple[bool, bool]:
    """(resume, overwrite): continue from a checkpoint, or replace what a killed start left."""
    from ..train.checkpoint import latest_checkpoint

    if out.is_dir() and latest_checkpoint(out) is not None:
        return True, False
    return False, out.is_dir() and any(out.iterdir())


def train(opts: IterateOptions, sets: list[str], console=None) -> dict:
    """Train one round (or finish a killed one) and summarise it from the files it wrote."""
    from ..train.launch import maybe_relaunch
    from ..train.trainer import train as run_train

    cfg = training_config(opts, sets)
    out = Path(cfg.training.output_dir)
    if not (out / "train_results.json").is_file():  # else it finished before its record was written
        resume, overwrite = _resume_state(out)
        config_file = out.parent / "train.yaml"
        save_config(cfg, config_file)
        argv = ["alphadpo", "train", "--config", str(config_file)] + \
            (["--resume"] if resume else ["--overwrite"] if overwrite else [])
        if not maybe_relaunch(cfg, argv, console=console):
            run_train(cfg, overwrite=overwrite, resume=True if resume else None, console=console)
    return train_summary(out)


def train_summary(out: Path) -> dict:
    """Steps, pairs and the first and last logged loss and accuracy of a finished run."""
    import json

    results = json.loads((out / "train_results.json").read_text())
    logged = [r for r in read_lines(out / "metrics.jsonl") if isinstance(r, dict) and "loss" in r]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    return {"steps": results.get("steps"), "pairs": results.get("pairs"), "loss_first": first.get("loss"),
            "loss": last.get("loss"), "accuracy": last.get("rewards/accuracies"),
            "margin": last.get("rewards/margins"), "seconds": results.get("seconds"),
            "learning_rate": load_config_file(out / "config.yaml").training.learning_rate}


def evaluate(opts: IterateOptions, heldout: Path, model: str, out_dir: Path, baseline: str, name: str,
             console=None) -> dict:
    """`eval reward` of `model` on the held-out prompts against `baseline` (an answers file, or 'none')."""
    from ..rewards.evaluate import RewardEvalOptions, run_reward_eval

    options = RewardEvalOptions(
        reward=opts.reward, data=str(heldout), split="train", baseline=baseline,
        model=ModelSpec(model, None, opts.preset, opts.dtype, opts.backend),
        decoding=DecodingOptions(max_new_tokens=opts.sampling.max_new_tokens, batch_size=opts.judge_batch_size),
        output=OutputOptions(output_dir=str(out_dir), name=name, quiet=opts.quiet))
    return run_reward_eval(options, console=console)


def judge_summary(vs_initial: dict, vs_previous: dict | None) -> dict:
    """Reward ± SE, lengths and the reward's extras of π_k; its win rates against π_0 and π_{k-1}."""
    stats = vs_initial["model_stats"]
    win0 = vs_initial.get("win") or {}
    winp = (vs_previous or {}).get("win") or {}
    return {"n": stats["n"], "reward": stats["mean_reward"], "reward_se": stats["reward_se"],
            "length_tokens": stats["length_tokens"], "length_words": stats["length_words"],
            "truncated": stats["truncated"], "extras": stats["extras"],
            "win_vs_initial": win0.get("win_rate"), "win_vs_initial_se": win0.get("win_rate_se"),
            "win_vs_previous": winp.get("win_rate"), "win_vs_previous_se": winp.get("win_rate_se"),
            "answers": vs_initial["answers"]}


def judge(opts: IterateOptions, heldout: Path, model: str, out_dir: Path, initial_answers: Path,
          previous_answers: Path | None, name: str, console=None) -> dict:
    """π_k against π_0, then (the same answers, scores cached) against π_{k-1} (none: the offline round)."""
    vs_initial = evaluate(opts, heldout, model, out_dir, str(initial_answers), name, console)
    atomic_write_json(out_dir / "vs-initial.json", vs_initial)
    vs_previous = None
    if previous_answers is not None:
        vs_previous = evaluate(opts, heldout, model, out_dir, str(previous_answers), name, console)
        atomic_write_json(out_dir / "vs-previous.json", vs_previous)
    return judge_summary(vs_initial, vs_previous)


def judge_initial(opts: IterateOptions, heldout: Path, model: str, out_dir: Path, console=None) -> dict:
    """π_0's own answers and reward (the baseline of every round)."""
    result = evaluate(opts, heldout, model, out_dir, "none", "initial", console)
    return judge_summary(result, None)

