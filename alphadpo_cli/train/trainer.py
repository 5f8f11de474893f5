"""The training loop: `train(config)`.

Built on accelerate, so the same loop runs on a CPU, one GPU, or many GPUs under DeepSpeed.
The loss is looked up in the registry of `alphadpo_cli.losses`; the loop only turns batches into
per-sequence log-probabilities and hands them over.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import checkpoint as ckpt
from ..config import Config, ConfigError, gradient_accumulation_steps, save_config, validate
from ..data import DataError, TokenizedSplit, load_splits
from ..logps.layouts import PairCollator
from ..io import atomic_write_json
from ..logps.sequence import SequenceLogps, batch_tokens, response_token_kl, scorer_inputs
from ..models.adapters import adapter_free, unwrap_causal_lm
from ..models.checkpointing import checkpoint_layers
from ..losses import LossOutput, PreferenceLogps, compute_loss, get_loss, make_normalizer, make_params
from .logging import LiveProgress, MetricSinks, pair_statistics
from ..models.loading import LoadedModels, load_models, load_reference_only, quiet_libraries, resolve_dtype
from ..models.adapters import reference_mode
from ..kernels.norms import install_lean_rmsnorm
from ..logps.layouts import PackedPairCollator
from ..kernels.segment_attention import install_segment_attention
from ..kernels.cpu import tune_cpu_allocator
from ..logps.cache import ReferenceCache, cache_key
from ..logps.scoring import preference_report, score_pairs, score_with_reference

PREVIOUS = ".previous-run"
WRITE_PROBE = ".write-test-"


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (signal, repeated non-finite steps); a checkpoint was saved."""

    def __init__(self, message: str, checkpoint: Path | None, exit_code: int = 3):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    pairs: int
    seconds: float
    pairs_per_second: float
    losses: list[float] = field(default_factory=list)
    eval_before: dict | None = None
    eval_after: dict | None = None
    skipped_nonfinite: int = 0


@dataclass
class Plan:
    """What a run will do, printed by --dry-run and at the start of a run."""

    train_pairs: int
    eval_pairs: int
    processes: int
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
            t.add_row(k.replace("_", " "), f"{v:.2f}" if isinstance(v, float) else str(v))
        return t


def _estimate_memory_gb(model: torch.nn.Module, mode: str, dtype: torch.dtype, max_tokens: int) -> float:
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


def _deepspeed_on_cpu() -> bool:
    """A process that `accelerate launch` started for DeepSpeed on a machine without CUDA."""
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()
            and os.environ.get("LOCAL_RANK") not in (None, ""))


