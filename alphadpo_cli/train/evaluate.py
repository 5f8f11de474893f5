"""The held-out split during training: the preference report before, during and after training."""

from __future__ import annotations

import torch
from rich.console import Console

from ..config import Config
from ..data import TokenizedSplit
from ..logps.scoring import ScoringLayout, preference_report, score_with_reference
from ..losses import PreferenceLogps
from ..models.loading import LoadedModels
from .step import Objective


def evaluate(accelerator, cfg: Config, models: LoadedModels, split: TokenizedSplit,
             reference_scores: PreferenceLogps | None, label: str, *, console: Console,
             objective: Objective | None = None) -> dict:
    """The held-out preference report. With `objective` (α-DPO's eval_updates_stats), the held-out
    batches also run the loss and update its normaliser, as the authors' evaluation does."""
    t = cfg.training
    # scored as the training forward and the reference precompute score: packed when the run packs
    scores = score_with_reference(models.policy, split, reference=models.reference, reference_scores=reference_scores,
                                  pad_token_id=models.tokenizer.pad_token_id, device=accelerator.device,
                                  layout=ScoringLayout.of_training(t, t.eval_batch_size))
    return _report(accelerator, scores, label, console=console, objective=objective,
                   eval_batch_size=t.eval_batch_size)


def _report(accelerator, scores: PreferenceLogps, label: str, *, console: Console, objective: Objective | None,
            eval_batch_size: int, note: str = "") -> dict:
    report = preference_report(scores)
    if objective is not None:
        report["loss"] = eval_loss_updating(scores, objective, eval_batch_size, accelerator.num_processes)
    if accelerator.is_main_process:
        console.print(
            f"held-out preference accuracy {label}: {report['accuracy']:.3f} (implicit length-normalised reward)"
            + (f", {report['accuracy_ref']:.3f} (reference-relative)" if report.get("accuracy_ref") is not None else "")
            + f" on {report['pairs']} pairs" + note
        )
    return report


def starts_at_reference(cfg: Config, models: LoadedModels) -> bool:
    """Whether the policy, before its first step, is the reference network itself: the same starting
    weights (no `model.init_adapter`, no separate `model.reference`) and, with adapters, every LoRA
    `B` exactly zero (PEFT's initialisation), so the adapters add exact zeros. Not with DoRA (its
    magnitude rescaling is the identity in exact arithmetic only) nor with partitioned (ZeRO-3)
    adapter weights, which this process cannot read whole."""
    if models.policy_fingerprint not in (None, models.fingerprint) or cfg.model.reference:
        return False
    if cfg.model.mode == "full":
        return True
    zero_b = None
    for name, p in models.policy.named_parameters():
        if "lora_magnitude" in name or getattr(p, "ds_tensor", None) is not None:
            return False
        if "lora_B" in name or "lora_embedding_B" in name:
            if p.numel() == 0 or torch.count_nonzero(p.detach()).item():
                return False
            zero_b = True
    return bool(zero_b)


def evaluate_at_start(accelerator, cfg: Config, models: LoadedModels, split: TokenizedSplit,
                      reference_scores: PreferenceLogps | None, *, console: Console) -> dict:
    """The held-out report before training. Where the policy starts at the reference
    (`starts_at_reference`) and the reference's held-out scores were precomputed, those scores are the
    policy's too: reported without another pass over the split (reference-relative rewards exactly 0,
    their accuracy ½ with ties counting one half). Otherwise the split is scored (`evaluate`)."""
    if reference_scores is None or not starts_at_reference(cfg, models):
        return evaluate(accelerator, cfg, models, split, reference_scores, "before training", console=console)
    return _report(accelerator, reference_scores.with_reference(reference_scores), "before training",
                   console=console, objective=None, eval_batch_size=cfg.training.eval_batch_size,
                   note=" (the policy starts as the reference: its precomputed scores)")


def eval_loss_updating(scores: PreferenceLogps, objective: Objective, eval_batch_size: int, processes: int) -> float:
    """Run the loss over the held-out pairs in the batches of the authors' evaluation loop, in
    order, updating the normaliser once per batch (the mean loss is returned).

    Their TRL loop gives each process `eval_batch_size` pairs per step and all-gathers g; here
    every process holds the scores of the whole split, so it takes the global batch of
    eval_batch_size × processes pairs itself, with no communication (`normalizer.local()`).
    With several processes the last batch is filled up from the start of the split, as
    accelerate's even batches do.

    Each batch is one step of the normaliser (`begin_step`/`end_step`), as in training: "official"
    updates from the batch before normalising it (the authors' order); "ema" normalises it with
    the statistics as they stand and then updates them once from the whole batch (the training
    steps' one-step lag)."""
    n = int(scores.policy_chosen_logps.numel())
    per_step = eval_batch_size * processes
    losses = []
    normalizer = objective.normalizer
    with normalizer.local():
        for start in range(0, n, per_step):
            idx = torch.arange(start, start + per_step)
            idx = idx % n if processes > 1 else idx[idx < n]
            normalizer.begin_step()
            out = objective(scores.select(idx))
            normalizer.end_step(update=True)
            losses.append(out.losses)
    return torch.cat(losses).mean().item()
