"""The run card: README.md of every train run (and of its merged model) in the Hugging Face layout,
written with huggingface_hub's ModelCard, parsed back with ModelCard.load."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from alphadpo_cli.config import resolve_config
from alphadpo_cli.train.card import card_data, command_line, preset_of, template_checks


def test_the_card_of_a_run_parses_and_carries_its_fields(tmp_path, prefs_dir, one_torch_thread):
    from alphadpo_cli.train.trainer import train

    out = tmp_path / "run"
    cfg = resolve_config(preset="tiny", overrides=[
        f"data.dataset={prefs_dir}", f"training.output_dir={out}", "training.max_steps=1", "data.max_samples=8",
        "data.max_eval_samples=4", "training.merge=true"])
    train(cfg)
    saved = json.loads((out / "train_results.json").read_text())
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"alphadpo", "alpha-dpo", "dpo", "preference-optimization", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # tiny-random and a local path: not hub ids
    text = card.text
    assert "## Command" in text and "Preset: `tiny`" in text
    assert "```yaml" in text and "name_or_path: tiny-random" in text and "gamma_beta_ratio: 0.5" in text
    for split in ("train", "eval"):  # the tokenised splits' fingerprints, and where the data came from
        assert saved["data"][split]["fingerprint"] in text and saved["data"][split]["source"] in text
    assert str(prefs_dir) in text
    assert "| torch |" in text and "| transformers |" in text and "| huggingface_hub |" in text
    assert f"CPU: {saved['hardware']['cpu']}" in text and "processes: 1 on 1 machine(s)" in text
    assert "wall time:" in text and f"tokens/s: {saved['tokens_per_second']:.1f}" in text
    assert f"MFU: {saved['mfu']:.2%}" in text
    assert "| accuracy |" in text and "before training" in text and "after training" in text
    assert "**chat template, training = generation**: passed" in text
    assert "**BOS, training = generation**: passed" in text and "uses_document_bos" in text

    merged = ModelCard.load(out / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "merged weights" in merged.text
    assert "**chat template, training = generation**: passed" in merged.text


def test_hub_ids_go_into_the_metadata_and_local_sources_do_not(tmp_path):
    cfg = resolve_config(preset="tiny", overrides=["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct",
                                                   "data.dataset=princeton-nlp/llama3-ultrafeedback-armorm",
                                                   "model.mode=full"])
    meta = card_data(cfg, merged=False).to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["princeton-nlp/llama3-ultrafeedback-armorm"]
    assert meta["library_name"] == "transformers" and "lora" not in meta["tags"]
    local = resolve_config(preset="demo")  # pkg: sources
    meta = card_data(local, merged=False).to_dict()
    assert "base_model" not in meta and "datasets" not in meta


def test_the_command_as_typed_and_its_preset():
    argv = ["/venv/bin/alphadpo", "train", "--preset", "demo", "--set", "training.learning_rate=1e-4", "-o", "a b"]
    cfg = resolve_config(preset="demo")
    assert command_line(argv) == "alphadpo train --preset demo --set training.learning_rate=1e-4 -o 'a b'"
    launched = ["/x/alphadpo_cli/cli/__main__.py", "train", "--config", "c.yaml"]  # under accelerate launch
    assert command_line(launched) == "alphadpo train --config c.yaml"
    assert preset_of(argv, cfg) == "demo" and preset_of(["/v/alphadpo", "train", "--preset=tiny"], cfg) == "tiny"
    # another program's argv is not read: pytest's `-p no:cacheprovider` is no preset (the config's origins are)
    assert preset_of(["/v/pytest/__main__.py", "-q", "-p", "no:cacheprovider"], cfg) == "demo"
    assert command_line(["pytest", "-q"]).startswith("(Python API")


def test_a_chat_template_that_generation_would_not_use_fails_the_check(tmp_path):
    from alphadpo_cli.config import ModelConfig
    from alphadpo_cli.models.tiny import build_tiny_model, build_tiny_tokenizer

    saved = build_tiny_tokenizer()  # a full-weights run directory: generation loads its tokenizer
    saved.save_pretrained(tmp_path / "run")
    build_tiny_model(ModelConfig(), len(saved)).save_pretrained(tmp_path / "run")
    trained = build_tiny_tokenizer()
    assert all(c.passed for c in template_checks(tmp_path / "run", trained))
    trained.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    checks = {c.name: c for c in template_checks(tmp_path / "run", trained)}
    assert checks["chat template, training = generation"].passed is False
    assert "DIFFERENT" in checks["chat template, training = generation"].detail
    missing = template_checks(tmp_path / "nothing-here", trained)
    assert [c.passed for c in missing] == [None] and "could not be loaded" in missing[0].detail
