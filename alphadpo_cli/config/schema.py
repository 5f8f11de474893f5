"""The typed configuration: one dataclass per section of a run's YAML, and `Config`, the whole run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import yaml

@dataclass
class ModelConfig:
    # A hub id, a local directory, a .gguf file, `pkg:<package>/<file.gguf>`, or `tiny-random`.
    name_or_path: str = "tiny-random"
    tokenizer: str | None = None
    # full: separate frozen reference; lora: reference = adapters disabled; qlora: 4-bit base + LoRA;
    # auto: full when launched on several processes, else lora.
    mode: str = "lora"
    # lora/qlora only: the policy's adapter starts from this saved PEFT LoRA adapter directory (its own
    # r, alpha and targets win over lora.*), not a fresh one; the reference stays the adapter-disabled base.
    init_adapter: str | None = None
    # full only: the frozen reference model (hub id, directory, .gguf, pkg:) when it is not the policy's
    # starting weights; null: the policy's starting weights. Its tokenizer must match the policy's.
    reference: str | None = None
    # auto picks bf16 on GPUs that support it, else fp32 (CPU) or fp16.
    dtype: str = "auto"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    # None keeps the tokenizer's own template; "chatml", "gemma" and "mistral" install those (the
    # latter two as the α-DPO authors wrote them); any other string is a Jinja template.
    chat_template: str | None = None
    trust_remote_code: bool = False
    # Shape of the randomly initialised `tiny-random` model.
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"


@dataclass
class DataConfig:
    # Hub id, local file (.jsonl/.json/.parquet), directory, or pkg:<package>/<path> (data shipped in
    # an installed package: pkg:alphadpo_cli/demo is the demo set).
    dataset: str = "pkg:alphadpo_cli/demo"
    train_split: str = "train"
    # Held-out split for evaluation; None disables evaluation.
    eval_split: str | None = "test"
    # Another dataset (file, directory or hub id) to take the held-out split from.
    eval_dataset: str | None = None
    max_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 2048
    max_prompt_length: int = 1800
    # What to do with a prompt longer than max_prompt_length: keep its end, drop the row (counted), or stop.
    truncation: str = "keep_end"
    # Tokenisation: "default" (this project's) or "authors" (an exact reproduction of the α-DPO
    # authors' TRL 0.8.6 pipeline, for matching their runs token for token; keep_end only).
    pipeline: str = "default"


@dataclass
class LossConfig:
    name: str = "alpha_dpo"
    # The method's hyperparameters (see `alphadpo_cli.losses.LOSSES[name].params_cls`).
    params: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    num_epochs: float = 1.0
    # > 0: train exactly this many optimiser steps (overrides num_epochs, cycling the data).
    max_steps: int = -1
    # The optimiser's peak learning rate, whatever model.mode is. null (the paper presets): the rate
    # `learning_rates` gives for the mode the run resolves to (model.mode=auto: full on several
    # processes, lora on one); a run writes the rate it used here in its config.yaml.
    learning_rate: float | None = None
    # Per model.mode {full, lora, qlora}: the rate used when learning_rate is null. Empty: the
    # built-in DEFAULT_LEARNING_RATES. The paper presets carry the paper's full fine-tuning rate and
    # LoRA/QLoRA rates of 10x it (LORA_LR_RULE).
    learning_rates: dict = field(default_factory=dict)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_batch_size: int = 2
    # Pairs per optimiser step over all processes; accumulation = global / (per_device * processes).
    global_batch_size: int = 128
    seed: int = 42
    logging_steps: int = 10
    # 0 disables periodic checkpoints; the final model is always saved.
    save_steps: int = 0
    save_total_limit: int = 2
    # 0: evaluate only before and after training.
    eval_steps: int = 0
    eval_batch_size: int = 8
    precompute_ref: bool = True
    ref_batch_size: int = 8
    # Padding-free packing: a micro-batch's sequences go in one row, attention kept within each
    # sequence (alphadpo_cli/logps/layouts.py, alphadpo_cli/kernels/segment_attention.py). false:
    # the padded [2B, T] fallback.
    packing: bool = True
    # With packing: one prompt per pair, shared by chosen and rejected (no effect without packing).
    prefix_sharing: bool = True
    # Response tokens per LM-head chunk in the log-prob computation; 0: auto, about 2^25 logits per
    # chunk on a GPU and 2^23 on a CPU (smaller transient tensors, same speed there).
    logprob_chunk_size: int = 0
    # With packing: tokens per row when precomputing reference log-probs (no gradients stored).
    token_budget: int = 8192
    # Activation checkpointing on the first N decoder layers only (speed/memory in between);
    # -1: as model.gradient_checkpointing says (all or none).
    checkpoint_layers: int = -1
    # On CPU, have glibc give freed activation memory back to the OS (lower peak RSS); false: keep
    # it for the next step's tensors (no page faults, faster; alphadpo_cli/kernels/cpu.py).
    trim_cpu_memory: bool = True
    # Llama-style RMSNorms keep only their input for backward, not float32 copies (same outputs;
    # alphadpo_cli/kernels/norms.py). Not under DeepSpeed, which partitions the norm weights.
    lean_norms: bool = True
    report_to: list = field(default_factory=list)
    merge: bool = False
    # Consecutive non-finite steps tolerated before stopping with a checkpoint.
    max_nonfinite_steps: int = 5


@dataclass
class GenerationConfig:
    """Decoding for `alphadpo eval` (the SimPO evaluation configs)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop_token_ids: list = field(default_factory=list)


@dataclass
class LaunchConfig:
    """Multi-GPU launch (accelerate + DeepSpeed)."""

    accelerate_config: str | None = None
    num_gpus: int | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500


@dataclass
class Config:
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # Per-method settings tuned for this preset: `--loss simpo` merges variants["simpo"] in.
    variants: dict = field(default_factory=dict)
    #: Where training.learning_rate and training.learning_rates were set ("preset llama3-v0.2",
    #: "user: --set training.learning_rate", ...), by key: filled by `resolve_config` and
    #: `resolve_for_processes`, shown in the plan; not a config key (never in the YAML).
    origins: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
FREE_FORM = {"variants", "loss.params"}


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    """The fields of one section's dataclass, by name."""
    cls = SECTIONS[section].default_factory  # type: ignore[misc]
    return {f.name: f for f in dataclasses.fields(cls)}
