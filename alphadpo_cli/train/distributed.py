"""Several processes: the accelerator, DeepSpeed's settings, and the few collectives the trainer runs.

The same loop runs on one CPU, one GPU or many processes; what differs lives here: the process
group's backend for DeepSpeed on CPU, DeepSpeed's "auto" values and batch check, every rank taking
the same branch (`all_agree`), and a split scored in parts, one per rank (`rank_part`,
`gather_strided`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from ..config import ConfigError, TrainingConfig
from ..data import TokenizedSplit
from ..logps.sequence import SequenceLogps
from ..losses import PreferenceLogps
from ..models.adapters import unwrap_causal_lm


def deepspeed_on_cpu() -> bool:
    """A process that `accelerate launch` started for DeepSpeed on a machine without CUDA."""
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()
            and os.environ.get("LOCAL_RANK") not in (None, ""))


def process_group_handlers() -> list:
    """DeepSpeed on CPU processes (`DS_ACCELERATOR=cpu`): name the gloo backend. Left to itself,
    accelerate finds no device backend, initialises DeepSpeed's process group anyway and then records
    "no backend": every rank believes it is process 0 of 1 (no data sharding, every rank the main one,
    a global batch N times too small)."""
    if not deepspeed_on_cpu():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def make_accelerator(dtype: torch.dtype, report_to: list[str] = (), output_dir=None):
    """The run's Accelerator: mixed precision from the model dtype (on CUDA, or DeepSpeed on CPU), a
    seedable sampler, the scheduler stepped by the loop itself, and `report_to`'s trackers
    (TensorBoard under `output_dir`/tensorboard, Weights & Biases)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    trackers = tracker_names(report_to)
    return Accelerator(
        mixed_precision=mixed if torch.cuda.is_available() or deepspeed_on_cpu() else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The loop steps the scheduler once per optimiser step; accelerate would otherwise step a
        # prepared scheduler num_processes times per call (its schedule counts per-process batches).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=process_group_handlers(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(logging_dir=str(Path(output_dir).expanduser() / "tensorboard"))
        if trackers and output_dir is not None else None,
    )


def tracker_names(report_to) -> list[str]:
    """accelerate's tracker names for `training.report_to` ("none" dropped); W&B, an optional extra,
    must be installed (accelerate would leave it out without a word)."""
    from accelerate.utils import is_wandb_available

    names = [r for r in report_to if r in ("tensorboard", "wandb")]
    if "wandb" in names and not is_wandb_available():
        raise ConfigError("--report-to wandb needs the wandb package: pip install 'alphadpo[wandb]'")
    return names


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def prepare_deepspeed_config(accelerator, model: torch.nn.Module) -> None:
    """Before `accelerator.prepare` under DeepSpeed: fill the hidden-size-based "auto" bucket sizes
    from the wrapped model's config, with accelerate's own formulas. `prepare` reads `model.config`,
    which the `SequenceLogps` wrapper lacks: every rank died there ("Can't find `model.config` entry
    ... auto entries ... reduce_bucket_size, stage3_prefetch_bucket_size, ...")."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
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


def check_deepspeed_batch(accelerator, t: TrainingConfig, grad_accum: int) -> None:
    """DeepSpeed's filled-in batch settings must be the ones the trainer computed."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.deepspeed_config
    got = (ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps"), ds.get("train_batch_size"))
    want = (t.per_device_batch_size, grad_accum, t.global_batch_size)
    if got != want or accelerator.gradient_accumulation_steps != grad_accum:
        raise ConfigError(
            f"DeepSpeed batch settings (micro {got[0]}, accumulation {got[1]}, global {got[2]}) differ from the "
            f"run's (micro {want[0]}, accumulation {want[1]}, global {want[2]}): leave them \"auto\" in the "
            "DeepSpeed JSON and unset ACCELERATE_GRADIENT_ACCUMULATION_STEPS")


def all_agree(accelerator, flag: bool) -> bool:
    """True only where every process says True (all ranks then take the same branch)."""
    if accelerator.num_processes > 1:
        flag = bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).min())
    return flag


def rank_part(accelerator, split: TokenizedSplit) -> TokenizedSplit:
    """This process's share of `split` for scoring: every world-th pair, from its rank on."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1:
        return split
    return dataclasses.replace(split, dataset=split.dataset.select(range(rank, len(split), world)))


def gather_strided(accelerator, part: PreferenceLogps, n: int) -> PreferenceLogps:
    """The whole split's scores (n pairs, split order) from every rank's `rank_part` scores."""
    world = accelerator.num_processes
    if world == 1:
        return part
    from accelerate.utils import gather_object

    fields = [f.name for f in dataclasses.fields(PreferenceLogps) if getattr(part, f.name) is not None]
    full = {k: torch.zeros(n, dtype=torch.float64) for k in fields}
    for r, values in gather_object([(accelerator.process_index, {k: getattr(part, k) for k in fields})]):
        for k in fields:
            full[k][torch.arange(r, n, world)] = values[k]
    return PreferenceLogps(**full)
