"""The training loop: `train(config)`.

Built on accelerate, so the same loop runs on a CPU, one GPU, or many GPUs under DeepSpeed. Read
top to bottom: `Trainer.run` calls the `setup_*` functions of `setup.py` in order (each takes what
a test or a benchmark injects instead: `run(models=, splits=)`), and `Trainer._loop` is a flat loop
of `step()` calls with logging, evaluation, checkpoints and signals around it. One concern per
module next to this one: `setup.py`, `step.py` (one optimiser step), `reference.py` (reference
log-probs, the ZeRO-3 reference engine, the frozen checks), `run_dir.py` (the output directory),
`signals.py`, `logging.py` (metrics and sinks), `throughput.py` (tokens/s, MFU), `checkpoint.py`,
`evaluate.py` (the held-out report), `card.py` (the run card, README.md), `plan.py`, `distributed.py`.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import checkpoint as ckpt
from . import run_dir
from .card import write_run_card
from ..config import Config, save_config, validate
from ..console import console as stderr_console
from ..data import TokenizedSplit
from ..hardware import emulated_bf16_warning
from ..io import atomic_write_json
from ..losses import PreferenceLogps, compute_loss
from ..models.loading import LoadedModels, quiet_libraries, resolve_dtype
from .distributed import all_agree
from .evaluate import evaluate, evaluate_at_start
from .logging import LiveProgress, MetricSinks, MetricWindow
from .plan import Plan, make_plan
from .reference import check_reference_unchanged, reference_logps, weights_digest
from .setup import (Splits, setup_accelerator, setup_data, setup_loader, setup_models,  # noqa: F401  (re-exported)
                    setup_objective, setup_optimizer, setup_parts)
from .signals import StopSignals
from .step import Objective, TrainParts, epoch_batches, step
from .throughput import Throughput, pair_tokens, run_hardware, run_throughput


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (signal, repeated non-finite steps); a checkpoint was saved."""

    def __init__(self, message: str, checkpoint: Path | None, exit_code: int = 3):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


@dataclass
class TrainResult:
    """What a run did. `steps` is the run's last optimiser step; `pairs`, `tokens`, `seconds` (the
    training loop's), `pairs_per_second`, `tokens_per_second` and `mfu` are this session's (a resumed
    run: the `session_steps` after its checkpoint's step `resumed_from_step`), the pairs counted as
    the steps took them; `wall_seconds` is the whole session's (loading to the final save).
    `throughput`: how the MFU was estimated (`throughput.Throughput.to_dict`)."""

    output_dir: Path
    steps: int
    pairs: int
    seconds: float
    pairs_per_second: float
    losses: list[float] = field(default_factory=list)
    eval_before: dict | None = None
    eval_after: dict | None = None
    skipped_nonfinite: int = 0
    session_steps: int = 0
    resumed_from_step: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    mfu: float | None = None
    throughput: dict | None = None
    wall_seconds: float = 0.0


# -- the run ------------------------------------------------------------------------------------


