"""Prompts of a dataset: what a model is asked to answer, by the data builder (`alphadpo data build`)
and the reward evaluation (`alphadpo eval reward`). One reader, one rule:

1. the column named by `prompt_field`, when given (a string or messages);
2. a preference row (`chosen` and `rejected`): the prompt training sees for it (`data.to_pair`:
   the turns the two conversations share, or its `prompt` field), and its chosen answer as a
   reference;
3. else its `prompt` (a string or messages);
4. else its `messages` conversation, or a lone `chosen` conversation, without its last assistant
   turn (that turn is the reference).

A prompt must end with a non-assistant turn and hold some text. Every other field of the row (e.g.
a verifiable row's ``constraints``) is kept in `extras`: rewards read it, and the builder copies it
into the rows it writes. Every bad row is reported at once (file, row, field), before any model
loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import MAX_REPORTED_ERRORS, DataError, check_messages, load_rows, to_pair
from .integrity import json_sha256

__all__ = ["PromptRow", "CONVERSATION_FIELDS", "extract_prompt", "prompt_key", "read_prompts"]

# fields of a row that hold the conversation or an earlier build's answers and scores, not row data
CONVERSATION_FIELDS = frozenset({"prompt", "messages", "chosen", "rejected", "score_chosen", "score_rejected",
                                 "all_generated_responses", "all_rm_scores"})


def prompt_key(messages: list[dict]) -> str:
    """A short hash of the prompt's messages: answers are matched to prompts by it."""
    return json_sha256(list(messages))


@dataclass
class PromptRow:
    messages: list[dict]  # ends before the answer
    extras: dict  # the row's other fields
    where: str  # "file, row N": for messages about it
    reference: str | None = None  # the row's own answer (a pair's chosen one), when it has one

    @property
    def key(self) -> str:
        return prompt_key(self.messages)


def _as_prompt(value: Any, where: str, name: str, *, conversation: bool) -> tuple[list[dict], str | None]:
    """(messages, the stripped last answer) of a prompt string / message list, or of a conversation
    whose last assistant turn is dropped."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        return [{"role": "user", "content": value}], None
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got {type(value).__name__}")
    msgs, answer = check_messages(value, where, name), None
    if conversation and msgs[-1]["role"] == "assistant":  # the prompt of its last answer
        msgs, answer = msgs[:-1], msgs[-1]["content"]
    if not msgs:
        raise DataError(f"{where}: field '{name}' holds no prompt (only an assistant turn)")
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: field '{name}' ends with an assistant turn: a prompt ends with the user's turn")
    if not any(m["content"].strip() for m in msgs):
        raise DataError(f"{where}: field '{name}' is empty")
    return msgs, answer


def extract_prompt(row: dict, where: str, prompt_field: str | None = None) -> tuple[list[dict], str | None]:
    """(prompt messages, reference answer or None) of one row, by the rule of the module docstring."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    if prompt_field:
        if prompt_field not in row:
            raise DataError(f"{where}: no field '{prompt_field}' (--prompt-field); found columns: "
                            f"{', '.join(sorted(row)) or 'none'}")
        return _as_prompt(row[prompt_field], where, prompt_field, conversation=False)
    if row.get("chosen") and row.get("rejected"):
        pair = to_pair(row, where)
        return pair.prompt, pair.chosen[-1]["content"]
    for name in ("prompt", "messages", "chosen"):
        if row.get(name) is not None:
            return _as_prompt(row[name], where, name, conversation=name != "prompt")
    raise DataError(f"{where}: no prompt: expected chosen/rejected, a 'prompt' string or message list, or a "
                    f"'messages' conversation (found columns: {', '.join(sorted(row)) or 'none'}); name another "
                    "column with --prompt-field")


def read_prompts(dataset: str, split: str, *, prompt_field: str | None = None,
                 max_prompts: int | None = None) -> tuple[list[PromptRow], str]:
    """(prompts of `dataset[split]` in the file's order, the source's name); the first
    `max_prompts` rows only, when given. Every bad row is reported at once."""
    raw = load_rows(dataset, split)
    if max_prompts is not None:
        raw = raw.head(max_prompts)
    if not raw.rows:
        raise DataError(f"{raw.source}: no rows in split '{split}'")
    reserved = CONVERSATION_FIELDS | ({prompt_field} if prompt_field else set())
    rows, errors = [], []
    for i, row in enumerate(raw.rows):
        try:
            messages, reference = extract_prompt(row, raw.where(i), prompt_field)
        except DataError as exc:
            errors.append(str(exc))
            continue
        rows.append(PromptRow(messages, {k: v for k, v in row.items() if k not in reserved}, raw.where(i), reference))
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} row(s) without a usable prompt in {raw.source}:\n  "
                        + "\n  ".join(errors[:MAX_REPORTED_ERRORS]) + more)
    return rows, raw.source
