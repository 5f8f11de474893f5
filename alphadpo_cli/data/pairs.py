"""Validation: every row of any supported layout to (prompt, chosen, rejected) messages, each
problem naming the file, the row (and JSONL line) and the field; all of a split's problems are
reported together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..values import did_you_mean
from .errors import DataError
from .reading import RawRows

MAX_REPORTED_ERRORS = 8


@dataclass
class Pair:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


def check_messages(value: Any, where: str, fieldname: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{fieldname}' must be a non-empty list of messages, got {_describe(value)}")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field '{fieldname}[{j}]' must be a message object, got {_describe(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(f"{where}: field '{fieldname}[{j}]' has no '{key}'")
        if not isinstance(msg["role"], str):
            raise DataError(f"{where}: field '{fieldname}[{j}].role' must be a string, got {_describe(msg['role'])}")
        if not isinstance(msg["content"], str):
            raise DataError(
                f"{where}: field '{fieldname}[{j}].content' must be a string, got {_describe(msg['content'])}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _as_messages(value: Any, role: str, where: str, fieldname: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, fieldname)


REQUIRED = ("chosen", "rejected")


def _check_required(row: dict, where: str) -> None:
    """The chosen and rejected columns are there; a missing one names the columns found and the
    one that looks like it."""
    missing = [k for k in REQUIRED if k not in row]
    if not missing:
        return
    cols = sorted(row)
    hints = []
    for k in missing:
        close = did_you_mean(k, cols, cutoff=0.5)
        if close is not None:
            hints.append(f"'{close}' looks like '{k}'")
    hint = f" ({'; '.join(hints)}: rename the column)" if hints else ""
    raise DataError(
        f"{where}: missing field {', '.join(repr(k) for k in missing)}{hint}. Found columns: {', '.join(cols)}. "
        "Expected chosen/rejected message lists, or prompt/chosen/rejected strings."
    )


def _split_conversations(chosen: list, rejected: list, prompt: Any, where: str) -> tuple[list, list, list]:
    """(prompt, chosen response, rejected response) messages of two conversations: their shared
    prefix is the prompt, else the `prompt` field (repeated at their start or not)."""
    c = check_messages(chosen, where, "chosen")
    r = check_messages(rejected, where, "rejected")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n > 0 and n < len(c) and n < len(r):
        return c[:n], c[n:], r[n:]
    if prompt is not None:
        prompt_msgs = _as_messages(prompt, "user", where, "prompt")
        # Conversations that repeat the prompt: keep only what follows it.
        if c[: len(prompt_msgs)] == prompt_msgs and r[: len(prompt_msgs)] == prompt_msgs:
            return prompt_msgs, c[len(prompt_msgs):], r[len(prompt_msgs):]
        return prompt_msgs, c, r
    if n == min(len(c), len(r)):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt messages and there is no 'prompt' field")


def to_pair(row: dict, where: str) -> Pair:
    """Normalise one row of any supported layout to (prompt, chosen, rejected) messages."""
    _check_required(row, where)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got {_describe(value)}")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {_describe(prompt)}")

    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt_msgs, c_resp, r_resp = _split_conversations(chosen, rejected, prompt, where)
    else:
        if prompt is None:
            raise DataError(f"{where}: missing field 'prompt' (needed when chosen/rejected are strings)")
        prompt_msgs = _as_messages(prompt, "user", where, "prompt")
        c_resp = _as_messages(chosen, "assistant", where, "chosen")
        r_resp = _as_messages(rejected, "assistant", where, "rejected")

    if not c_resp or not r_resp:
        raise DataError(f"{where}: no response after the prompt in 'chosen' or 'rejected'")
    for name, resp in (("chosen", c_resp), ("rejected", r_resp)):
        if resp[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{name}': the last message must be the assistant's, not '{resp[-1]['role']}'")
        if not resp[-1]["content"].strip():
            raise DataError(f"{where}: field '{name}': the response is empty")
    if not any(m["content"].strip() for m in prompt_msgs):
        raise DataError(f"{where}: field 'prompt' is empty")
    if c_resp == r_resp:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return Pair(prompt_msgs, c_resp, r_resp)


def validate_rows(raw: RawRows) -> list[Pair]:
    """All rows as pairs; every problem is collected and reported together."""
    pairs, errors = [], []
    for i, row in enumerate(raw.rows):
        try:
            pairs.append(to_pair(row, raw.where(i)))
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} invalid row(s) in {raw.source}:\n  {shown}{more}")
    return pairs

