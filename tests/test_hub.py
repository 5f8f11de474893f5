"""Quiet and fast when offline: a hub id without a hub gives one line within seconds, its cached
copy is used when there is one, and nothing here ever leaves this machine (HF_HUB_OFFLINE=1, or an
endpoint on 127.0.0.1 whose port is closed)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from alphadpo_cli import hub
from alphadpo_cli.cli import main
from alphadpo_cli.data import DataError, load_rows
from alphadpo_cli.models.sources import SourceError, resolve_model_source

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "ALPHADPO_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def fresh_probe():
    hub.reset()
    yield
    hub.reset()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


@pytest.fixture
def unreachable_hub(monkeypatch):
    """No offline variable, and the hub endpoint is a closed port on this machine."""
    for var in OFFLINE_VARS + PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    port = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_offline_variable_answers_without_any_connection(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("probed although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason("model") == "HF_HUB_OFFLINE=1 is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub.offline_reason("dataset") == "HF_DATASETS_OFFLINE=true is set"


def test_the_probe_runs_once_against_the_hub_host_only(unreachable_hub, monkeypatch):
    calls = []
    real = socket.create_connection

    def counting(address, *a, **k):
        calls.append(address)
        return real(address, *a, **k)

    monkeypatch.setattr(socket, "create_connection", counting)
    start = time.monotonic()
    why = hub.offline_reason("dataset")
    assert why.startswith(f"127.0.0.1:{unreachable_hub} cannot be reached")
    assert hub.offline_reason("model") == why and hub.offline_reason("file") == why  # asked once
    assert calls == [("127.0.0.1", unreachable_hub)]
    assert time.monotonic() - start < 3


def test_a_hanging_probe_gives_up_after_its_timeout(unreachable_hub, monkeypatch):
    monkeypatch.setenv("ALPHADPO_HUB_PROBE_TIMEOUT", "0.3")
    def hangs(*args, **kwargs):
        time.sleep(30)  # the probe thread is a daemon: it may finish during a later test
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    start = time.monotonic()
    assert hub.offline_reason() == f"127.0.0.1:{unreachable_hub} cannot be reached: no answer within 0.3 s"
    assert time.monotonic() - start < 2


def test_behind_a_proxy_nothing_is_probed(unreachable_hub, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed through a proxy"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    assert hub.offline_reason() is None


def _run(args):
    import datasets  # noqa: F401  (imports are not what is timed)
    import peft  # noqa: F401

    import alphadpo_cli.train.trainer

    start = time.monotonic()
    r = CliRunner().invoke(main, args)
    return r, time.monotonic() - start


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE=1", "closed endpoint"])
def test_a_hub_dataset_without_a_hub_is_one_line_within_seconds(offline, tmp_path, monkeypatch, request):
    if offline == "closed endpoint":
        request.getfixturevalue("unreachable_hub")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r, took = _run(["train", "--preset", "tiny", "--dataset", "princeton-nlp/llama3-ultrafeedback-armorm",
                    "-o", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 2, r.output
    assert took < 10
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'princeton-nlp/llama3-ultrafeedback-armorm'")
    assert "out of reach" in lines[0] and "--dataset DIR" in lines[0] and "huggingface-cli download" in lines[0]
    assert "Traceback" not in r.output and "Retrying" not in r.output
    start = time.monotonic()
    with pytest.raises(DataError, match="out of reach"):
        load_rows("princeton-nlp/llama3-ultrafeedback-armorm", "train")
    assert time.monotonic() - start < 3


def test_a_hub_model_without_a_hub_is_one_line_within_seconds(unreachable_hub, tmp_path):
    r, took = _run(["train", "--preset", "tiny", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "-o", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 2, r.output
    assert took < 10
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "model 'HuggingFaceTB/SmolLM2-135M-Instruct' is a Hugging Face hub id" in lines[0]
    assert "local model directory" in lines[0] and "Traceback" not in r.output


def _fake_hub_cache(root: Path, repo_type: str, repo_id: str, files: dict[str, bytes]) -> Path:
    """The hub cache's layout: <type>s--owner--name/refs/main and snapshots/<commit>/..."""
    repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snap = repo / "snapshots" / "0123abcd"
    for rel, data in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(data)
    return snap


def test_cached_copies_are_used_without_the_hub(unreachable_hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3))
    snap = _fake_hub_cache(tmp_path / "hub", "dataset", "owner/prefs", {"data/train-00000-of-00001.jsonl": rows.encode()})
    raw = load_rows("owner/prefs", "train")
    assert len(raw.rows) == 3 and raw.source == str(snap / "data" / "train-00000-of-00001.jsonl")
    with pytest.raises(DataError, match="no cached copy"):
        load_rows("owner/other", "train")
    model = _fake_hub_cache(tmp_path / "hub", "model", "owner/m", {"config.json": b"{}"})
    assert resolve_model_source("owner/m", check_hub=True) == str(model)
    assert resolve_model_source("owner/m") == "owner/m"  # without the check: the id, unchanged
    with pytest.raises(SourceError, match="no copy is cached"):
        resolve_model_source("owner/none", check_hub=True)
