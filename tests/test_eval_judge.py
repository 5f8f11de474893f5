"""The OpenAI-compatible judge client against a real HTTP server on 127.0.0.1: retries on 429
(honouring Retry-After) and 5xx, fatal errors, concurrency."""

from __future__ import annotations

import email.utils
import importlib.util
import threading
import time
from pathlib import Path

import pytest

from alphadpo_cli.config import ConfigError
from alphadpo_cli.evaluation.judge import (
    JudgeClient,
    JudgeFatalError,
    JudgeRequestError,
    JudgeSettings,
    judge_settings,
    message_text,
    parse_retry_after,
    run_concurrently,
)

_spec = importlib.util.spec_from_file_location(
    "eval_judge_server", Path(__file__).parent / "fixtures" / "eval" / "judge_server.py")
judge_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(judge_server)

ARENA_MSG = [{"role": "user", "content": "<|The Start of Assistant A's Answer|>\nlong answer\n<|The End of Assistant A's Answer|>"
                                          "\n\n<|The Start of Assistant B's Answer|>\nb\n<|The End of Assistant B's Answer|>"}]


def _client(url, **kw) -> JudgeClient:
    return JudgeClient(JudgeSettings(model="stub", base_url=url, backoff=kw.pop("backoff", 0.01), **kw))


def test_retry_after_429_is_honoured():
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.append((429, {"Retry-After": "0.3"}))
        c = _client(srv.url)
        t0 = time.monotonic()
        out = c.chat(ARENA_MSG)
        assert time.monotonic() - t0 >= 0.3
        assert "[[A>>B]]" in message_text(out)
        assert c.stats["rate_limited"] == 1 and c.stats["retries"] == 1 and len(srv.requests) == 2


def test_retry_after_ms_and_http_date():
    assert parse_retry_after({"retry-after-ms": "250"}) == pytest.approx(0.25)
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"Retry-After": when}) <= 31
    assert parse_retry_after({"Retry-After": "garbage"}) is None
    assert parse_retry_after({}) is None


def test_500s_are_retried_with_backoff_then_succeed():
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(500, {}), (503, {}), (502, {})])
        c = _client(srv.url)
        assert message_text(c.chat(ARENA_MSG))
        assert c.stats["server_errors"] == 3 and len(srv.requests) == 4


def test_gives_up_after_max_retries():
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(500, {})] * 5)
        c = _client(srv.url, max_retries=2)
        with pytest.raises(JudgeRequestError, match="3 attempts"):
            c.chat(ARENA_MSG)
        assert len(srv.requests) == 3


@pytest.mark.parametrize("status", [401, 404])
def test_auth_and_not_found_are_fatal_without_retry(status):
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.append((status, {}))
        with pytest.raises(JudgeFatalError, match=f"HTTP {status}"):
            _client(srv.url).chat(ARENA_MSG)
        assert len(srv.requests) == 1


def test_bad_request_fails_only_that_request():
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.append((400, {}))
        with pytest.raises(JudgeRequestError, match="HTTP 400"):
            _client(srv.url).chat(ARENA_MSG)


def test_connection_refused_is_retried_then_reported():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = _client(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(JudgeRequestError, match="ConnectionRefused|Errno"):
        c.chat(ARENA_MSG)
    assert c.stats["connection_errors"] == 2


def test_requests_run_concurrently_and_results_come_back_on_the_caller_thread():
    with judge_server.JudgeServer(delay=0.3) as srv:
        srv.fail_plan.append((500, {}))  # one job is retried; the others are not held up
        c = _client(srv.url, concurrency=4)
        seen, threads = [], set()

        def on_result(job, res, exc):
            threads.add(threading.get_ident())
            seen.append((job, exc is None))

        t0 = time.monotonic()
        run_concurrently(range(8), lambda j: c.chat(ARENA_MSG), on_result, concurrency=4)
        took = time.monotonic() - t0
        assert sorted(j for j, _ in seen) == list(range(8)) and all(ok for _, ok in seen)
        assert threads == {threading.get_ident()}
        assert took < 8 * 0.3 * 0.75  # far from sequential


def test_request_errors_are_handed_to_the_caller_fatal_ones_stop():
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(400, {})])
        c = _client(srv.url, concurrency=1)
        got = []
        run_concurrently([1, 2], lambda j: c.chat(ARENA_MSG), lambda j, r, e: got.append(type(e).__name__ if e else "ok"),
                         concurrency=1)
        assert sorted(got) == ["JudgeRequestError", "ok"]
        srv.fail_plan.extend([(401, {})])
        with pytest.raises(JudgeFatalError):
            run_concurrently([1, 2], lambda j: c.chat(ARENA_MSG), lambda *a: None, concurrency=1)


def test_openai_judge_needs_a_key(monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        judge_settings("gpt-4-1106-preview")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    s = judge_settings("gpt-4-1106-preview")
    assert s.base_url == "https://api.openai.com/v1" and s.api_key == "sk-test"
    assert judge_settings("local", "http://127.0.0.1:8000/v1/").base_url == "http://127.0.0.1:8000/v1"


def test_without_the_openai_package_the_judge_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    with pytest.raises(ConfigError, match=r"openai package: pip install 'alphadpo\[eval\]'.*--no-judge"):
        judge_settings("local", "http://127.0.0.1:8000/v1")


def test_the_server_error_message_is_reported():
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.append((400, {}))
        c = JudgeClient(JudgeSettings(model="stub", base_url=srv.url, api_key="sk-local"))
        with pytest.raises(JudgeRequestError, match="HTTP 400: planned 400"):
            c.chat(ARENA_MSG)
        assert c.stats["requests"] == 1
