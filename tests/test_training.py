"""The training pipeline on the tiny random model (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import alphadpo_cli.train.reference as reference_mod
import alphadpo_cli.train.step as step_mod
from alphadpo_cli.cli import main
from alphadpo_cli.config import ConfigError, ModelConfig, resolve_config
from alphadpo_cli.io import cache_home
from alphadpo_cli.logps.sequence import SequenceLogps
from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer, load_models
from alphadpo_cli.models.adapters import reference_mode
from alphadpo_cli.train.trainer import Trainer, train


def tiny_config(tmp_path, prefs_dir, *extra, loss=None):
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=2",
            "data.max_samples=16", "data.max_eval_samples=8", "training.logging_steps=1", *extra]
    return resolve_config(preset="tiny", overrides=sets, loss=loss)


def base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_one_step_changes_lora_weights_not_base(tmp_path, prefs_dir):
    cfg = tiny_config(tmp_path, prefs_dir, "training.max_steps=1", "training.warmup_ratio=0")
    tr = Trainer(cfg)
    tr.run()
    policy = tr.models.policy
    fresh = build_tiny_model(ModelConfig(), len(build_tiny_tokenizer()))
    fresh_params = dict(fresh.named_parameters())
    changed_lora = 0
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            changed_lora += int(p.detach().abs().sum() > 0)  # LoRA B starts at zero
        elif "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), fresh_params[key].detach()), name
    assert changed_lora > 0


def test_disabled_adapters_equal_the_base_model(prefs_dir):
    from alphadpo_cli.config import LoraConfig
    from alphadpo_cli.logps.layouts import PairCollator
    from alphadpo_cli.data import TokenizeSettings, tokenize_split

    models = load_models(ModelConfig(), LoraConfig(r=4, alpha=8, dropout=0.0), need_reference_model=False)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that really change the output
    split = tokenize_split(str(prefs_dir), "train", models.tokenizer, TokenizeSettings(256, 128), max_samples=4)
    b = PairCollator(models.tokenizer.pad_token_id)([split.dataset[i] for i in range(4)])
    args = (b["input_ids"], b["attention_mask"], b["response_mask"])
    with torch.no_grad():
        adapted, _ = SequenceLogps(models.policy)(*args)
        with reference_mode(models.policy) as ref:
            disabled, _ = SequenceLogps(ref)(*args)
        base, _ = SequenceLogps(build_tiny_model(ModelConfig(), len(models.tokenizer)))(*args)
    assert torch.allclose(disabled, base, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert models.policy.training  # loaded for training; reference_mode ran the reference in eval and restored it


@pytest.mark.parametrize("method", ["alpha_dpo", "dpo"])
def test_precomputed_and_online_reference_give_the_same_losses(tmp_path, prefs_dir, method):
    # α-DPO passes only because the normaliser floors σ (sigma_floor): at step 1 g is rounding
    # noise, which a tiny floor would blow up into O(1) margins that differ between the two paths.
    sets = ("training.warmup_ratio=0", "training.max_steps=3")
    pre = train(tiny_config(tmp_path / "a", prefs_dir, "training.precompute_ref=true", *sets, loss=method))
    online = train(tiny_config(tmp_path / "b", prefs_dir, "training.precompute_ref=false", *sets, loss=method))
    assert len(pre.losses) == 3
    assert pre.losses == pytest.approx(online.losses, rel=1e-4, abs=1e-6)
    # After the first update the policy has left the reference: not the degenerate constant loss.
    assert pre.losses[2] != pytest.approx(pre.losses[0], abs=1e-4)


def test_precomputed_reference_matches_online_pair_by_pair(tmp_path, prefs_dir):
    from alphadpo_cli.logps.layouts import PairCollator

    tr = Trainer(tiny_config(tmp_path, prefs_dir))
    models = load_models(tr.cfg.model, tr.cfg.lora, need_reference_model=False)
    split, _ = tr.load_data(models.tokenizer)
    ref = tr.reference_logps(models, split, "train")
    order = [5, 0, 11, 3]
    b = PairCollator(models.tokenizer.pad_token_id)([split.dataset[i] for i in order])
    with torch.no_grad(), reference_mode(models.policy) as net:
        sums, counts = SequenceLogps(net)(b["input_ids"], b["attention_mask"], b["response_mask"])
    taken = ref.select(b["index"])
    chosen, rejected = taken.policy_chosen_logps, taken.policy_rejected_logps
    assert torch.allclose(chosen.float(), sums[:4], atol=1e-4) and torch.allclose(rejected.float(), sums[4:], atol=1e-4)
    assert torch.equal(ref.chosen_lengths[order].float(), counts[:4])


def test_full_finetuning_with_separate_frozen_reference(tmp_path, prefs_dir):
    cfg = tiny_config(tmp_path, prefs_dir, "model.mode=full", "training.precompute_ref=false", "training.learning_rate=1e-2")
    tr = Trainer(cfg)
    before = base_params(build_tiny_model(ModelConfig(), len(build_tiny_tokenizer())))
    tr.run()
    ref = tr.models.reference
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    for n, p in ref.named_parameters():
        assert torch.equal(p, before[n])
    moved = [n for n, p in tr.models.policy.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved
    out = Path(cfg.training.output_dir)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_reference_cache_hit_and_miss(tmp_path, prefs_dir):
    ref_root = lambda: sorted(p.name for p in (cache_home() / "reference").iterdir())  # noqa: E731
    train(tiny_config(tmp_path / "a", prefs_dir))
    keys = ref_root()
    assert len(keys) == 2  # train and eval splits
    mtimes = {k: (cache_home() / "reference" / k / "logps.safetensors").stat().st_mtime_ns for k in keys}
    train(tiny_config(tmp_path / "b", prefs_dir))
    assert ref_root() == keys
    assert {k: (cache_home() / "reference" / k / "logps.safetensors").stat().st_mtime_ns for k in keys} == mtimes
    train(tiny_config(tmp_path / "c", prefs_dir, "data.max_length=300"))
    assert len(ref_root()) == 4  # a tokenisation change never reuses stale numbers


def test_reference_free_methods_never_run_a_reference(tmp_path, prefs_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a reference was run")

    monkeypatch.setattr(reference_mod, "score_pairs", boom)  # the precompute
    monkeypatch.setattr(reference_mod, "reference_mode", boom)
    monkeypatch.setattr(step_mod, "reference_mode", boom)  # the online reference forward
    for method in ("simpo", "cpo", "orpo"):
        res = train(tiny_config(tmp_path / method, prefs_dir, loss=method))
        assert all(torch.isfinite(torch.tensor(res.losses)))
    assert not (cache_home() / "reference").exists()


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "rdpo"])
def test_reference_methods_train(tmp_path, prefs_dir, method):
    res = train(tiny_config(tmp_path, prefs_dir, loss=method))
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))


def test_official_normaliser_nan_at_first_step_is_skipped_not_fatal(tmp_path, prefs_dir):
    # The authors' zero-initialised normaliser divides by 0.1*std(g): where the policy equals the
    # reference, g is exactly 0 and every z is 0/0, the NaN users reported. With the reference run
    # online (the policy with its adapters disabled, on the very same batch; LoRA's B starts at 0),
    # g is exactly 0 on every CPU, so every step is NaN: each is skipped and counted, nothing
    # moves, and the run ends normally. (With a reference precomputed in other batches, g is
    # rounding noise on some CPUs' kernels and exactly 0 on others: not a test that means the same
    # everywhere.)
    from safetensors.torch import load_file

    cfg = tiny_config(tmp_path, prefs_dir, "training.max_steps=4", "training.packing=false",
                      "training.precompute_ref=false", loss="alpha_dpo_official")
    res = train(cfg)
    assert res.steps == 4 and res.skipped_nonfinite == 4
    rows = [json.loads(line) for line in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [1, 2, 3, 4]
    adapter = load_file(str(Path(cfg.training.output_dir) / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(bool((t == 0).all()) for t in lora_b)  # no skipped step reached the weights


def test_outputs_metrics_and_merge(tmp_path, prefs_dir):
    cfg = tiny_config(tmp_path, prefs_dir, "training.merge=true", "training.save_steps=1", "training.report_to=tensorboard")
    res = train(cfg)
    out = Path(cfg.training.output_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml", "metrics.jsonl",
                 "train_results.json", "merged/model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "margin/mean", "margin/std", "margin/min",
                "margin/max", "normalizer/mu", "normalizer/sigma", "grad_norm", "learning_rate", "pairs_per_second"):
        assert key in rows[0], key
    ckpt = out / "checkpoints" / "step-0000001"
    # accelerate's state (trainable weights, optimiser, scheduler, RNG, the registered normaliser) and the loop position
    for name in ("accelerate/model.safetensors", "accelerate/optimizer.bin", "accelerate/scheduler.bin",
                 "accelerate/random_states_0.pkl", "accelerate/custom_checkpoint_0.pkl", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "accelerate" / "model.safetensors"))  # the LoRA weights only, not the frozen base
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    assert list((out / "tensorboard" / "alphadpo").glob("events.out.tfevents.*"))
    assert res.eval_before is not None and res.eval_after is not None
    assert resolve_config(config_file=out / "config.yaml").loss.params == cfg.loss.params


def test_global_batch_and_schedule(tmp_path, prefs_dir):
    cfg = tiny_config(tmp_path, prefs_dir, "training.max_steps=-1", "training.per_device_batch_size=2",
                      "training.global_batch_size=8", "training.warmup_ratio=0.5")
    tr = Trainer(cfg)
    assert tr.grad_accum == 4
    res = tr.run()
    assert res.steps == 2  # 16 pairs / 8 per step, one epoch
    rows = [json.loads(l) for l in (Path(cfg.training.output_dir) / "metrics.jsonl").read_text().splitlines()]
    # warmup 1 step from 0, then cosine from the peak
    assert rows[0]["learning_rate"] == pytest.approx(0.0) and rows[1]["learning_rate"] == pytest.approx(1e-3)


def test_non_empty_output_dir_needs_overwrite(tmp_path, prefs_dir):
    cfg = tiny_config(tmp_path, prefs_dir)
    out = Path(cfg.training.output_dir)
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        train(cfg)
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_dry_run_and_train(tmp_path, prefs_dir):
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(main, ["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "total steps" in r.output and "config and data are valid" in r.output
    assert not out.exists() or not any(out.iterdir())
    r = runner.invoke(main, ["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out),
                             "--set", "training.max_steps=1", "--loss", "simpo"])
    assert r.exit_code == 0, r.output
    assert (out / "adapter_model.safetensors").is_file()
    r = runner.invoke(main, ["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out)])
    assert r.exit_code == 2 and "not empty" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["train", "--preset", "tiny", "--set", "training.lr=1"])
    assert r.exit_code == 2 and "unknown key 'training.lr'" in r.output


def test_cli_presets():
    runner = CliRunner()
    r = runner.invoke(main, ["presets", "list"])
    assert r.exit_code == 0 and "llama3-v0.2" in r.output and "demo" in r.output
    r = runner.invoke(main, ["presets", "show", "llama3-v0.2", "--loss", "simpo"])
    assert r.exit_code == 0
    import yaml

    shown = yaml.safe_load(r.output)
    assert shown["loss"] == {"name": "simpo", "params": {"beta": 10.0, "gamma_beta_ratio": 0.3}}
    r = runner.invoke(main, ["presets", "show", "lama3-v0.2"])
    assert r.exit_code == 2 and "Did you mean" in r.output
