"""Where a run starts: `model.init_adapter` (lora/qlora: the policy's adapter from a saved one) and
`model.reference` (full: a frozen reference other than the policy's starting weights). Tiny fp32 models
saved to temporary directories; each test a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import alphadpo_cli.models.loading as loading
from alphadpo_cli.cli import main
from alphadpo_cli.config import ConfigError, ModelConfig, resolve_config
from alphadpo_cli.logps.cache import cache_key
from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer, model_fingerprint
from alphadpo_cli.train.trainer import Trainer, train

BASE = ["training.max_steps=2", "data.max_samples=8", "data.eval_split=null", "training.logging_steps=1",
        "training.warmup_ratio=0", "model.dtype=fp32"]


def _cfg(tmp_path: Path, prefs_dir: Path, *extra: str, loss: str | None = None):
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={tmp_path / 'out'}", *BASE, *extra]
    return resolve_config(preset="tiny", loss=loss, overrides=sets)


def _save_tiny(where: Path, seed: int, tokenizer=None) -> Path:
    tok = tokenizer or build_tiny_tokenizer()
    build_tiny_model(ModelConfig(), len(tok), seed=seed).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def _own_logps(model, split) -> torch.Tensor:
    """[2, N] response log-prob sums of `model`, one unpadded sequence per forward (the oracle)."""
    rows = []
    with torch.no_grad():
        for i in range(len(split)):
            row, sums = split.dataset[i], []
            for answer in (row["chosen_ids"], row["rejected_ids"]):
                ids = list(row["prompt_ids"]) + list(answer)
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
                picked = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
                sums.append(picked[len(row["prompt_ids"]) - 1:].sum())
            rows.append(torch.stack(sums))
    return torch.stack(rows).T


def _reference_of(trainer: Trainer):
    """The run's training split and its reference log-probs as the run computes them (cache or precompute)."""
    split, _ = trainer.load_data(trainer.models.tokenizer)
    ref = trainer.reference_logps(trainer.models, split, "train")
    return split, torch.stack([ref.policy_chosen_logps, ref.policy_rejected_logps]).double()


# -- model.init_adapter -----------------------------------------------------------------------------


def test_init_adapter_starts_from_the_saved_adapter_with_the_base_as_reference(tmp_path, prefs_dir, one_torch_thread,
                                                                                monkeypatch):
    from peft import PeftModel

    train(_cfg(tmp_path / "first", prefs_dir))  # 2 LoRA steps: an adapter that changes the outputs
    saved = tmp_path / "first" / "out"
    notices = []
    monkeypatch.setattr(loading, "notice", notices.append)
    second = Trainer(_cfg(tmp_path / "second", prefs_dir, f"model.init_adapter={saved}", "lora.r=8"))
    second.run(dry_run=True)
    policy = second.models.policy.eval()
    assert [n for n in notices if "init_adapter" in n] == [  # the adapter's own r (4) wins, said once
        "model.init_adapter: the adapter's own LoRA settings are used, not lora.*: r 4 (lora.r 8)"]
    assert {p.shape[0] for n, p in policy.named_parameters() if "lora_A" in n} == {4}
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)

    base = build_tiny_model(ModelConfig(), len(second.models.tokenizer)).eval()
    expected = PeftModel.from_pretrained(build_tiny_model(ModelConfig(), len(second.models.tokenizer)), saved).eval()
    ids = torch.tensor([second.models.tokenizer("a short prompt and its answer").input_ids])
    with torch.no_grad():
        logits = policy(ids).logits
        assert torch.equal(logits, expected(ids).logits)
        assert not torch.allclose(logits, base(ids).logits, atol=1e-4)

    split, ref = _reference_of(second)  # the adapter-disabled policy: the base model
    assert torch.allclose(ref, _own_logps(base, split), atol=1e-4)
    # the reference cache keys on the base (the reference); the run's start on the adapter too
    assert second.models.fingerprint == model_fingerprint(ModelConfig(), torch.float32)
    assert second.models.policy_fingerprint != second.models.fingerprint


# -- model.reference --------------------------------------------------------------------------------


@pytest.fixture
def tiny_dirs(tmp_path):
    return _save_tiny(tmp_path / "policy", seed=0), _save_tiny(tmp_path / "reference", seed=1)


def _full(tmp_path, prefs_dir, policy_dir, *extra, loss: str | None = None):
    return _cfg(tmp_path, prefs_dir, "model.mode=full", f"model.name_or_path={policy_dir}",
                "training.learning_rate=1e-4", *extra, loss=loss)


def test_a_precomputed_reference_is_that_models_and_the_cache_keys_on_it(tmp_path, prefs_dir, tiny_dirs,
                                                                         one_torch_thread):
    policy_dir, reference_dir = tiny_dirs
    named = Trainer(_full(tmp_path / "a", prefs_dir, policy_dir, f"model.reference={reference_dir}"))
    named.run(dry_run=True)
    assert named.models.reference is None  # precomputed: no second model kept
    split, ref = _reference_of(named)
    reference = build_tiny_model(ModelConfig(), len(named.models.tokenizer), seed=1).eval()
    policy = build_tiny_model(ModelConfig(), len(named.models.tokenizer), seed=0).eval()
    assert torch.allclose(ref, _own_logps(reference, split), atol=1e-4)

    plain = Trainer(_full(tmp_path / "b", prefs_dir, policy_dir))  # the same data, the policy as reference
    plain.run(dry_run=True)
    split_b, ref_b = _reference_of(plain)
    assert split_b.fingerprint == split.fingerprint
    assert cache_key(plain.models.fingerprint, split, torch.float32) != cache_key(named.models.fingerprint, split,
                                                                                   torch.float32)
    assert torch.allclose(ref_b, _own_logps(policy, split), atol=1e-4)  # not the other run's entry
    assert not torch.allclose(ref_b, ref, atol=1e-3)


