"""Cache keys follow what determines the tokens and the weights, never how they were reached: the
same key online and offline, for a touched file, for a copy elsewhere; another key for other
content or other tokenisation code."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from alphadpo_cli import hub
from alphadpo_cli.config import ModelConfig
from alphadpo_cli.data import TokenizeSettings, tokenize_split
from alphadpo_cli.data import fingerprint as data_fp
from alphadpo_cli.logps.cache import cache_key
from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer, model_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache in tmp with owner/m at COMMIT (refs/main and snapshots/<commit>/: config,
    safetensors weights, tokenizer), as a download leaves it; HF_HUB_CACHE points there."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    repo = root / "models--owner--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    tok = build_tiny_tokenizer()
    build_tiny_model(ModelConfig(), len(tok)).save_pretrained(snap)
    tok.save_pretrained(snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)  # no local folder named owner/m
    hub.reset()
    yield snap
    hub.reset()


def test_a_hub_model_has_the_same_key_online_and_offline(hub_cache, monkeypatch):
    cfg = ModelConfig(name_or_path="owner/m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cached snapshot's folder is loaded
    offline = model_fingerprint(cfg, torch.float32)
    # online: the id is handed to from_pretrained; nothing may leave this machine to find its commit
    monkeypatch.setattr(hub, "offline_reason", lambda kind="model": None)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used"))
    from alphadpo_cli.models.loading import model_source

    assert model_source(cfg) == "owner/m"
    online = model_fingerprint(cfg, torch.float32)
    assert online == offline
    assert model_fingerprint(cfg, torch.bfloat16) != offline  # the dtype is part of it
    # the snapshot's commit is the weights' identity: another commit under main is another key
    other = hub_cache.parent / ("f" * 40)
    shutil.copytree(hub_cache, other)
    (hub_cache.parent.parent / "refs" / "main").write_text("f" * 40)
    assert model_fingerprint(cfg, torch.float32) != offline


def test_local_weights_are_keyed_by_content_not_by_modification_time(tmp_path):
    tok = build_tiny_tokenizer()
    model_dir = tmp_path / "m"
    build_tiny_model(ModelConfig(), len(tok)).save_pretrained(model_dir)
    cfg = ModelConfig(name_or_path=str(model_dir))
    before = model_fingerprint(cfg, torch.float32)
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(10**18, 10**18))  # touched: same content
    os.utime(model_dir / "config.json", ns=(10**18, 10**18))
    assert model_fingerprint(cfg, torch.float32) == before
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)  # the same weights elsewhere
    assert model_fingerprint(ModelConfig(name_or_path=str(copy)), torch.float32) == before
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, same size, same mtime
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(10**18, 10**18))
    assert model_fingerprint(cfg, torch.float32) != before


def test_content_sha256_is_the_contents_hash_whatever_the_stamp(tmp_path):
    import hashlib

    from alphadpo_cli.integrity import content_sha256

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert content_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    os.utime(f, ns=(5, 5))
    assert content_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"abd")
    os.utime(f, ns=(5, 5))  # same size, same mtime as the remembered stamp: the ctime still moved
    assert content_sha256(f) == hashlib.sha256(b"abd").hexdigest()


def _split(prefs_dir, tok):
    return tokenize_split(str(prefs_dir), "train", tok, TokenizeSettings(256, 128), max_samples=4)


def test_the_tokenised_key_follows_the_tokenizers_content_not_how_it_was_loaded(hub_cache, tmp_path, prefs_dir):
    from transformers import AutoTokenizer

    first = _split(prefs_dir, AutoTokenizer.from_pretrained(hub_cache))
    # the same files elsewhere, touched, loaded with other loading options
    copy = tmp_path / "tok"
    shutil.copytree(hub_cache, copy)
    for f in copy.iterdir():
        os.utime(f, ns=(10**18, 10**18))
    again = _split(prefs_dir, AutoTokenizer.from_pretrained(copy, local_files_only=True))
    assert again.fingerprint == first.fingerprint and again.stats.cache_hit
    # a model's cache key over it: the same whichever way the model was reached
    assert cache_key("m", again, torch.float32) == cache_key("m", first, torch.float32)
    changed = AutoTokenizer.from_pretrained(copy)
    changed.chat_template = changed.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _split(prefs_dir, changed).fingerprint != first.fingerprint


def test_the_tokenised_key_follows_the_tokenisation_code(tmp_path, prefs_dir, monkeypatch):
    tok = build_tiny_tokenizer()
    first = _split(prefs_dir, tok)
    # the data package's modules, one after the other, hash as one file of their bytes
    source = b"".join(Path(p).read_bytes() for p in data_fp.TOKENIZATION_SOURCES)
    same = tmp_path / "same.py"
    same.write_bytes(source)
    monkeypatch.setattr(data_fp, "TOKENIZATION_SOURCES", (same,))
    assert _split(prefs_dir, tok).fingerprint == first.fingerprint  # the same code: the same key
    edited = tmp_path / "edited.py"
    edited.write_bytes(source.replace(b"prompt = [pt.bos] + prompt", b"prompt = [pt.bos] + prompt  # edit"))
    assert edited.read_bytes() != source
    monkeypatch.setattr(data_fp, "TOKENIZATION_SOURCES", (edited,))
    other = _split(prefs_dir, tok)
    assert other.fingerprint != first.fingerprint and not other.stats.cache_hit
    # the reference cache, keyed by the split's fingerprint, misses too
    assert cache_key("m", other, torch.float32) != cache_key("m", first, torch.float32)


def test_the_reference_key_follows_the_scoring_code(tiny_split, monkeypatch):
    import alphadpo_cli.logps.cache as cache_mod

    split = tiny_split(4)
    before = cache_key("m", split, torch.float32)
    assert cache_key("m", split, torch.float32) == before
    monkeypatch.setattr(cache_mod, "_CODE_SHA", {})
    monkeypatch.setattr(cache_mod, "SCORING_PACKAGES", ("logps", "kernels"))  # other code
    assert cache_key("m", split, torch.float32) != before
