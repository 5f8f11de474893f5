"""The client for OpenAI-compatible chat-completion judges (OpenAI, a local vLLM server, ...).

The requests go through the `openai` package's client (`base_url`, `api_key`, `timeout`; its typed
errors and response models). The retry policy is ours, because the client's own cannot do what a
judge run needs (its retries are set to 0 here):

* its backoff is fixed (0.5 s doubling to 8 s, constants with no public setting), so
  `--judge-backoff` could not be honoured;
* its retries are invisible to the caller, so the report could not count rate limits, server
  errors and retries (`JudgeClient.stats`);
* a 429 pauses only the request that got it, where every worker should wait for `Retry-After`;
* a `Retry-After` above two minutes is not waited for at all: the request fails.

So: transient failures (429, 408, 409, 5xx, timeouts, dropped connections, unreadable bodies) are
retried with exponential backoff and full jitter; a 429 honours `retry-after-ms` or `Retry-After`
(seconds or an HTTP date, up to `MAX_RETRY_AFTER`) and pauses *every* worker until then. Errors
that no retry can fix for any request (401, 403, 404: wrong key, model or URL) stop the run with a
clear message (`JudgeFatalError`); others (e.g. 400 for one over-long prompt) fail only that
request (`JudgeRequestError`), which the caller records and a rerun retries.

Requests run concurrently on a thread pool (`run_concurrently`); results are handed back on the
calling thread, one at a time, so the caller can append them to its log without locks.
"""

from __future__ import annotations

import email.utils
import importlib.util
import json
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from ..config import ConfigError

OPENAI_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
FATAL_STATUSES = {401, 403, 404}
MAX_RETRY_AFTER = 600.0
NO_KEY = "EMPTY"  # what a keyless local server is sent (the client needs some key)


class JudgeFatalError(ConfigError):
    """The judge cannot work at all (bad key, unknown model, wrong URL): stop the run."""


class JudgeRequestError(RuntimeError):
    """One request failed for good (after its retries, or a non-retryable 4xx)."""


@dataclass
class JudgeSettings:
    model: str
    base_url: str = OPENAI_BASE_URL
    api_key: str | None = None
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 300.0
    backoff: float = 1.0  # first retry waits ~backoff seconds, doubling up to max_backoff
    max_backoff: float = 60.0

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"


def judge_settings(model: str, base_url: str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
                   concurrency: int = 8, max_retries: int = 6, timeout: float = 300.0,
                   backoff: float = 1.0) -> JudgeSettings:
    """Settings for the judge; the official OpenAI endpoint needs its API key in `api_key_env`."""
    key = os.environ.get(api_key_env) or None
    if base_url is None:
        base_url = os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE") or OPENAI_BASE_URL
        if not key:
            raise ConfigError(
                f"the judge ({model} on the OpenAI API) needs an API key: set {api_key_env}, or point "
                "--judge-base-url at another OpenAI-compatible server (e.g. a local vLLM: "
                "--judge-base-url http://127.0.0.1:8000/v1 --judge-model NAME), or use --no-judge "
                "to only generate the answers."
            )
    if importlib.util.find_spec("openai") is None:
        raise ConfigError("the judge needs the openai package: pip install 'alphadpo[eval]' (or pip install openai), "
                          "or use --no-judge to only generate the answers")
    if concurrency < 1 or max_retries < 0 or timeout <= 0:
        raise ConfigError("judge settings: concurrency >= 1, max_retries >= 0 and timeout > 0 are required")
    return JudgeSettings(model=model, base_url=base_url.rstrip("/"), api_key=key, concurrency=concurrency,
                         max_retries=max_retries, timeout=timeout, backoff=backoff)


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class _Retry(Exception):
    """One attempt failed in a way a retry may fix; `delay` is a server-given wait, if any."""

    def __init__(self, message: str, delay: float | None = None):
        super().__init__(message)
        self.delay = delay


