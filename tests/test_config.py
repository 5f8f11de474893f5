"""Presets, overrides and config validation: all offline, before any model is loaded."""

from __future__ import annotations

import pytest
import yaml

from alphadpo_cli.config import ConfigError, gradient_accumulation_steps, preset_names, resolve_config
from alphadpo_cli.losses import make_params

PAPER = {
    # preset: (model, dataset, beta, gamma_beta_ratio, alpha, lr)
    "mistral-instruct": ("mistralai/Mistral-7B-Instruct-v0.2", "princeton-nlp/mistral-instruct-ultrafeedback", 2.5, 0.15, 0.05, 6e-7),
    "llama3-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "princeton-nlp/llama3-ultrafeedback", 2.5, 0.6, 0.2, 1e-6),
    "llama3-v0.2": ("meta-llama/Meta-Llama-3-8B-Instruct", "princeton-nlp/llama3-ultrafeedback-armorm", 10.0, 0.4, 0.2, 1e-6),
    "gemma2-instruct": ("google/gemma-2-9b-it", "princeton-nlp/gemma2-ultrafeedback-armorm", 10.0, 0.4, 0.05, 8e-7),
}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_validates(name):
    cfg = resolve_config(preset=name)
    make_params(cfg.loss.name, cfg.loss.params)
    # the resolved YAML round-trips
    assert yaml.safe_load(cfg.to_yaml())["loss"]["name"] == cfg.loss.name
    for variant in cfg.variants:
        resolve_config(preset=name, loss=variant)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
    model, dataset, beta, gbr, alpha, lr = PAPER[name]
    cfg = resolve_config(preset=name)
    assert cfg.model.name_or_path == model
    assert cfg.data.dataset == dataset
    assert cfg.loss.name == "alpha_dpo"
    assert cfg.loss.params == {"beta": beta, "gamma_beta_ratio": gbr, "alpha": alpha}
    assert cfg.training.learning_rate == pytest.approx(lr)
    assert cfg.training.global_batch_size == 128
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 1800)
    assert cfg.training.lr_scheduler == "cosine" and cfg.training.warmup_ratio == 0.1
    assert cfg.training.num_epochs == 1 and cfg.training.seed == 42
    assert cfg.model.gradient_checkpointing and cfg.model.dtype == "bf16"


def test_global_batch_is_kept_across_gpu_counts():
    cfg = resolve_config(preset="llama3-v0.2")
    assert gradient_accumulation_steps(cfg, 4) == 16  # the authors' 4 x 2 x 16
    assert gradient_accumulation_steps(cfg, 8) == 8
    assert gradient_accumulation_steps(cfg, 1) == 64


def test_loss_switch_takes_the_presets_tuned_settings():
    simpo = resolve_config(preset="llama3-v0.2", loss="simpo")
    assert simpo.loss.name == "simpo"
    assert simpo.loss.params == {"beta": 10.0, "gamma_beta_ratio": 0.3}
    dpo = resolve_config(preset="mistral-instruct", loss="dpo")
    assert dpo.loss.params == {"beta": 0.01} and dpo.training.learning_rate == pytest.approx(5e-7)
    # A method without tuned settings starts from its own defaults.
    ipo = resolve_config(preset="tiny", loss="ipo")
    assert ipo.loss.name == "ipo" and ipo.loss.params == {}


def test_gemma_preset_carries_gemma_template():
    cfg = resolve_config(preset="gemma2-instruct")
    assert cfg.model.chat_template == "gemma" and cfg.model.attn_implementation == "eager"


def test_overrides_and_numbers_written_as_strings():
    cfg = resolve_config(preset="tiny", overrides=["training.learning_rate=5e-2", "loss.params.alpha=5e-2", "data.max_samples=3"])
    assert cfg.training.learning_rate == 0.05 and cfg.loss.params["alpha"] == 0.05 and cfg.data.max_samples == 3


def test_misspelled_override_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"training\.learning_rte.*Did you mean 'learning_rate'"):
        resolve_config(preset="tiny", overrides=["training.learning_rte=1e-6"])
    with pytest.raises(ConfigError, match="Did you mean 'training'"):
        resolve_config(preset="tiny", overrides=["trainin.seed=1"])


def test_unknown_loss_param_and_bad_values():
    with pytest.raises(ConfigError, match="bta"):
        resolve_config(preset="tiny", overrides=["loss.params.bta=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config(preset="tiny", overrides=["training.per_device_batch_size=two"])
    with pytest.raises(ConfigError, match="max_prompt_length"):
        resolve_config(preset="tiny", overrides=["data.max_prompt_length=4096"])


def test_misspelled_preset():
    with pytest.raises(ConfigError, match="Did you mean 'llama3-v0.2'"):
        resolve_config(preset="llama3-v02")


def test_user_config_file_inherits_a_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("inherit: llama3-v0.2\nloss:\n  params: {beta: 10.0, gamma_beta_ratio: 0.4, alpha: 5e-2}\n")
    cfg = resolve_config(config_file=f)
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.loss.params["alpha"] == 0.05
