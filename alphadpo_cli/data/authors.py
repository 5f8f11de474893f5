"""`data.pipeline: authors`: the α-DPO authors' tokenisation (their TRL-0.8.6 `tokenize_row`)
reproduced exactly, on this project's row format (`tokenize_authors`).

1. Texts from `authors_texts`. 2. Each response's ids from `_answer_ids` (tokenised after the
prompt text, no special tokens added). 3. BOS id put before the prompt unless it starts with it;
EOS id appended to a response that does not end with it (no stripping of a trailing newline:
ChatML responses end `<|im_end|>\\n<|im_end|>`, as theirs do). 4. With the BOS in place and
`longer` the longer response (computed once): if prompt + longer > max_length, the prompt keeps
its last max_prompt_length ids (a cut prompt loses its BOS); if prompt + longer is then still >
max_length, both responses are cut to max_length - max_prompt_length ids. Prompt ids are masked
and every response id (assistant header and EOS included) trained, as the collators do for every
row.

TRL tokenises chosen and rejected each after its own copy of the prompt and trains them on those;
this format has one prompt for both. They agree unless a tokenizer merge across the
prompt/response boundary takes the prompt's last token into one response and not the other. Such
a row raises DataError naming it: no shared prompt reproduces it (the extra token would be
trained in one response, or missing from the other), and an exact-reproduction mode should not
silently deviate. TRL itself refuses rows whose prompts differ in more than that.

Differences that cannot be reproduced: a tokenizer without a BOS token gets none (TRL would put
None); rows with a `prompt` column of messages and multi-message responses are reduced to
(prompt + chosen[:-1], last chosen message, last rejected message) like conversational rows. Only
keep_end truncation (the authors' setting; the config refuses drop and error).

The functions take the `PairTokenizer` (`pt`) that holds the tokenizer, the settings and the
BOS/EOS ids.
"""

from __future__ import annotations

from .errors import DataError
from .pairs import Pair


def authors_texts(tok, pair: Pair) -> tuple[str, str, str]:
    """Prompt, chosen and rejected text as the authors' `apply_chat_template(task="simpo")`
    makes them (the default pipeline keeps its own in `tokenization.render`).

    The prompt is every message but the last of the chosen conversation, with an empty system
    message put first when it has none and the template mentions "system" or "<|im_start|>"
    (alignment-handbook's maybe_insert_system_message). Each response is its last message
    rendered on its own, less a leading BOS string; nothing else is removed (a template's
    default system prompt or trailing newline stays in the response, as it does for them).
    """
    prompt = [dict(m) for m in pair.prompt + pair.chosen[:-1]]
    template = tok.get_chat_template() if tok.chat_template is not None else ""
    if prompt[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        prompt.insert(0, {"role": "system", "content": ""})
    texts = [tok.apply_chat_template(prompt, tokenize=False)]
    for response in (pair.chosen, pair.rejected):
        text = tok.apply_chat_template(response[-1:], tokenize=False)
        if tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]
        texts.append(text)
    return texts[0], texts[1], texts[2]


def _answer_ids(pt, prompt: str, answer: str, where: str) -> tuple[list[int], list[int]]:
    """TRL 0.8.6 `build_tokenized_answer`: prompt and answer ids cut from enc(prompt + answer),
    the cut one token earlier when enc(prompt) is not a prefix of it (a merge at the boundary)."""
    full = pt.encode(prompt + answer)
    alone = pt.encode(prompt)
    if len(full) < len(alone):
        raise DataError(f"{where}: the prompt alone tokenises longer than prompt + response")
    start = len(alone)
    if full[:start] != alone:
        start -= 1
    return full[:start], full[start:]


def _shared_prompt_ids(pt, pair: Pair, where: str) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected ids as TRL cuts them; a row whose two prompts tokenise
    differently is refused (one shared prompt cannot reproduce it)."""
    prompt_text, chosen_text, rejected_text = authors_texts(pt.tok, pair)
    chosen_prompt, chosen = _answer_ids(pt, prompt_text, chosen_text, where)
    rejected_prompt, rejected = _answer_ids(pt, prompt_text, rejected_text, where)
    if chosen_prompt != rejected_prompt:
        n_c, n_r = len(chosen_prompt), len(rejected_prompt)
        refused = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt)) > 1 or abs(n_c - n_r) > 1
        raise DataError(
            f"{where}: with data.pipeline=authors, the chosen and rejected prompts tokenise differently "
            f"({n_c} vs {n_r} tokens: the tokenizer merges the end of the prompt with the start of a "
            f"response){' and TRL 0.8.6 itself refuses the row' if refused else ''}; one shared prompt "
            "cannot reproduce that. Remove the row or use data.pipeline=default."
        )
    return chosen_prompt, chosen, rejected


def tokenize_authors(pt, pair: Pair, where: str | None = None) -> dict:
    """`data.pipeline: authors`: one pair's ids as the authors' code makes them (module docstring)."""
    s = pt.settings
    where = where or f"the row whose prompt ends {pair.prompt[-1]['content'][-40:]!r}"
    prompt, chosen, rejected = _shared_prompt_ids(pt, pair, where)
    if pt.bos is not None and (not prompt or prompt[0] != pt.bos):
        prompt = [pt.bos] + prompt
    chosen, rejected = [ids if ids and ids[-1] == pt.eos else ids + [pt.eos] for ids in (chosen, rejected)]
    longer = max(len(chosen), len(rejected))
    prompt_truncated = response_truncated = False
    if len(prompt) + longer > s.max_length:
        cut = prompt[-s.max_prompt_length:]
        prompt_truncated, prompt = len(cut) < len(prompt), cut
    if len(prompt) + longer > s.max_length:
        keep = s.max_length - s.max_prompt_length
        response_truncated = len(chosen) > keep or len(rejected) > keep
        chosen, rejected = chosen[:keep], rejected[:keep]
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "prompt_truncated": prompt_truncated,
        "response_truncated": response_truncated,
    }