def test_an_online_reference_is_that_model_and_trains_as_the_precomputed_one(tmp_path, prefs_dir, tiny_dirs,
                                                                             one_torch_thread):
    policy_dir, reference_dir = tiny_dirs
    sets = (f"model.reference={reference_dir}", "training.max_steps=1")  # DPO: the loss reads the reference as is
    online = Trainer(_full(tmp_path / "on", prefs_dir, policy_dir, *sets, "training.precompute_ref=false", loss="dpo"))
    result = online.run()
    reference = build_tiny_model(ModelConfig(), len(online.models.tokenizer), seed=1)
    for (name, p), q in zip(online.models.reference.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    pre = train(_full(tmp_path / "pre", prefs_dir, policy_dir, *sets, "training.precompute_ref=true", loss="dpo"))
    own = train(_full(tmp_path / "own", prefs_dir, policy_dir, "training.max_steps=1", loss="dpo"))
    assert result.losses == pytest.approx(pre.losses, abs=1e-5)
    assert result.losses != pytest.approx(own.losses, abs=1e-5)  # another reference, another loss


def test_a_reference_with_another_vocabulary_is_refused_before_any_weights_load(tmp_path, prefs_dir, tiny_dirs,
                                                                                monkeypatch):
    policy_dir, _ = tiny_dirs
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    other = _save_tiny(tmp_path / "other", seed=1, tokenizer=tok)
    monkeypatch.setattr(loading, "load_base", _must_not_load)
    cfg = _full(tmp_path, prefs_dir, policy_dir, f"model.reference={other}")
    with pytest.raises(ConfigError, match=r"model\.reference = .*other: its tokenizer differs .*'<extra>'"):
        Trainer(cfg).run(dry_run=True)


# -- refusals, before any model loads ----------------------------------------------------------------


def _must_not_load(*_a, **_k):
    raise AssertionError("a model was loaded")


def _adapter_dir(where: Path, base: str | None = None) -> Path:
    where.mkdir(parents=True)
    (where / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    return where


@pytest.mark.parametrize("case", ["init_adapter_full", "no_adapter_config", "other_base", "reference_lora",
                                  "reference_auto_one_process"])
def test_refusals_come_before_any_model_loads(tmp_path, prefs_dir, monkeypatch, case):
    monkeypatch.setattr(loading, "load_base", _must_not_load)
    monkeypatch.setattr(loading, "load_tokenizer", _must_not_load)
    adapter = _adapter_dir(tmp_path / "adapter")
    sets, match = {
        "init_adapter_full": ([f"model.init_adapter={adapter}", "model.mode=full"],
                              r"model\.init_adapter = .*: only with model\.mode lora or qlora"),
        "no_adapter_config": ([f"model.init_adapter={tmp_path}"], r"model\.init_adapter = .*: no adapter_config\.json"),
        "other_base": ([f"model.init_adapter={_adapter_dir(tmp_path / 'a2', base=str(tmp_path / 'adapter'))}",
                        f"model.name_or_path={tmp_path}"], r"was trained on the base model .*another directory"),
        "reference_lora": ([f"model.reference={tmp_path}"], r"model\.reference = .*: only with model\.mode=full"),
        "reference_auto_one_process": ([f"model.reference={tmp_path}", "model.mode=auto"],
                                       r"model\.reference = .*: only with model\.mode=full\. With model\.mode=lora"),
    }[case]
    with pytest.raises(ConfigError, match=match):
        Trainer(_cfg(tmp_path, prefs_dir, *sets)).run(dry_run=True)


def test_the_cli_says_what_is_wrong_with_exit_status_2(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "load_base", _must_not_load)
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "-o", str(tmp_path / "out"), "--dry-run",
                                       "--set", f"model.init_adapter={tmp_path}"])
    assert result.exit_code == 2, result.output
    assert "model.init_adapter" in result.output and "no adapter_config.json" in result.output


def test_qlora_starts_from_the_saved_adapter_too(tmp_path, one_torch_thread):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import load_file

    from alphadpo_cli.config import LoraConfig

    tok = build_tiny_tokenizer()
    saved = get_peft_model(build_tiny_model(ModelConfig(), len(tok)),
                           PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in saved.named_parameters():
            if "lora_B" in n:
                p.normal_()
    saved.save_pretrained(tmp_path / "adapter")
    want = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    models = loading.load_models(ModelConfig(mode="qlora", dtype="fp32", init_adapter=str(tmp_path / "adapter")),
                                 LoraConfig(), need_reference_model=False)
    got = {n: p for n, p in models.policy.named_parameters() if "lora_" in n}
    assert len(got) == len(want) and all(p.requires_grad for p in got.values())
    for name, tensor in want.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(got[key].detach().float().cpu(), tensor.float()), name
    assert loading.is_4bit(models.policy)
