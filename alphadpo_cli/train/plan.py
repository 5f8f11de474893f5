"""What a run will do (steps, batches, reference, memory), printed by --dry-run and at the start of a run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..config import Config, resolve_learning_rate, resolve_mode
from ..data import TokenizedSplit
from ..models.loading import LoadedModels


@dataclass
class Plan:
    """What a run will do, printed by --dry-run and at the start of a run."""

    train_pairs: int
    eval_pairs: int
    processes: int
    mode: str  # model.mode as resolved for this number of processes (auto: full on several, lora on one)
    learning_rate: float
    learning_rate_source: str  # "preset NAME (lora = 10x full rule)", "user: --set training.learning_rate", ...
    per_device_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tokens_per_epoch: int
    needs_reference: bool
    reference: str
    memory_gb: float
    data_summary: str

    def table(self):
        from rich.table import Table

        t = Table(title="plan", show_header=False)
        for k, v in dataclasses.asdict(self).items():
            shown = f"{v:g}" if k == "learning_rate" else f"{v:.2f}" if isinstance(v, float) else str(v)
            t.add_row(k.replace("_", " "), shown)
        return t


def make_plan(cfg: Config, models: LoadedModels, train: TokenizedSplit, evaluation: TokenizedSplit | None, *,
              processes: int, grad_accum: int, dtype: torch.dtype, needs_reference: bool, online_reference: bool,
              token_kl: bool) -> Plan:
    """The plan of `cfg` once resolved for `processes` (`config.resolve_for_processes`: model.mode and
    training.learning_rate as the run uses them, the rate's source in `cfg.origins`)."""
    t = cfg.training
    mode = resolve_mode(cfg.model.mode, processes)
    learning_rate, lr_source = resolve_learning_rate(cfg, mode)
    micro_per_epoch = math.ceil(len(train) / (t.per_device_batch_size * processes))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / grad_accum))
    total = math.ceil(steps_per_epoch * t.num_epochs)
    if t.max_steps > 0:  # as in transformers: max_steps overrides the number of epochs
        total = t.max_steps
    ref = "none (reference-free method)"
    if needs_reference:
        how = "adapters disabled" if models.reference_is_adapter_disabled else "frozen copy"
        ref = f"online ({how})" if online_reference else f"precomputed ({how})"
        if token_kl:
            ref += ", token-level KL" + (" (training.precompute_ref ignored)" if t.precompute_ref else "")
    max_tokens = t.per_device_batch_size * 2 * train.stats.max_sequence
    return Plan(
        train_pairs=len(train),
        eval_pairs=len(evaluation) if evaluation is not None else 0,
        processes=processes,
        mode=mode,
        learning_rate=learning_rate,
        learning_rate_source=lr_source,
        per_device_batch=t.per_device_batch_size,
        grad_accum=grad_accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(total * t.warmup_ratio),
        tokens_per_epoch=train.stats.prompt_tokens * 2 + train.stats.response_tokens,
        needs_reference=needs_reference,
        reference=ref,
        memory_gb=estimate_memory_gb(models.policy, mode, dtype, max_tokens),
        data_summary=train.stats.summary(),
    )


def estimate_memory_gb(model: torch.nn.Module, mode: str, dtype: torch.dtype, max_tokens: int) -> float:
    """Rough peak: weights + trainable params' grads and Adam moments (fp32) + activations."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bytes_per = torch.finfo(dtype).bits // 8
    weights = n_all * (0.55 if mode == "qlora" else bytes_per)
    optimiser = n_train * (4 + 4 + 4 + (4 if dtype != torch.float32 else 0))
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 1024)
    layers = getattr(cfg, "num_hidden_layers", 12)
    activations = max_tokens * hidden * layers * 16 * bytes_per / 4
    return (weights + optimiser + activations) / 1e9
