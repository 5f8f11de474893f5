"""What a run needs, built one `setup_*` function at a time, each taking what a test or a benchmark
injects instead (`setup_models(..., models=)`, `setup_data(..., splits=)`): the loss, the
accelerator, the models, the data, the optimiser and schedule, the loader, and all of them handed
to `accelerator.prepare`. `trainer.Trainer.run` calls them in order.
"""

from __future__ import annotations

import torch

from ..config import Config, ConfigError, TrainingConfig, gradient_accumulation_steps, resolve_for_processes
from ..data import TokenizedSplit, load_splits
from ..kernels.cpu import set_cpu_memory
from ..kernels.norms import install_lean_rmsnorm
from ..kernels.segment_attention import install_segment_attention
from ..logps.layouts import PackedPairCollator, PairCollator
from ..logps.sequence import SequenceLogps
from ..losses import make_normalizer, make_params, requirements
from ..models.checkpointing import checkpoint_layers
from ..models.loading import LoadedModels, load_models, resolve_dtype
from .distributed import check_deepspeed_batch, is_deepspeed, make_accelerator, prepare_deepspeed_config
from .plan import Plan
from .reference import check_reference_frozen, prepare_reference
from .step import Objective, TrainParts

Splits = tuple[TokenizedSplit, "TokenizedSplit | None"]


def setup_objective(cfg: Config, loss_fn) -> Objective:
    """The loss: the registry method, its params and its margin normaliser. What it needs (a reference,
    the token-level KL) is the registry's `requirements` of the resolved params, not the row's
    defaults: `alpha_dpo` with reference_variant=policy computes no reference, `alpha_dpo_policy_ref`
    with reference_variant=ratio gets one. `loss_fn` is what each step calls (the trainer passes its
    module's `compute_loss`, looked up when the run starts: a test's seam)."""
    params = make_params(cfg.loss.name, cfg.loss.params)
    needs = requirements(cfg.loss.name, params)
    # TDPO's δ (App. B.4): the margin comes from Σ_t KL(πref‖πθ) under the full reference distribution,
    # so the reference runs online (the precomputed cache holds per-sequence sums only). Decided by the
    # params, so that loss.params.margin_source=token_kl on another α-DPO variant is honoured too.
    token_kl = needs.needs_token_kl
    if token_kl and not getattr(params, "stop_gradient", True):
        raise ConfigError(
            f"loss '{cfg.loss.name}' with stop_gradient=false: the trainer computes the token-level KL "
            "(TDPO's δ) without gradient, so the margin cannot carry one. Leave loss.params.stop_gradient "
            "true (the default), or use alpha_dpo_no_sg for the sequence-level 'w/o sg' ablation."
        )
    if token_kl and getattr(params, "eval_updates_stats", False):
        raise ConfigError(
            f"loss '{cfg.loss.name}' with eval_updates_stats=true: the held-out loss pass has per-pair "
            "log-probs only, not the token-level KL this margin needs. Leave loss.params.eval_updates_stats false."
        )
    return Objective(cfg.loss.name, params, needs.needs_reference, token_kl,
                     normalizer=make_normalizer(cfg.loss.name, params), loss_fn=loss_fn)


def setup_accelerator(cfg: Config):
    """(accelerator, gradient accumulation steps); resolves model.mode=auto and the learning rate of
    the mode (`config.resolve_for_processes`: the source is in `cfg.origins["learning_rate"]`) and
    seeds every RNG. The accelerator logs to `training.report_to`'s trackers."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(resolve_dtype(cfg.model.dtype), report_to=cfg.training.report_to,
                                   output_dir=cfg.training.output_dir)
    resolve_for_processes(cfg, accelerator.num_processes)
    grad_accum = gradient_accumulation_steps(cfg, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = grad_accum
    set_seed(cfg.training.seed)
    return accelerator, grad_accum


def setup_models(cfg: Config, accelerator, *, need_reference: bool, models: LoadedModels | None = None) -> LoadedModels:
    """Tokenizer, policy and (`need_reference`: a separate online reference, full fine-tuning only)
    the reference: `models` when given, else loaded from `cfg.model`. Either way the run's
    training-time choices are applied: layer checkpointing, lean RMSNorm, segment attention."""
    t = cfg.training
    if accelerator.device.type == "cpu":
        set_cpu_memory(trim=t.trim_cpu_memory)
    if models is None:
        models = load_models(cfg.model, cfg.lora, need_reference_model=need_reference)
    checkpoint_layers(models.policy, t.checkpoint_layers)
    if t.lean_norms and not is_deepspeed(accelerator):
        install_lean_rmsnorm(models.policy)
    if t.packing:  # segment-aware attention; padded calls (scoring) keep the model's own
        for net in (models.policy, models.reference):
            if net is not None:
                install_segment_attention(net)
    return models


def setup_data(cfg: Config, accelerator, tokenizer, splits: Splits | None = None) -> Splits:
    """(train, held-out or None) tokenised splits: `splits` when given, else read and tokenised
    from `cfg.data` (the main process first, so that the others hit its cache)."""
    if splits is not None:
        return splits
    with accelerator.main_process_first():
        return load_splits(cfg.data, tokenizer)


def setup_optimizer(t: TrainingConfig, trainable: list[torch.nn.Parameter], plan: Plan):
    """(AdamW over `trainable`, the learning-rate schedule over the plan's steps)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )
    scheduler = get_scheduler(
        {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_scheduler],
        optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps,
    )
    return optimizer, scheduler


def setup_loader(t: TrainingConfig, split: TokenizedSplit, pad_token_id: int) -> torch.utils.data.DataLoader:
    """Shuffled micro-batches of the training split, packed (one padding-free row) or padded."""
    return torch.utils.data.DataLoader(
        split.dataset.with_format(None, columns=["index", "prompt_ids", "chosen_ids", "rejected_ids"]),
        batch_size=t.per_device_batch_size, shuffle=True,
        collate_fn=(PackedPairCollator(pad_token_id, prefix_sharing=t.prefix_sharing) if t.packing
                    else PairCollator(pad_token_id)),
        generator=torch.Generator().manual_seed(t.seed),
    )


def setup_parts(cfg: Config, accelerator, models: LoadedModels, train_split: TokenizedSplit, plan: Plan,
                grad_accum: int) -> TrainParts:
    """Optimiser, schedule, loader and the scorers, handed to `accelerator.prepare` (under DeepSpeed
    its engine; a separate reference under ZeRO-3 gets an eval-only engine of its own)."""
    t = cfg.training
    if not is_deepspeed(accelerator):  # DeepSpeed places (under ZeRO-3: partitions) it
        models.policy.to(accelerator.device)
    trainable = [p for p in models.policy.parameters() if p.requires_grad]
    optimizer, scheduler = setup_optimizer(t, trainable, plan)
    loader = setup_loader(t, train_split, models.tokenizer.pad_token_id)
    scorer = SequenceLogps(models.policy, chunk_size=t.logprob_chunk_size)
    reference_scorer = None
    if models.reference is not None:
        reference_scorer = SequenceLogps(models.reference, chunk_size=t.logprob_chunk_size)
    check_reference_frozen(models, optimizer)
    prepare_deepspeed_config(accelerator, models.policy)
    scorer, optimizer, loader, scheduler = accelerator.prepare(scorer, optimizer, loader, scheduler)
    check_deepspeed_batch(accelerator, t, grad_accum)
    if reference_scorer is not None:
        reference_scorer = prepare_reference(accelerator, reference_scorer)
    return TrainParts(accelerator, models, scorer, reference_scorer, optimizer, scheduler, loader, trainable)
