"""Typed configuration, presets and command-line overrides.

A run is described by one `Config`. Presets are YAML files (the repository's presets/, shipped inside
the wheel as `alphadpo_cli.presets`); a preset may `inherit` another, may carry per-method `variants`
(the SimPO and DPO settings tuned for the same model), and every key can be overridden with
`--set section.key=value`. Misspelled keys are refused with a suggestion, before any compute.

The parts, each importable on its own:

* `schema`: the dataclasses (`Config` and its sections);
* `errors`: `ConfigError` (a click exception: `alphadpo` prints "error: ..." and exits with 2);
* `parse`, `files`: one value read; a YAML mapping typed into a `Config`, config.yaml written and read;
* `inheritance`: the shipped presets, `inherit:`, merging;
* `resolve`: preset + user file + `--loss` variant + `--set` overrides -> a validated `Config`;
* `checks`: `RANGES` and `validate`;
* `rates`: model.mode=auto and the learning rate a run uses, gradient accumulation.
"""

from __future__ import annotations

from .checks import NON_NEGATIVE_INT, POSITIVE_INT, RANGES, check_loss_params, check_ranges, validate
from .errors import ConfigError, UserError
from .files import from_dict, load_config_file, read_yaml, save_config
from .inheritance import load_config_dict, load_preset_dict, preset_dir, preset_names
from .parse import parse_scalar
from .rates import (DEFAULT_LEARNING_RATES, LORA_LR_MULTIPLIER, LORA_LR_RULE, TRAINED_MODES, check_learning_rates,
                    gradient_accumulation_steps, parse_learning_rates, resolve_for_processes, resolve_learning_rate,
                    resolve_mode)
from .resolve import apply_loss_variant, apply_override, parse_override, resolve_config
from .schema import (FREE_FORM, SECTIONS, Config, DataConfig, GenerationConfig, LaunchConfig, LoraConfig, LossConfig,
                     ModelConfig, TrainingConfig, section_fields)

__all__ = [
    "DEFAULT_LEARNING_RATES", "FREE_FORM", "LORA_LR_MULTIPLIER", "LORA_LR_RULE", "NON_NEGATIVE_INT", "POSITIVE_INT",
    "RANGES", "SECTIONS", "TRAINED_MODES", "Config", "ConfigError", "DataConfig", "GenerationConfig", "LaunchConfig",
    "LoraConfig", "LossConfig", "ModelConfig", "TrainingConfig", "UserError", "apply_loss_variant", "apply_override",
    "check_learning_rates", "check_loss_params", "check_ranges", "from_dict", "gradient_accumulation_steps",
    "load_config_dict", "load_config_file", "load_preset_dict", "parse_learning_rates", "parse_override",
    "parse_scalar", "preset_dir", "preset_names", "read_yaml", "resolve_config", "resolve_for_processes",
    "resolve_learning_rate", "resolve_mode", "save_config", "section_fields", "validate",
]
