"""A small client for OpenAI-compatible chat-completion judges (OpenAI, a local vLLM server, ...).

* Requests run concurrently on a thread pool (`run_concurrently`); results are handed back on the
  calling thread, one at a time, so the caller can append them to its log without locks.
* Transient failures (429, 408, 409, 5xx, timeouts, dropped connections, unreadable bodies) are
  retried with exponential backoff and full jitter. A 429 honours `Retry-After` (seconds or an
  HTTP date) or `retry-after-ms`, and pauses *every* worker until then, not only the one that
  was told.
* Errors that no retry can fix for any request (401, 403, 404: wrong key, model or URL) stop the
  run with a clear message (`JudgeFatalError`); others (e.g. 400 for one over-long prompt) fail
  only that request (`JudgeRequestError`), which the caller records and a rerun retries.

Only the standard library is used, so the judge path needs no extra package.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from ..config import ConfigError

OPENAI_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
FATAL_STATUSES = {401, 403, 404}
MAX_RETRY_AFTER = 600.0


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


class JudgeClient:
    """POSTs chat completions with retries; safe to call from many threads."""

    def __init__(self, settings: JudgeSettings, *, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self._sleep = sleep
        self._lock = threading.Lock()
        self._not_before = 0.0  # monotonic time before which nobody sends (set by 429s)
        self.stats: Counter = Counter()

    # -- public ----------------------------------------------------------------------------------
    def chat(self, messages: list[dict], **params: Any) -> dict:
        """The decoded JSON response of one chat completion (raises JudgeRequestError/JudgeFatalError)."""
        body = {"model": self.settings.model, "messages": messages, **params}
        data = json.dumps(body).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.settings.max_retries + 1):
            self._wait_gate()
            self._count("requests")
            delay = None
            try:
                status, headers, payload = self._post(data)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                self._count("connection_errors")
            else:
                if status == 200:
                    try:
                        out = json.loads(payload.decode("utf-8"))
                        if not isinstance(out, dict):
                            raise ValueError("not an object")
                        return out
                    except (ValueError, UnicodeDecodeError) as exc:
                        last = f"unreadable response body ({exc})"
                        self._count("bad_bodies")
                elif status in FATAL_STATUSES:
                    raise JudgeFatalError(
                        f"the judge {self.settings.describe()} answered HTTP {status}: {_snippet(payload)}. "
                        "Check the API key, --judge-model and --judge-base-url."
                    )
                elif status in RETRY_STATUSES or status >= 500:
                    last = f"HTTP {status}: {_snippet(payload)}"
                    if status == 429:
                        self._count("rate_limited")
                        delay = parse_retry_after(headers)
                        if delay is not None:
                            delay = min(delay, MAX_RETRY_AFTER)
                    else:
                        self._count("server_errors")
                else:
                    raise JudgeRequestError(f"HTTP {status}: {_snippet(payload)}")
            if attempt == self.settings.max_retries:
                break
            if delay is None:
                delay = self._backoff(attempt)
            else:
                self._block_all(delay)
            self._count("retries")
            self._sleep(delay)
        raise JudgeRequestError(f"gave up after {self.settings.max_retries + 1} attempts; last error: {last}")

    # -- internals -------------------------------------------------------------------------------
    def _post(self, data: bytes):
        headers = {"Content-Type": "application/json", "User-Agent": "alphadpo-eval"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        req = urllib.request.Request(f"{self.settings.base_url}/chat/completions", data=data, headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.settings.timeout) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            try:
                payload = exc.read()
            except Exception:
                payload = b""
            return exc.code, exc.headers, payload

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


def _snippet(payload: bytes, n: int = 200) -> str:
    text = payload.decode("utf-8", errors="replace").strip().replace("\n", " ")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            text = str(obj["error"].get("message") or obj["error"])
    except ValueError:
        pass
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
