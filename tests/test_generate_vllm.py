"""The vLLM path of the shared generation code (`ChatGenerator`), against a stand-in `vllm` package.

No GPU here, and vLLM needs one: the stand-in records every call and answers with fixed tokens,
so what is checked is our side of the contract, written against the public API of vLLM 0.30.0
(the `vllm` extra; read from its wheel, and unchanged in 0.33.0)
(`vllm.LLM(**engine_args)`, `LLM.generate(prompts, sampling_params, *, use_tqdm, lora_request)`,
`SamplingParams(n, temperature, top_p, max_tokens, stop_token_ids, seed)`, `TokensPrompt`
dicts, `LoRARequest(lora_name, lora_int_id, lora_path)`, `CompletionOutput.token_ids` and
`finish_reason`): the engine arguments (dtype, seed, the adapter's LoRA rank), the prompts as
token ids with exactly one BOS, one seed per prompt for the builder's samples, and answers cut at
the stop ids with their finish reasons."""

from __future__ import annotations

import json
import sys

import pytest

from alphadpo_cli.config import ConfigError
from alphadpo_cli.evaluation import generate

FAKE_VLLM = '''
from types import SimpleNamespace

CALLS = []
# completion token ids by position: a, b, EOS, c (cut at EOS) | a, a, a (cut off) | b, c (stopped by vLLM
# without the stop id in the output)
COMPLETIONS = [([64, 65, {eos}, 66], "stop"), ([64, 64, 64], "length"), ([65, 66], "stop")]


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class LLM:
    def __init__(self, **kw):
        CALLS.append(("init", kw))

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        CALLS.append(("generate", prompts, sampling_params, lora_request, use_tqdm))
        outs = []
        for i, _ in enumerate(prompts):
            sp = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(token_ids=COMPLETIONS[j % 3][0], finish_reason=COMPLETIONS[j % 3][1])
                for j in range(sp.kw["n"])]))
        return outs
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch, tok):
    pkg = tmp_path / "stand_in" / "vllm"
    (pkg / "lora").mkdir(parents=True)
    (pkg / "distributed").mkdir()
    (pkg / "__init__.py").write_text(FAKE_VLLM.replace("{eos}", str(tok.eos_token_id)))
    (pkg / "lora" / "__init__.py").write_text("")
    (pkg / "lora" / "request.py").write_text(
        "class LoRARequest:\n    def __init__(self, lora_name, lora_int_id, lora_path):\n"
        "        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path\n")
    (pkg / "distributed" / "__init__.py").write_text("")
    (pkg / "distributed" / "parallel_state.py").write_text("def destroy_model_parallel():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "stand_in"))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(generate, "vllm_available", lambda: True)  # the CUDA probe: there is no GPU here
    model = tmp_path / "model"
    tok.save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tok)}))
    import vllm

    return vllm, model


def _dec(**kw):
    return generate.Decoding(**{"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 7, "seed": 3, **kw})


def test_samples_per_prompt_seeded_and_cut_at_the_stop_ids(fake_vllm, tok):
    vllm, model = fake_vllm
    gen = generate.ChatGenerator(str(model), decoding=_dec(stop_token_ids=[66]), backend="auto", dtype="bf16",
                                 vllm_args={"gpu_memory_utilization": 0.5})
    assert gen.backend == "vllm"
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "why?"}]]
    got = gen.sample(prompts, 3, seed_key="train/0")
    init = [c for c in vllm.CALLS if c[0] == "init"]
    assert len(init) == 1
    kw = init[0][1]
    assert (kw["model"], kw["dtype"], kw["seed"], kw["gpu_memory_utilization"]) == (str(model), "bfloat16", 3, 0.5)
    assert "enable_lora" not in kw
    _, sent, params, lora, tqdm = vllm.CALLS[-1]
    assert lora is None and tqdm is False
    assert sent == [{"prompt_token_ids": gen.prompt_ids(m)} for m in prompts]
    text = tok.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
    assert sent[0]["prompt_token_ids"] == tok(text, add_special_tokens=False).input_ids  # no BOS added here
    assert isinstance(params, list) and len(params) == 2  # one per prompt, each with its own seed
    for p in params:
        assert {k: p.kw[k] for k in ("n", "temperature", "top_p", "max_tokens")} == {
            "n": 3, "temperature": 0.8, "top_p": 0.95, "max_tokens": 7}
        assert p.kw["stop_token_ids"] == [tok.eos_token_id, 66]
    seeds = [p.kw["seed"] for p in params]
    assert seeds[0] != seeds[1]
    gen.sample(prompts, 3, seed_key="train/0")
    assert [p.kw["seed"] for p in vllm.CALLS[-1][2]] == seeds  # the same batch, the same seeds
    gen.sample(prompts, 3, seed_key="train/1")
    assert not set(p.kw["seed"] for p in vllm.CALLS[-1][2]) & set(seeds)
    # answers: cut at the first stop id (EOS, or the preset's 66), finish as vLLM reports it
    assert [[(a.text, a.tokens, a.finish) for a in per] for per in got] == [
        [(tok.decode([64, 65]), 2, "stop"), (tok.decode([64, 64, 64]), 3, "length"), (tok.decode([65]), 1, "stop")]] * 2
    gen.close()
    assert gen._llm is None


def test_greedy_answers_use_one_seed_and_no_top_p(fake_vllm):
    vllm, model = fake_vllm
    gen = generate.ChatGenerator(str(model), decoding=_dec(temperature=0.0), backend="vllm")
    answers = gen.generate([[{"role": "user", "content": "hi"}]])
    params = vllm.CALLS[-1][2]
    assert not isinstance(params, list)  # one SamplingParams for the batch
    assert (params.kw["n"], params.kw["temperature"], params.kw["top_p"], params.kw["seed"]) == (1, 0.0, 1.0, 3)
    assert len(answers) == 1 and answers[0].finish == "stop"


def test_an_adapter_is_served_as_a_lora_request_with_its_rank(fake_vllm, tmp_path):
    vllm, model = fake_vllm
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32, "base_model_name_or_path": str(model)}))
    gen = generate.ChatGenerator(str(adapter), decoding=_dec(), backend="vllm")
    gen.sample([[{"role": "user", "content": "hi"}]], 2, seed_key="b")
    kw = next(c[1] for c in vllm.CALLS if c[0] == "init")
    assert kw["model"] == str(model) and kw["enable_lora"] is True
    assert kw["max_lora_rank"] == 32  # vLLM's default (16) refuses a rank-32 adapter
    lora = vllm.CALLS[-1][3]
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("adapter", 1, str(adapter))


def test_the_lora_rank_vllm_needs(tmp_path):
    def rank(r):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        return generate.vllm_lora_rank(tmp_path)

    assert [rank(r) for r in (4, 8, 16, 17, 64, 300)] == [8, 8, 16, 32, 64, 320]
    with pytest.raises(ConfigError, match="LoRA rank 1024 is above the largest vLLM serves"):
        rank(1024)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="adapter_config.json: cannot read"):
        generate.vllm_lora_rank(tmp_path)
