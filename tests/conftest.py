"""Shared fixtures: every test gets its own cache root, so no test sees another's caches.

The converted SmolLM2 checkpoint is the exception: converting it takes ~30 s, so the real-model
tests share one conversion through the session-scoped `smollm2_dir` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# model.dtype=auto means bf16 on CPUs with AVX512-BF16/AMX: pin float32 so that the numerical tests
# (1e-5 comparisons) mean the same on every machine. tests/test_logprobs.py covers the bf16 path.
os.environ["ALPHADPO_CPU_BF16"] = "0"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch, request):
    if "shared_cache" in request.keywords:
        return
    monkeypatch.setenv("ALPHADPO_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def prefs_dir() -> Path:
    return FIXTURES / "prefs"


@pytest.fixture
def one_torch_thread():
    """The tiny model is far faster on one thread than on two contended ones (shared CI cores)."""
    try:
        import torch
    except ImportError:  # the alpaca_eval compatibility tests also run in a venv without torch
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    """The project's tiny offline tokenizer (no hub)."""
    from alphadpo_cli.models.loading import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_split(tok):
    """`tiny_split(n)`: the first n pairs of tests/fixtures/prefs' train split, tokenised for `tok`
    (max length 256, prompt 128), uncached."""
    from alphadpo_cli.data import TokenizeSettings, tokenize_split

    def make(n: int):
        return tokenize_split(str(FIXTURES / "prefs"), "train", tok, TokenizeSettings(256, 128), max_samples=n,
                              use_cache=False)

    return make