def _process_group_handlers() -> list:
    """DeepSpeed on CPU processes (`DS_ACCELERATOR=cpu`): name the gloo backend. Left to itself,
    accelerate finds no device backend, initialises DeepSpeed's process group anyway and then records
    "no backend": every rank believes it is process 0 of 1 (no data sharding, every rank the main one,
    a global batch N times too small)."""
    if not _deepspeed_on_cpu():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def _prepare_deepspeed_config(accelerator, model: torch.nn.Module) -> None:
    """Before `accelerator.prepare` under DeepSpeed: fill the hidden-size-based "auto" bucket sizes
    from the wrapped model's config, with accelerate's own formulas. `prepare` reads `model.config`,
    which the `SequenceLogps` wrapper lacks: every rank died there ("Can't find `model.config` entry
    ... auto entries ... reduce_bucket_size, stage3_prefetch_bucket_size, ...")."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    import warnings

    # DeepSpeed's collectives call torch's deprecated all_gather_into_tensor/reduce_scatter_tensor (one
    # FutureWarning per call), and its optimiser step is not the torch optimiser's (one UserWarning).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    if isinstance(model, SequenceLogps):
        model = model.model
    cfg = getattr(unwrap_causal_lm(model), "config", None)
    hidden = getattr(cfg, "hidden_size", None) or max(getattr(cfg, "hidden_sizes", None) or [0]) or None
    if hidden is None:
        return  # accelerate then names the keys to set by hand
    values = {
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
    }
    for key in values:  # only these keys, and only where they say "auto" (or are absent)
        plugin.fill_match(key, must_match=False, **values)


class Trainer:
    def __init__(self, cfg: Config, *, console: Console | None = None, overwrite: bool = False,
                 resume: str | bool | None = None, allow_config_change: bool = False):
        quiet_libraries()
        validate(cfg)
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.overwrite = overwrite
        self.resume = resume
        self.allow_config_change = allow_config_change  # --resume: continue despite a changed model/data/batch/loss
        self._resume_from: Path | None = None
        self.method = get_loss(cfg.loss.name)
        self.params = make_params(cfg.loss.name, cfg.loss.params)
        # TDPO's δ (App. B.4): the margin comes from Σ_t KL(πref‖πθ) under the full reference distribution,
        # so the reference runs online (the precomputed cache holds per-sequence sums only). Decided by the
        # params, so that loss.params.margin_source=token_kl on another α-DPO variant is honoured too.
        self.token_kl = getattr(self.params, "margin_source", None) == "token_kl"
        if self.token_kl and not getattr(self.params, "stop_gradient", True):
            raise ConfigError(
                f"loss '{cfg.loss.name}' with stop_gradient=false: the trainer computes the token-level KL "
                "(TDPO's δ) without gradient, so the margin cannot carry one. Leave loss.params.stop_gradient "
                "true (the default), or use alpha_dpo_no_sg for the sequence-level 'w/o sg' ablation."
            )
        if self.token_kl and getattr(self.params, "eval_updates_stats", False):
            raise ConfigError(
                f"loss '{cfg.loss.name}' with eval_updates_stats=true: the held-out loss pass has per-pair "
                "log-probs only, not the token-level KL this margin needs. Leave loss.params.eval_updates_stats false."
            )
        self.online_reference = self.method.needs_reference and (self.token_kl or not cfg.training.precompute_ref)
        self.output_dir = Path(cfg.training.output_dir).expanduser()
        self._stop_signal: int | None = None

        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        dtype = resolve_dtype(cfg.model.dtype)
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
        self.accelerator = Accelerator(
            mixed_precision=mixed if torch.cuda.is_available() or _deepspeed_on_cpu() else "no",
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # The loop steps the scheduler once per optimiser step; accelerate would otherwise step a
            # prepared scheduler num_processes times per call (its schedule counts per-process batches).
            step_scheduler_with_optimizer=False,
            kwargs_handlers=_process_group_handlers(),
        )
        if cfg.model.mode == "auto":
            cfg.model.mode = "full" if self.accelerator.num_processes > 1 else "lora"
        self.grad_accum = gradient_accumulation_steps(cfg, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.grad_accum
        set_seed(cfg.training.seed)
        self.dtype = dtype
        self.is_main = self.accelerator.is_main_process

    # -- set-up ---------------------------------------------------------------------------

    def _prepare_output_dir(self) -> None:
        """Refuse to mix runs, and fail on an unwritable directory before any compute."""
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output directory {out} exists and is not a directory")
        # (other ranks' write probes are not a previous run: they come and go while we look)
        existing = [p for p in out.iterdir() if p.name != PREVIOUS and not p.name.startswith(WRITE_PROBE)] \
            if out.is_dir() else []
        if existing and not self.resume:
            if not self.overwrite:
                raise ConfigError(
                    f"output directory {out} is not empty. Pass --overwrite to replace it, "
                    "--resume to continue from its latest checkpoint, or choose another --output-dir."
                )
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f"{WRITE_PROBE}{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None

    def _set_previous_run_aside(self) -> None:
        """--overwrite: the old run's files move into a hidden folder and are deleted only once the
        new run has saved its model, so a failed new run never costs the old results."""
        out = self.output_dir
        if not (self.overwrite and not self.resume and self.is_main):
            return
        old = [p for p in out.iterdir() if p.name != PREVIOUS]
        if not old:
            return
        aside = out / PREVIOUS
        if aside.exists():
            shutil.rmtree(aside)
        aside.mkdir()
        for p in old:
            os.replace(p, aside / p.name)

    def _drop_previous_run(self) -> None:
        if self.is_main:
            shutil.rmtree(self.output_dir / PREVIOUS, ignore_errors=True)

    def load_data(self, tokenizer) -> tuple[TokenizedSplit, TokenizedSplit | None]:
        with self.accelerator.main_process_first():
            return load_splits(self.cfg.data, tokenizer)

    def plan(self, models: LoadedModels, train: TokenizedSplit, evaluation: TokenizedSplit | None) -> Plan:
        t = self.cfg.training
        procs = self.accelerator.num_processes
        micro_per_epoch = math.ceil(len(train) / (t.per_device_batch_size * procs))
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / self.grad_accum))
        total = math.ceil(steps_per_epoch * t.num_epochs)
        if t.max_steps > 0:  # as in transformers: max_steps overrides the number of epochs
            total = t.max_steps
        ref = "none (reference-free method)"
        if self.method.needs_reference:
            how = "adapters disabled" if models.reference_is_adapter_disabled else "frozen copy"
            ref = f"online ({how})" if self.online_reference else f"precomputed ({how})"
            if self.token_kl:
                ref += ", token-level KL" + (" (training.precompute_ref ignored)" if t.precompute_ref else "")
        max_tokens = t.per_device_batch_size * 2 * train.stats.max_sequence
        return Plan(
            train_pairs=len(train),
            eval_pairs=len(evaluation) if evaluation is not None else 0,
            processes=procs,
            per_device_batch=t.per_device_batch_size,
            grad_accum=self.grad_accum,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            warmup_steps=math.ceil(total * t.warmup_ratio),
            tokens_per_epoch=train.stats.prompt_tokens * 2 + train.stats.response_tokens,
            needs_reference=self.method.needs_reference,
            reference=ref,
            memory_gb=_estimate_memory_gb(models.policy, self.cfg.model.mode, self.dtype, max_tokens),
            data_summary=train.stats.summary(),
        )

    def reference_logps(self, models: LoadedModels, split: TokenizedSplit, what: str) -> PreferenceLogps:
        """Precomputed reference log-probs for one split, from the disk cache when it is valid.

        With several processes each one computes every world-th pair and the parts are gathered:
        no rank waits for another to do the whole split (at the paper's scale that would outlast
        the collective timeout). Under ZeRO-3 the policy is partitioned, so an unpartitioned copy
        of the initial model serves this pass and is freed after it."""
        acc = self.accelerator
        key = cache_key(models.fingerprint, split, self.dtype)

        def agree(hit: bool) -> bool:  # all ranks take the same branch
            if acc.num_processes > 1:
                hit = bool(acc.gather(torch.tensor([int(hit)], device=acc.device)).min())
            return hit

        ref, hit = ReferenceCache().get_or_compute(
            key, len(split), lambda: self._compute_reference(models, split, what), agree=agree, save=self.is_main,
            meta={"model": self.cfg.model.name_or_path, "split": split.source, "rows": len(split)})
        if hit and self.is_main:
            self.console.print(f"reference log-probs for {what}: cache hit ({key})")
        return ref

    def _compute_reference(self, models: LoadedModels, split: TokenizedSplit, what: str) -> PreferenceLogps:
        from contextlib import nullcontext

        acc = self.accelerator
        device = acc.device
        rank, world = acc.process_index, acc.num_processes
        part = split if world == 1 else dataclasses.replace(split, dataset=split.dataset.select(range(rank, len(split), world)))
        zero3 = acc.distributed_type.name == "DEEPSPEED" and acc.state.deepspeed_plugin.zero_stage == 3
        if models.reference is not None and not zero3:
            network_ctx = reference_mode(models.policy, models.reference)
        elif models.reference_is_adapter_disabled and not zero3:
            network_ctx = reference_mode(models.policy)
        else:
            network_ctx = None
        t = self.cfg.training

        def precompute(net):
            if t.packing:  # one padding-free row per token budget
                return score_pairs(net, part, packed=True, token_budget=t.token_budget, prefix_sharing=t.prefix_sharing,
                                   chunk_size=t.logprob_chunk_size, device=device)
            return score_pairs(net, part, pad_token_id=models.tokenizer.pad_token_id, batch_size=t.ref_batch_size,
                               longest_first=True, device=device)

        status = self.console.status(f"computing reference log-probs for {what} ({len(split)} pairs)") if self.is_main else nullcontext()
        with status:
            if network_ctx is None:
                no_zero_init = acc.state.deepspeed_plugin.zero3_init_context_manager(enable=False) if zero3 else nullcontext()
                with no_zero_init:
                    net = load_reference_only(self.cfg.model).to(device)
                ref = precompute(net)
                del net
            else:
                models.policy.to(device)
                with network_ctx as net:
                    ref = precompute(net)
        if world > 1:
            from accelerate.utils import gather_object

            fields = [f.name for f in dataclasses.fields(PreferenceLogps) if getattr(ref, f.name) is not None]
            full = {k: torch.zeros(len(split), dtype=torch.float64) for k in fields}
            for r, values in gather_object([(rank, {k: getattr(ref, k) for k in fields})]):
                for k in fields:
                    full[k][torch.arange(r, len(split), world)] = values[k]
            ref = PreferenceLogps(**full)
        return ref

    # -- the step -------------------------------------------------------------------------

    def _loss_inputs(self, scorer, models, batch, ref: PreferenceLogps | None, reference_scorer=None) -> tuple[PreferenceLogps, torch.Tensor]:
        token_kl = self.token_kl and ref is None  # (a precomputed `ref` never comes with the token KL)
        kw = {"return_hidden": True} if token_kl else {}
        out = scorer(**scorer_inputs(batch), **kw)
        sums, counts = out[0], out[1]
        b = batch["index"].shape[0]
        ref_c = ref_r = kl = None
        if self.method.needs_reference:
            if ref is not None:
                taken = ref.select(batch["index"].cpu()).to(sums.device, sums.dtype)
                ref_c, ref_r = taken.policy_chosen_logps, taken.policy_rejected_logps
            else:
                with torch.no_grad():
                    if models.reference is not None:
                        ref_out = reference_scorer(**scorer_inputs(batch), **kw)
                    else:
                        with reference_mode(self.accelerator.unwrap_model(models.policy)) as _:
                            ref_out = scorer(**scorer_inputs(batch), **kw)
                    rs = ref_out[0]
                    if token_kl:
                        kl = self._token_kl(scorer, reference_scorer, out, ref_out, 2 * b)
                ref_c, ref_r = rs[:b].detach(), rs[b:].detach()
        inputs = PreferenceLogps(
            policy_chosen_logps=sums[:b],
            policy_rejected_logps=sums[b:],
            chosen_lengths=counts[:b],
            rejected_lengths=counts[b:],
            ref_chosen_logps=ref_c,
            ref_rejected_logps=ref_r,
            chosen_seq_kl=None if kl is None else kl[:b].to(sums.dtype),
            rejected_seq_kl=None if kl is None else kl[b:].to(sums.dtype),
        )
        return inputs, counts

    def _token_kl(self, scorer, reference_scorer, out, ref_out, num_sequences: int) -> torch.Tensor:
        """Σ_t KL(πref‖πθ) per sequence ([2B], no gradient) from the response hidden states both forwards
        returned, chunk by chunk through the two LM heads. An adapter-disabled reference uses the policy's
        head without its adapter (LoRA on the LM head); a separate reference, its own head."""
        acc = self.accelerator
        policy_scorer = acc.unwrap_model(scorer)
        head, softcap = policy_scorer.output_head()
        if reference_scorer is not None:
            ref_head, _ = acc.unwrap_model(reference_scorer).output_head()
        else:
            ref_head = adapter_free(head)
        _, _, hidden, seq_ids = out
        _, _, ref_hidden, _ = ref_out
        return response_token_kl(ref_head, ref_hidden, head, hidden.detach(), seq_ids, num_sequences,
                                 chunk_size=policy_scorer.chunk_size, softcap=softcap)

    # -- the loop -------------------------------------------------------------------------

    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, _frame):
            if self._stop_signal is not None:  # a second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.console.print(f"[yellow]received {signal.Signals(signum).name}: finishing this step, saving a "
                               "checkpoint and stopping (send it again to stop at once)[/]")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def run(self, dry_run: bool = False) -> TrainResult | Plan:
        if self.resume:  # the checkpoint, and how the config differs from its run's, before anything loads
            self._resume_from = ckpt.check_resume(
                self.cfg, self.output_dir, self.resume, console=self.console if self.is_main else None,
                allow_config_change=self.allow_config_change, accelerator=self.accelerator)
        cfg, acc = self.cfg, self.accelerator
        t = cfg.training
        if not dry_run:
            self._prepare_output_dir()
            acc.wait_for_everyone()  # every rank has checked the directory before rank 0 writes into it
        need_ref_net = self.online_reference
        if self.token_kl and t.precompute_ref and self.is_main:
            self.console.print(f"loss '{cfg.loss.name}': the reference runs online (its token-level KL needs the "
                               "full reference distribution, which the precomputed cache does not keep); "
                               "training.precompute_ref is ignored")
        if t.trim_cpu_memory and acc.device.type == "cpu":
            tune_cpu_allocator()
        models = load_models(cfg.model, cfg.lora, need_reference_model=need_ref_net)
        checkpoint_layers(models.policy, t.checkpoint_layers)
        if t.lean_norms and acc.distributed_type.name != "DEEPSPEED":
            install_lean_rmsnorm(models.policy)
        if t.packing:  # segment-aware attention; padded calls (scoring) keep the model's own
            for net in (models.policy, models.reference):
                if net is not None:
                    install_segment_attention(net)
        self.models = models
        train_split, eval_split = self.load_data(models.tokenizer)
        plan = self.plan(models, train_split, eval_split)
        if self.is_main:
            self.console.print(f"data: {train_split.source}: {train_split.stats.summary()}"
                               f"{' (tokenised cache hit)' if train_split.stats.cache_hit else ''}")
            self.console.print(plan.table())
        if dry_run:
            return plan

        self._set_previous_run_aside()
        try:
            return self._train(models, train_split, eval_split, plan)
        except BaseException:
            aside = self.output_dir / PREVIOUS
            if self.is_main and aside.is_dir():
                self.console.print(f"the previous run's files are kept in {aside}")
            raise

    def _train(self, models: LoadedModels, train_split, eval_split, plan: Plan) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        t = cfg.training
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        ref_train = ref_eval = None
        if self.method.needs_reference and not self.online_reference:
            ref_train = self.reference_logps(models, train_split, "train")
            if eval_split is not None:
                ref_eval = self.reference_logps(models, eval_split, "eval")

        device = acc.device
        if acc.distributed_type.name != "DEEPSPEED":  # DeepSpeed places (under ZeRO-3: partitions) it
            models.policy.to(device)

        policy = models.policy
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            weight_decay=t.weight_decay,
        )
        from transformers import get_scheduler

        scheduler = get_scheduler(
            {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_scheduler],
            optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps,
        )
        loader = torch.utils.data.DataLoader(
            train_split.dataset.with_format(None, columns=["index", "prompt_ids", "chosen_ids", "rejected_ids"]),
            batch_size=t.per_device_batch_size, shuffle=True,
            collate_fn=(PackedPairCollator(models.tokenizer.pad_token_id, prefix_sharing=t.prefix_sharing) if t.packing
                        else PairCollator(models.tokenizer.pad_token_id)),
            generator=torch.Generator().manual_seed(t.seed),
        )
        scorer = SequenceLogps(policy, chunk_size=t.logprob_chunk_size)
        reference_scorer = None
        if models.reference is not None:
            reference_scorer = SequenceLogps(models.reference, chunk_size=t.logprob_chunk_size)
        self._check_reference_frozen(models, optimizer)
        _prepare_deepspeed_config(acc, policy)
        scorer, optimizer, loader, scheduler = acc.prepare(scorer, optimizer, loader, scheduler)
        self._check_deepspeed_batch()
        if reference_scorer is not None:
            reference_scorer = self._prepare_reference(reference_scorer)
        reference_digest = _weights_digest(models.reference)
        eval_before = None
        if eval_split is not None:  # after prepare: under ZeRO-3 the policy runs only inside its engine
            eval_before = self.evaluate(models, eval_split, ref_eval, "before training")
        normalizer = make_normalizer(cfg.loss.name, self.params)
        if normalizer is not None:
            acc.register_for_checkpointing(normalizer)

        state = ckpt.TrainerState()
        if self.resume:
            where = self._resume_from  # checked by run() before any model was loaded
            state = ckpt.load_checkpoint(where, acc, policy, optimizer, scheduler, normalizer)
            if self.is_main:
                ckpt.truncate_metrics(self.output_dir / "metrics.jsonl", state.step)
                self.console.print(f"resumed from {where} at step {state.step}")

        sinks = MetricSinks(self.output_dir, t.report_to, cfg.to_dict(), enabled=self.is_main)
        previous_handlers = self._install_signal_handlers()
        policy.train()
        result = TrainResult(self.output_dir, 0, 0, 0.0, 0.0, eval_before=eval_before)
        window: list[dict] = []
        window_start = time.perf_counter()
        window_pairs = window_tokens = 0
        start_time = time.perf_counter()
        try:
            with LiveProgress(self.console, plan.total_steps, enabled=self.is_main) as live:
                live.advance(state.step)
                while state.step < plan.total_steps:
                    loader.set_epoch(state.epoch)
                    skip = state.batches_in_epoch
                    epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
                    micro: list[LossOutput] = []
                    for batch in epoch_loader:
                        with acc.accumulate(scorer):
                            inputs, counts = self._loss_inputs(scorer, models, batch, ref_train, reference_scorer)
                            out = compute_loss(cfg.loss.name, inputs, self.params, normalizer)
                            loss = out.losses.mean()
                            acc.backward(loss)
                            state.batches_in_epoch += 1
                            micro.append(self._gather_micro(out, inputs, loss))
                            window_pairs += int(inputs.chosen_lengths.shape[0]) * acc.num_processes
                            window_tokens += batch_tokens(batch) * acc.num_processes
                            if acc.sync_gradients:
                                # The norm is needed for the non-finite check even without clipping.
                                clip = t.max_grad_norm if t.max_grad_norm and t.max_grad_norm > 0 else float("inf")
                                grad_norm = acc.clip_grad_norm_(trainable, clip)
                                finite = all(torch.isfinite(m["loss"]).all() for m in micro)
                                if grad_norm is not None:
                                    finite = finite and bool(torch.isfinite(torch.as_tensor(grad_norm)))
                                if finite:
                                    optimizer.step()
                                    state.nonfinite_in_row = 0
                                else:
                                    state.skipped_nonfinite += 1
                                    state.nonfinite_in_row += 1
                                lr_used = scheduler.get_last_lr()[0]
                                scheduler.step()
                                optimizer.zero_grad(set_to_none=True)
                                state.step += 1
                                metrics = self._step_metrics(micro, grad_norm, lr_used, normalizer)
                                metrics["nonfinite_skipped"] = state.skipped_nonfinite
                                micro = []
                                result.losses.append(metrics["loss"])
                                window.append(metrics)
                                if not finite and state.nonfinite_in_row >= t.max_nonfinite_steps:
                                    path = self._save_checkpoint(acc, policy, optimizer, scheduler, normalizer, state, models)
                                    raise TrainingStopped(
                                        f"{state.nonfinite_in_row} non-finite steps in a row (last at step {state.step}, "
                                        f"epoch {state.epoch}, micro-batch {state.batches_in_epoch}, rows "
                                        f"{batch['index'].tolist()}). Lower the learning rate or check the data; "
                                        f"a checkpoint was saved to {path}.", path)
                                if state.step % max(1, t.logging_steps) == 0 or state.step == plan.total_steps:
                                    elapsed = time.perf_counter() - window_start
                                    logged = _average(window)
                                    logged["pairs_per_second"] = window_pairs / max(elapsed, 1e-9)
                                    logged["tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                                    logged["epoch"] = state.epoch + state.batches_in_epoch / max(1, len(loader))
                                    sinks.log(state.step, logged)
                                    live.log_line(state.step, logged)
                                    live.advance(state.step, logged)
                                    window, window_pairs, window_tokens = [], 0, 0
                                    window_start = time.perf_counter()
                                else:
                                    live.advance(state.step)
                                if t.eval_steps and eval_split is not None and state.step % t.eval_steps == 0:
                                    ev = self.evaluate(models, eval_split, ref_eval, f"step {state.step}",
                                                       normalizer=normalizer if self._eval_updates_stats else None)
                                    sinks.log(state.step, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
                                    policy.train()
                                if t.save_steps and state.step % t.save_steps == 0 and state.step < plan.total_steps:
                                    self._save_checkpoint(acc, policy, optimizer, scheduler, normalizer, state, models)
                                if self._stop_signal is not None:
                                    path = self._save_checkpoint(acc, policy, optimizer, scheduler, normalizer, state, models)
                                    raise TrainingStopped(
                                        f"stopped by {signal.Signals(self._stop_signal).name} at step {state.step}; "
                                        f"checkpoint saved to {path}. Continue with the same command plus --resume.",
                                        path, exit_code=128 + self._stop_signal)
                                if state.step >= plan.total_steps:
                                    break
                    else:
                        state.epoch += 1
                        state.batches_in_epoch = 0
                        continue
                    break
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            sinks.close()

        result.steps = state.step
        result.seconds = time.perf_counter() - start_time
        result.pairs = state.step * t.global_batch_size
        result.pairs_per_second = result.pairs / max(result.seconds, 1e-9)
        result.skipped_nonfinite = state.skipped_nonfinite
        if eval_split is not None:
            result.eval_after = self.evaluate(models, eval_split, ref_eval, "after training")
        reference_unchanged = self._check_reference_unchanged(models.reference, reference_digest)
        self._save_final(acc, policy, models, engine=scorer)
        self._drop_previous_run()
        if self.is_main:
            atomic_write_json(self.output_dir / "train_results.json", {
                "steps": result.steps, "pairs": result.pairs, "seconds": result.seconds,
                "pairs_per_second": result.pairs_per_second, "skipped_nonfinite": result.skipped_nonfinite,
                "eval_before": eval_before, "eval_after": result.eval_after,
                "reference_unchanged": reference_unchanged,
            })
        return result

    # -- helpers --------------------------------------------------------------------------

    def _gather_micro(self, out: LossOutput, inputs: PreferenceLogps, loss: torch.Tensor) -> dict:
        acc = self.accelerator
        avg = lambda s, n: (s / n).detach()  # noqa: E731
        rec = {
            "loss": acc.gather(loss.detach().reshape(1)).mean(),
            "chosen_rewards": acc.gather(out.chosen_rewards.detach()),
            "rejected_rewards": acc.gather(out.rejected_rewards.detach()),
            "margins": acc.gather(out.margins.detach().reshape(-1).expand_as(out.chosen_rewards).contiguous()),
            "logps_chosen": acc.gather(avg(inputs.policy_chosen_logps, inputs.chosen_lengths)),
            "logps_rejected": acc.gather(avg(inputs.policy_rejected_logps, inputs.rejected_lengths)),
            "extra": out.metrics,
        }
        if inputs.ref_chosen_logps is not None:
            rec["logps_ref_chosen"] = acc.gather(avg(inputs.ref_chosen_logps, inputs.chosen_lengths))
            rec["logps_ref_rejected"] = acc.gather(avg(inputs.ref_rejected_logps, inputs.rejected_lengths))
        if inputs.has_token_kl:  # TDPO's δ: the per-token KL(πref‖πθ) along each response
            rec["kl_chosen"] = acc.gather(avg(inputs.chosen_seq_kl, inputs.chosen_lengths))
            rec["kl_rejected"] = acc.gather(avg(inputs.rejected_seq_kl, inputs.rejected_lengths))
        return rec

    def _step_metrics(self, micro: list[dict], grad_norm, lr_used: float, normalizer) -> dict[str, float]:
        cat = lambda k: torch.cat([m[k].float().reshape(-1) for m in micro])  # noqa: E731
        chosen, rejected = cat("chosen_rewards"), cat("rejected_rewards")
        metrics = {
            "loss": torch.stack([m["loss"].float() for m in micro]).mean().item(),
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "logps/chosen": cat("logps_chosen").mean().item(),
            "logps/rejected": cat("logps_rejected").mean().item(),
            "learning_rate": lr_used,  # the rate this step's update used
        }
        if "kl_chosen" in micro[0]:
            metrics["kl/chosen"] = cat("kl_chosen").mean().item()
            metrics["kl/rejected"] = cat("kl_rejected").mean().item()
        if "logps_ref_chosen" in micro[0]:
            metrics["logps/ref_chosen"] = cat("logps_ref_chosen").mean().item()
            metrics["logps/ref_rejected"] = cat("logps_ref_rejected").mean().item()
        metrics.update(pair_statistics("margin", cat("margins")))
        if normalizer is not None:
            metrics["normalizer/mu"] = float(normalizer.mu)
            metrics["normalizer/sigma"] = float(normalizer.sigma)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    @property
    def _eval_updates_stats(self) -> bool:
        return bool(getattr(self.params, "eval_updates_stats", False))

    def evaluate(self, models, split, ref, label: str, normalizer=None) -> dict:
        """The held-out preference report. With `normalizer` (α-DPO's eval_updates_stats), the
        held-out batches also run the loss and update the normaliser, as the authors' evaluation does."""
        t = self.cfg.training
        scores = score_with_reference(models.policy, split, reference=models.reference, reference_scores=ref,
                                      pad_token_id=models.tokenizer.pad_token_id, batch_size=t.eval_batch_size,
                                      device=self.accelerator.device)
        report = preference_report(scores)
        if normalizer is not None:
            report["loss"] = self._eval_loss_updating(scores, normalizer)
        if self.is_main:
            self.console.print(
                f"held-out preference accuracy {label}: {report['accuracy']:.3f} (implicit length-normalised reward)"
                + (f", {report['accuracy_ref']:.3f} (reference-relative)" if report.get("accuracy_ref") is not None else "")
                + f" on {report['pairs']} pairs"
            )
        return report

    def _eval_loss_updating(self, scores, normalizer) -> float:
        """Run the loss over the held-out pairs in the batches of the authors' evaluation loop, in
        order, updating the normaliser once per batch (the mean loss is returned).

        Their TRL loop gives each process `eval_batch_size` pairs per step and all-gathers g; here
        every process holds the scores of the whole split, so it takes the global batch of
        eval_batch_size × processes pairs itself, with no communication (`normalizer.local()`).
        With several processes the last batch is filled up from the start of the split, as
        accelerate's even batches do."""
        n = int(scores.policy_chosen_logps.numel())
        per_step = self.cfg.training.eval_batch_size * self.accelerator.num_processes
        losses = []
        with normalizer.local():
            for start in range(0, n, per_step):
                idx = torch.arange(start, start + per_step)
                idx = idx % n if self.accelerator.num_processes > 1 else idx[idx < n]
                inputs = scores.select(idx)
                losses.append(compute_loss(self.cfg.loss.name, inputs, self.params, normalizer).losses)
        return torch.cat(losses).mean().item()

    # -- multi-process checks and the reference under DeepSpeed --------------------------

    @staticmethod
    def _check_reference_frozen(models: LoadedModels, optimizer) -> None:
        """The reference is never trained: no gradient on its weights, none of them in the optimiser."""
        if models.reference is None:
            return
        ref_ids = {id(p) for p in models.reference.parameters()}
        if any(p.requires_grad for p in models.reference.parameters()):
            raise RuntimeError("the reference model has trainable parameters")
        if any(id(p) in ref_ids for g in optimizer.param_groups for p in g["params"]):
            raise RuntimeError("reference parameters were handed to the optimiser")

    def _check_reference_unchanged(self, reference, before: torch.Tensor | None) -> bool | None:
        """After training, a separate reference's weights are still the ones it started with (each rank
        checks its own part: under ZeRO-3 its partition); None without a separate reference."""
        if before is None:
            return None
        same = torch.equal(_weights_digest(reference), before)
        acc = self.accelerator
        if acc.num_processes > 1:
            same = bool(acc.gather(torch.tensor([int(same)], device=acc.device)).min())
        if not same:
            raise RuntimeError("the reference model's weights changed during training")
        return True

    def _check_deepspeed_batch(self) -> None:
        """DeepSpeed's filled-in batch settings must be the ones the trainer computed."""
        acc = self.accelerator
        if acc.distributed_type.name != "DEEPSPEED":
            return
        ds, t = acc.deepspeed_config, self.cfg.training
        got = (ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps"), ds.get("train_batch_size"))
        want = (t.per_device_batch_size, self.grad_accum, t.global_batch_size)
        if got != want or acc.gradient_accumulation_steps != self.grad_accum:
            raise ConfigError(
                f"DeepSpeed batch settings (micro {got[0]}, accumulation {got[1]}, global {got[2]}) differ from the "
                f"run's (micro {want[0]}, accumulation {want[1]}, global {want[2]}): leave them \"auto\" in the "
                "DeepSpeed JSON and unset ACCELERATE_GRADIENT_ACCUMULATION_STEPS")

    def _prepare_reference(self, reference_scorer):
        """A separate (full fine-tuning, online) reference: under ZeRO-3 it is partitioned like the
        policy, by an eval-only DeepSpeed engine with no optimiser; otherwise it sits on the device."""
        acc = self.accelerator
        if acc.distributed_type.name != "DEEPSPEED" or acc.state.deepspeed_plugin.zero_stage != 3:
            return reference_scorer.to(acc.device)
        import copy

        import deepspeed

        ds = copy.deepcopy(acc.deepspeed_config)  # "auto" values already filled by prepare
        for key in ("optimizer", "scheduler"):
            ds.pop(key, None)
        ds["zero_optimization"].pop("offload_optimizer", None)
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

        engine, *_ = deepspeed.initialize(model=reference_scorer, config=ds)
        engine.eval()
        # with no optimiser, ZeRO-3 only partitions (DeepSpeedZeRoOffload): nothing can update the weights
        if engine.optimizer is not None and not isinstance(engine.optimizer, DeepSpeedZeRoOffload):
            raise RuntimeError(f"the reference DeepSpeed engine has an optimiser ({type(engine.optimizer).__name__})")
        return engine

    def _save_checkpoint(self, acc, policy, optimizer, scheduler, normalizer, state, models) -> Path:
        path = ckpt.save_checkpoint(self.output_dir, acc, policy, optimizer, scheduler, normalizer, state,
                                    keep=self.cfg.training.save_total_limit)
        if self.is_main:
            self.console.print(f"checkpoint: {path}")
        return path

    def _save_final(self, acc, policy, models: LoadedModels, engine=None) -> None:
        acc.wait_for_everyone()
        ckpt.save_final_model(self.output_dir, acc, policy, models.tokenizer, merge=self.cfg.training.merge,
                              is_peft=self.cfg.model.mode in ("lora", "qlora"), engine=engine)
        if self.is_main:
            save_config(self.cfg, self.output_dir / "config.yaml")
            self.console.print(f"saved to {self.output_dir}")


def _weights_digest(model: torch.nn.Module | None) -> torch.Tensor | None:
    """Per parameter, the float64 sum and sum of squares of this process's copy of the weights (under
    ZeRO-3 its partition, `ds_tensor`), in chunks so that no float64 copy of a whole matrix is made."""
    if model is None:
        return None
    rows = []
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = (p if t is None else t).detach().reshape(-1)
        s = q = torch.zeros((), dtype=torch.float64, device=t.device)
        for c in t.split(1 << 22):
            c = c.double()
            s, q = s + c.sum(), q + c.square().sum()
        rows.append(torch.stack([s, q]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def _average(window: list[dict]) -> dict[str, float]:
    keys = {k for m in window for k in m}
    out = {}
    for k in keys:
        vals = [m[k] for m in window if m.get(k) is not None]
        if k.endswith("/min"):
            out[k] = min(vals)
        elif k.endswith("/max"):
            out[k] = max(vals)
        elif k in ("learning_rate", "normalizer/mu", "normalizer/sigma", "nonfinite_skipped"):
            out[k] = vals[-1]
        else:
            out[k] = sum(vals) / len(vals)
    return out


def train(config: Config, *, overwrite: bool = False, resume: str | bool | None = None, dry_run: bool = False,
          console: Console | None = None, allow_config_change: bool = False):
    """Train with a resolved `Config`; the Python API behind `alphadpo train`."""
    try:
        trainer = Trainer(config, console=console, overwrite=overwrite, resume=resume,
                          allow_config_change=allow_config_change)
        return trainer.run(dry_run=dry_run)
    except DataError:
        raise
    finally:
        os.environ.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None)
