"""The three kinds of work a comparison does, each through the package's public API:

* `train_run`: `alphadpo train` on one run's config (resumed from its latest checkpoint when a
  killed run left one, else started afresh in its directory);
* `test_accuracy`: held-out preference accuracy of a model on the test pairs, scored as the
  trainer's held-out report scores them (`logps.scoring`);
* `reward_eval`: `alphadpo eval reward` (its API) on the test prompts; the base model's answers
  are generated once, in `<out>/eval/base/`, and every run is judged against them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .carve import HeldOut


def train_run(cfg, console=None) -> dict:
    """Train (or resume) one run; the part of its result the comparison keeps."""
    from ..train.checkpoint import latest_checkpoint
    from ..train.trainer import train

    out = Path(cfg.training.output_dir)
    resume = latest_checkpoint(out) is not None
    result = train(cfg, overwrite=not resume, resume=True if resume else None, console=console)
    return {"steps": result.steps, "seconds": result.seconds, "pairs_per_second": result.pairs_per_second,
            "eval_before": result.eval_before, "eval_after": result.eval_after,
            "resumed_from_step": result.resumed_from_step}


def test_accuracy(model: str, cfg, test: HeldOut) -> dict:
    """preference_report of `model` (a run directory or the base model) on the test pairs, with the
    run's tokenisation; the reference is the base (a LoRA policy with its adapters disabled)."""
    import torch

    from ..data import TokenizeSettings, tokenize_split
    from ..logps.scoring import ScoringLayout, preference_report, score_with_reference
    from ..models.inference import load_for_inference

    d = cfg.data
    policy, tok = load_for_inference(model, dtype=cfg.model.dtype, chat_template=cfg.model.chat_template)
    is_base = model == cfg.model.name_or_path
    reference = None
    if not is_base and cfg.model.mode == "full":
        reference, _ = load_for_inference(cfg.model.name_or_path, dtype=cfg.model.dtype,
                                          chat_template=cfg.model.chat_template)
    split = tokenize_split(test.data, test.split, tok, TokenizeSettings(d.max_length, d.max_prompt_length,
                                                                        d.truncation, d.pipeline), test.max_samples)
    with torch.no_grad():
        scores = score_with_reference(policy, split, reference=reference, with_reference=not is_base,
                                      pad_token_id=tok.pad_token_id,
                                      layout=ScoringLayout.of_training(cfg.training, cfg.training.eval_batch_size))
    report = preference_report(scores)
    del policy, reference
    return {k: report.get(k) for k in ("pairs", "accuracy", "accuracy_ref", "reward_margin", "ref_reward_margin")}


def reward_eval(model: str, out_dir: Path, *, reward: str, test: HeldOut, max_new_tokens: int, batch_size: int,
                baseline: str, preset: str | None = None, console=None, quiet: bool = False) -> dict:
    """`eval reward` of one model; its summary and its per-prompt rewards (prompt key -> reward)."""
    from ..evaluation.options import DecodingOptions, ModelSpec, OutputOptions, RewardOptions
    from ..rewards.evaluate import RewardEvalOptions, run_reward_eval

    result = run_reward_eval(RewardEvalOptions(
        reward=RewardOptions(reward), data=test.data, split=test.split, max_instances=test.max_samples,
        model=ModelSpec(model, preset=preset), baseline=baseline,
        decoding=DecodingOptions(max_new_tokens=max_new_tokens, batch_size=batch_size),
        output=OutputOptions(output_dir=str(out_dir), name=Path(out_dir).name, quiet=quiet)), console=console)
    rows = json.loads(Path(result["scores"]).read_text(encoding="utf-8"))
    stats, win = result["model_stats"], result.get("win") or {}
    summary = {"mean_reward": stats["mean_reward"], "reward_se": stats["reward_se"], "n_prompts": result["n_prompts"],
               "length_tokens": stats["length_tokens"], "length_words": stats["length_words"],
               "win_rate": win.get("win_rate"), "win_rate_se": win.get("win_rate_se"), **stats["extras"],
               "answers": result["answers"]}
    return {"summary": summary, "scores": {r["key"]: r.get("score") for r in rows}}