class JudgeClient:
    """Chat completions with retries; safe to call from many threads (one shared `openai` client)."""

    def __init__(self, settings: JudgeSettings, *, sleep: Callable[[float], None] = time.sleep):
        import openai

        self.settings = settings
        self._openai = openai
        self._client = openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key or NO_KEY,
                                     max_retries=0, timeout=settings.timeout)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._not_before = 0.0  # monotonic time before which nobody sends (set by 429s)
        self.stats: Counter = Counter()

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """The JSON response of one chat completion, as a dict (raises JudgeRequestError/JudgeFatalError)."""
        last = "no attempt"
        for attempt in range(self.settings.max_retries + 1):
            self._wait_gate()
            self._count("requests")
            try:
                return self._attempt(messages, params)
            except _Retry as exc:
                last, delay = str(exc), exc.delay
            if attempt == self.settings.max_retries:
                break
            if delay is None:
                delay = self._backoff(attempt)
            else:
                self._block_all(delay)
            self._count("retries")
            self._sleep(delay)
        raise JudgeRequestError(f"gave up after {self.settings.max_retries + 1} attempts; last error: {last}")

    def _attempt(self, messages: list[dict], params: dict) -> dict:
        """One request: the response, or `_Retry`, `JudgeFatalError`, `JudgeRequestError`."""
        openai = self._openai
        try:
            resp = self._client.chat.completions.create(model=self.settings.model, messages=messages, **params)
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except openai.APIConnectionError as exc:  # refused, dropped, timed out
            self._count("connection_errors")
            raise _Retry(f"{type(exc).__name__}: {exc.__cause__ or exc}") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._count("bad_bodies")
            raise _Retry(f"unreadable response body ({exc})") from None
        out = resp.to_dict() if hasattr(resp, "to_dict") else None
        if not isinstance(out, dict):
            self._count("bad_bodies")
            raise _Retry(f"unreadable response body (not a JSON object: {str(resp)[:80]!r})")
        return out

    def _status_error(self, exc) -> Exception:
        status, text = exc.status_code, _snippet(exc)
        if status in FATAL_STATUSES:
            return JudgeFatalError(f"the judge {self.settings.describe()} answered HTTP {status}: {text}. "
                                   "Check the API key, --judge-model and --judge-base-url.")
        if status not in RETRY_STATUSES and status < 500:
            return JudgeRequestError(f"HTTP {status}: {text}")
        if status != 429:
            self._count("server_errors")
            return _Retry(f"HTTP {status}: {text}")
        self._count("rate_limited")
        delay = parse_retry_after(exc.response.headers)
        return _Retry(f"HTTP {status}: {text}", None if delay is None else min(delay, MAX_RETRY_AFTER))

    def _backoff(self, attempt: int) -> float:
        cap = min(self.settings.max_backoff, self.settings.backoff * (2 ** attempt))
        return random.uniform(0.5 * cap, cap)

    def _block_all(self, delay: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + delay)

    def _wait_gate(self) -> None:
        while True:
            with self._lock:
                wait_s = self._not_before - time.monotonic()
            if wait_s <= 0:
                return
            self._sleep(min(wait_s, 1.0))

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1


def _snippet(exc, n: int = 200) -> str:
    """The server's error message (`error.message` of a JSON body), else the body, shortened."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    else:
        try:
            text = exc.response.text
        except Exception:  # the body could not be read
            text = ""
    text = (text or "").strip().replace("\n", " ")
    return (text[:n] + "...") if len(text) > n else (text or "(empty body)")


J = TypeVar("J")
R = TypeVar("R")


def run_concurrently(jobs: Iterable[J], work: Callable[[J], R], on_result: Callable[[J, R | None, BaseException | None], None],
                     *, concurrency: int, advance: Callable[[int], None] | None = None) -> None:
    """Run `work(job)` on a pool; `on_result(job, result, error)` is called here, on this thread,
    as each finishes. JudgeRequestError is passed to `on_result`; JudgeFatalError and anything
    unexpected stop the run (pending jobs are cancelled; finished ones were already handed over)."""
    jobs = list(jobs)
    if not jobs:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="judge")
    pending = {pool.submit(work, j): j for j in jobs}
    try:
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                exc = fut.exception()
                if exc is not None and not isinstance(exc, JudgeRequestError):
                    raise exc
                on_result(job, None if exc is not None else fut.result(), exc)
                if advance is not None:
                    advance(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def message_text(response: dict) -> str | None:
    """The assistant text of a chat completion, or None if the response has none."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