class Trainer:
    """One run: its config, accelerator and loss. `run()` sets up and trains; `models` holds what
    it trained once it has loaded them."""

    def __init__(self, cfg: Config, *, console: Console | None = None, overwrite: bool = False,
                 resume: str | bool | None = None, allow_config_change: bool = False):
        quiet_libraries()
        validate(cfg)
        self.cfg = cfg
        self.console = console or stderr_console()
        self.overwrite = overwrite
        self.resume = resume
        self.allow_config_change = allow_config_change  # --resume: continue despite a changed model/data/batch/loss
        # compute_loss is looked up here, when the run starts (a test may wrap this module's name)
        self.objective = setup_objective(cfg, loss_fn=compute_loss)
        self.online_reference = self.objective.needs_reference and (self.token_kl or not cfg.training.precompute_ref)
        self.output_dir = Path(cfg.training.output_dir).expanduser()
        self.accelerator, self.grad_accum = setup_accelerator(cfg)
        self.dtype = resolve_dtype(cfg.model.dtype)
        self.is_main = self.accelerator.is_main_process
        self.models: LoadedModels | None = None

    @property
    def token_kl(self) -> bool:
        return self.objective.token_kl

    def load_data(self, tokenizer) -> Splits:
        return setup_data(self.cfg, self.accelerator, tokenizer)

    def plan(self, models: LoadedModels, train: TokenizedSplit, evaluation: TokenizedSplit | None) -> Plan:
        return make_plan(self.cfg, models, train, evaluation, processes=self.accelerator.num_processes,
                         grad_accum=self.grad_accum, dtype=self.dtype, needs_reference=self.objective.needs_reference,
                         online_reference=self.online_reference, token_kl=self.token_kl)

    def reference_logps(self, models: LoadedModels, split: TokenizedSplit, what: str) -> PreferenceLogps:
        return reference_logps(self.accelerator, self.cfg, models, split, what, dtype=self.dtype, console=self.console)

    def run(self, dry_run: bool = False, *, models: LoadedModels | None = None,
            splits: Splits | None = None) -> TrainResult | Plan:
        """Set up and train (`dry_run`: set up and return the plan). `models` and `splits` replace
        loading the model and reading the data (a benchmark's or a test's own)."""
        cfg, acc = self.cfg, self.accelerator
        self.started = time.perf_counter()
        resume_from = None
        if self.resume:  # the checkpoint, and how the config differs from its run's, before anything loads
            resume_from = ckpt.check_resume(
                cfg, self.output_dir, self.resume, console=self.console if self.is_main else None,
                allow_config_change=self.allow_config_change, accelerator=acc)
        if not dry_run:
            run_dir.prepare(self.output_dir, overwrite=self.overwrite, resume=bool(self.resume))
            acc.wait_for_everyone()  # every rank has checked the directory before rank 0 writes into it
        if self.token_kl and cfg.training.precompute_ref and self.is_main:
            self.console.print(f"loss '{cfg.loss.name}': the reference runs online (its token-level KL needs the "
                               "full reference distribution, which the precomputed cache does not keep); "
                               "training.precompute_ref is ignored")
        if self.is_main:  # before the model loads: emulated bf16 makes the load and every step slow
            warning = emulated_bf16_warning("bf16" if self.dtype == torch.bfloat16 else str(self.dtype),
                                            acc.device.type)
            if warning:
                self.console.print(f"[yellow]warning: {warning}[/]", highlight=False)
        self.models = models = setup_models(cfg, acc, need_reference=self.online_reference, models=models)
        train_split, eval_split = setup_data(cfg, acc, models.tokenizer, splits)
        plan = self.plan(models, train_split, eval_split)
        if self.is_main:
            self.console.print(f"data: {train_split.source}: {train_split.stats.summary()}"
                               f"{' (tokenised cache hit)' if train_split.stats.cache_hit else ''}")
            self.console.print(plan.table())
        if dry_run:
            return plan
        if self.overwrite and not self.resume and self.is_main:
            run_dir.set_previous_run_aside(self.output_dir)
        try:
            return self._train(models, train_split, eval_split, plan, resume_from)
        except BaseException:
            kept = run_dir.previous_run(self.output_dir)
            if self.is_main and kept is not None:
                self.console.print(f"the previous run's files are kept in {kept}")
            raise

    def _train(self, models: LoadedModels, train_split: TokenizedSplit, eval_split: TokenizedSplit | None,
               plan: Plan, resume_from: Path | None) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        ref_train = ref_eval = None
        if self.objective.needs_reference and not self.online_reference:
            ref_train = self.reference_logps(models, train_split, "train")
            if eval_split is not None:
                ref_eval = self.reference_logps(models, eval_split, "eval")
        parts = setup_parts(cfg, acc, models, train_split, plan, self.grad_accum)
        throughput = run_throughput(models.policy, mode=plan.mode, online_reference=self.online_reference,
                                    device=acc.device, dtype=self.dtype, processes=acc.num_processes)
        reference_digest = weights_digest(models.reference)

        def held_out(label: str, objective: Objective | None = None) -> dict | None:
            if eval_split is None:
                return None
            return evaluate(acc, cfg, models, eval_split, ref_eval, label, console=self.console, objective=objective)

        def at_start() -> dict:
            return evaluate_at_start(acc, cfg, models, eval_split, ref_eval, console=self.console)

        result = TrainResult(self.output_dir, 0, 0, 0.0, 0.0)
        # after prepare: under ZeRO-3 the policy runs only inside its engine
        result.eval_before = self._eval_before(at_start, models, eval_split, resume_from)
        if self.objective.normalizer is not None:  # saved and restored with the checkpoints' accelerator state
            acc.register_for_checkpointing(self.objective.normalizer)
        state = self._start_state(parts, resume_from)

        result.resumed_from_step = state.step
        start_time = time.perf_counter()
        self._loop(parts, state, plan, ref_train, held_out, result, throughput, pair_tokens(train_split.dataset))
        self._tally(result, state, time.perf_counter() - start_time, throughput)
        result.eval_after = held_out("after training")
        reference_unchanged = check_reference_unchanged(acc, models.reference, reference_digest)
        self._save_final(parts)
        if self.is_main:
            run_dir.drop_previous_run(self.output_dir)
            self._write_results(result, reference_unchanged, models, train_split, eval_split)
        return result

    @staticmethod
    def _tally(result: TrainResult, state: ckpt.TrainerState, seconds: float, throughput: Throughput) -> None:
        """This session's totals and rates: over its own steps, pairs and tokens (a resumed run's
        earlier ones are not timed here) and the training loop's wall time."""
        result.steps = state.step
        result.session_steps = state.step - result.resumed_from_step
        result.seconds = seconds
        result.pairs_per_second = result.pairs / max(seconds, 1e-9)
        result.tokens_per_second = result.tokens / max(seconds, 1e-9)
        result.mfu = throughput.mfu(result.tokens_per_second)
        result.throughput = throughput.to_dict()
        result.skipped_nonfinite = state.skipped_nonfinite

    def _write_results(self, result: TrainResult, reference_unchanged, models: LoadedModels,
                       train_split: TokenizedSplit, eval_split: TokenizedSplit | None) -> None:
        """train_results.json, then the run card (README.md; merged/README.md too with --merge)."""
        result.wall_seconds = time.perf_counter() - self.started
        split = lambda s: {"source": s.source, "fingerprint": s.fingerprint, "pairs": len(s)}  # noqa: E731
        record = {
            "steps": result.steps, "session_steps": result.session_steps,
            "resumed_from_step": result.resumed_from_step, "pairs": result.pairs, "tokens": result.tokens,
            "seconds": result.seconds, "wall_seconds": result.wall_seconds,
            "pairs_per_second": result.pairs_per_second, "tokens_per_second": result.tokens_per_second,
            "mfu": result.mfu, "throughput": result.throughput, "skipped_nonfinite": result.skipped_nonfinite,
            "eval_before": result.eval_before, "eval_after": result.eval_after,
            "reference_unchanged": reference_unchanged,
            "data": {"train": split(train_split), **({"eval": split(eval_split)} if eval_split is not None else {})},
            "model_fingerprint": models.fingerprint, "policy_fingerprint": getattr(models, "policy_fingerprint", None),
            "hardware": run_hardware(self.accelerator.device, self.dtype, self.accelerator.num_processes,
                                     self.cfg.launch.num_machines),
        }
        atomic_write_json(self.output_dir / "train_results.json", record)
        merged = self.output_dir / "merged"
        for where in [self.output_dir] + ([merged] if self.cfg.training.merge and merged.is_dir() else []):
            try:
                write_run_card(where, self.cfg, record, models.tokenizer, sys.argv, merged=where == merged)
            except Exception as exc:  # noqa: BLE001 - the weights are saved; a card that fails is said, not fatal
                self.console.print(f"[yellow]warning: the run card {where / 'README.md'} was not written: {exc}[/]")

    def _loop(self, parts: TrainParts, state: ckpt.TrainerState, plan: Plan, ref_train: PreferenceLogps | None,
              held_out, result: TrainResult, throughput: Throughput, tokens_by_row) -> None:
        """Optimiser steps until the plan's last, logging every `logging_steps` (with throughput over
        the steps' own time), evaluating every `eval_steps`, checkpointing every `save_steps`; stops
        (with a checkpoint) on a signal or after `max_nonfinite_steps` non-finite steps in a row."""
        cfg, t, objective = self.cfg, self.cfg.training, self.objective
        policy = parts.models.policy
        sinks = MetricSinks(self.output_dir, parts.accelerator, cfg.to_dict(), enabled=self.is_main)
        with closing(sinks), StopSignals(self.console) as stop:
            policy.train()
            window = MetricWindow(throughput)
            batches = epoch_batches(parts.accelerator, parts.loader, state)
            with LiveProgress(self.console, plan.total_steps, enabled=self.is_main) as live:
                live.advance(state.step)
                while state.step < plan.total_steps:
                    began = time.perf_counter()
                    out = step(parts, objective, batches, state, reference=ref_train, max_grad_norm=t.max_grad_norm,
                               pair_tokens=tokens_by_row)
                    result.losses.append(out.metrics["loss"])
                    result.pairs += out.pairs
                    result.tokens += out.tokens
                    window.add(out.metrics, out.pairs, out.tokens, seconds=time.perf_counter() - began)
                    if not out.finite and state.nonfinite_in_row >= t.max_nonfinite_steps:
                        path = self._save_checkpoint(parts, state)
                        raise TrainingStopped(
                            f"{state.nonfinite_in_row} non-finite steps in a row (last at step {state.step}, "
                            f"epoch {state.epoch}, micro-batch {state.batches_in_epoch}, rows "
                            f"{out.last_rows.tolist()}). Lower the learning rate or check the data; "
                            f"a checkpoint was saved to {path}.", path)
                    if state.step % max(1, t.logging_steps) == 0 or state.step == plan.total_steps:
                        logged = window.record(epoch=state.epoch + state.batches_in_epoch / max(1, len(parts.loader)))
                        sinks.log(state.step, logged)
                        live.log_line(state.step, logged)
                        live.advance(state.step, logged)
                        window.reset()
                    else:
                        live.advance(state.step)
                    if t.eval_steps and state.step % t.eval_steps == 0:
                        ev = held_out(f"step {state.step}", objective if objective.eval_updates_stats else None)
                        if ev is not None:
                            sinks.log(state.step, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
                            policy.train()
                    if t.save_steps and state.step % t.save_steps == 0 and state.step < plan.total_steps:
                        self._save_checkpoint(parts, state)
                    if stop.received is not None:
                        path = self._save_checkpoint(parts, state)
                        raise TrainingStopped(
                            f"stopped by {stop.name} at step {state.step}; checkpoint saved to {path}. "
                            "Continue with the same command plus --resume.", path, exit_code=128 + stop.received)

    def _eval_before(self, at_start, models: LoadedModels, eval_split: TokenizedSplit | None,
                     resume_from: Path | None) -> dict | None:
        """The held-out report before training: `at_start()` (`evaluate.evaluate_at_start`), recorded in the
        output directory (`run_dir.record_eval_before`), or with --resume the one recorded before the interruption
        (same held-out split, same model; looked up in the output directory, then the checkpoint's
        run directory), used by every process or by none."""
        if eval_split is None:
            return None
        key = {"eval_split": eval_split.fingerprint, "model": models.fingerprint}
        if models.policy_fingerprint is not None:  # the policy's start (model.init_adapter) may differ from the reference
            key["policy"] = models.policy_fingerprint
        if resume_from is not None:
            run_of_checkpoint = resume_from.parent.parent if resume_from.parent.name == ckpt.CHECKPOINTS else None
            found = run_dir.recorded_eval_before([d for d in (self.output_dir, run_of_checkpoint) if d], key)
            if all_agree(self.accelerator, found is not None):
                report, path = found
                if self.is_main:
                    self.console.print(
                        f"held-out preference accuracy before training: {report['accuracy']:.3f} (recorded before the "
                        f"interruption in {path}; not evaluated again)")
                return report
        report = at_start()
        if self.is_main:
            run_dir.record_eval_before(self.output_dir, report, key)
        return report

    # -- checkpoints ----------------------------------------------------------------------------

    def _start_state(self, parts: TrainParts, resume_from: Path | None) -> ckpt.TrainerState:
        """A fresh state, or with --resume the checkpoint's (models, optimiser, schedule, normaliser, RNG)."""
        if not self.resume:
            return ckpt.TrainerState()
        state = ckpt.load_checkpoint(resume_from, parts.accelerator, self.objective.normalizer)
        if self.is_main:
            ckpt.truncate_metrics(self.output_dir / "metrics.jsonl", state.step)
            self.console.print(f"resumed from {resume_from} at step {state.step}")
        return state

    def _save_checkpoint(self, parts: TrainParts, state: ckpt.TrainerState) -> Path:
        path = ckpt.save_checkpoint(self.output_dir, parts.accelerator, state, keep=self.cfg.training.save_total_limit)
        if self.is_main:
            self.console.print(f"checkpoint: {path}")
        return path

    def _save_final(self, parts: TrainParts) -> None:
        parts.accelerator.wait_for_everyone()
        ckpt.save_final_model(self.output_dir, parts.accelerator, parts.models.policy, parts.models.tokenizer,
                              merge=self.cfg.training.merge, is_peft=self.cfg.model.mode in ("lora", "qlora"),
                              engine=parts.scorer)
        if self.is_main:
            save_config(self.cfg, self.output_dir / "config.yaml")
            self.console.print(f"saved to {self.output_dir}")


def train(config: Config, *, overwrite: bool = False, resume: str | bool | None = None, dry_run: bool = False,
          console: Console | None = None, allow_config_change: bool = False):
    """Train with a resolved `Config`; the Python API behind `alphadpo train`."""
    try:
        trainer = Trainer(config, console=console, overwrite=overwrite, resume=resume,
                          allow_config_change=allow_config_change)
        result = trainer.run(dry_run=dry_run)
    finally:
        os.environ.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None)
    _release_process_group()
    return result


def _release_process_group() -> None:
    """A launched process's last step: every rank done, then the process group torn down while the
    interpreter is still whole. Left to interpreter exit, its gloo threads were sometimes still
    joinable and a rank died with SIGABRT ("terminate called without an active exception") after the
    model had been saved, turning a finished run into a failed launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
