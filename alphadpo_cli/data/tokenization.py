"""Templating and tokenisation: message pairs to token ids.

Two algorithms, one per `data.pipeline`, chosen from `PIPELINES` ({name: function}):

* `default` (`tokenize_default`): this project's. The prompt is rendered on its own and each
  response is what the template adds after it (so the assistant header and EOS are response
  tokens), with exactly one document BOS on the prompt (`uses_document_bos`) and EOS appended to
  a response that lacks it; a prompt over `max_prompt_length` keeps its end (or the row is dropped
  or refused, `truncation`), then responses are cut to what is left of `max_length`.
* `authors` (`authors.tokenize_authors`): the α-DPO authors' own (their TRL 0.8.6), exactly.

`PairTokenizer(tokenizer, settings)` checks the settings and the tokenizer once; calling it on a
`Pair` runs the pipeline the settings name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import ConfigError
from .authors import tokenize_authors
from .errors import DataError
from .pairs import Pair


def uses_document_bos(tokenizer) -> bool:
    """Whether this model's sequences start with a document BOS: the one BOS rule, shared by
    training (`PairTokenizer`) and generation (`evaluation.generate`).

    A document BOS (Llama-3's <|begin_of_text|>, Gemma's and Mistral's <bos>/<s>) marks the start
    of a document, so it goes exactly once, first in the prompt, and never inside a response:
    Llama-3's template writes it and its tokenizer adds it again (the double-BOS trap the SimPO
    evaluation reports), and a response rendered after the prompt must not start a new document.
    It is one when the tokenizer adds it itself, or when the chat template writes it at the start
    and nowhere else. Some tokenizers name a per-turn marker as BOS (SmolLM2: <|im_start|>): the
    template writes it at every turn, so it is part of the text, left where the template puts it,
    and a truncated prompt does not get it back in front. No BOS token: nothing to do.
    """
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
    )
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if tokenizer("x").input_ids[:1] == [bos]:  # the tokenizer adds it itself
        return True
    bos_text = tokenizer.bos_token or "\0"
    rest = probe
    while rest.startswith(bos_text):
        rest = rest[len(bos_text):]
    return rest != probe and bos_text not in rest  # the template writes it first, and only there


@dataclass
class TokenizeSettings:
    max_length: int
    max_prompt_length: int
    truncation: str = "keep_end"
    # "default": this project's tokenisation; "authors": the α-DPO authors' (TRL 0.8.6), see
    # data/authors.py. Part of the tokenised-cache key like every field here.
    pipeline: str = "default"


def render(tok, prompt: list[dict], response: list[dict]) -> tuple[str, str]:
    """The default pipeline's texts: the prompt rendered on its own, and what the template adds
    after it for the response (the response rendered alone, less a leading BOS, when the template
    rewrites earlier turns); a response ending "<eos>\\n" ends at the EOS."""
    prompt_text = tok.apply_chat_template(prompt, tokenize=False)
    full_text = tok.apply_chat_template(prompt + response, tokenize=False)
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text):]
    else:  # a template that rewrites earlier turns: render the response on its own
        response_text = tok.apply_chat_template(response, tokenize=False)
        if tok.bos_token and response_text.startswith(tok.bos_token):
            response_text = response_text[len(tok.bos_token):]
    # "<eos>\n" at the end of a turn: the EOS is the last token we train on.
    stripped = response_text.rstrip()
    if tok.eos_token and stripped.endswith(tok.eos_token):
        response_text = stripped
    return prompt_text, response_text


def _default_ids(pt: "PairTokenizer", pair: Pair) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected ids before truncation: one document BOS first in the prompt and
    none in a response, EOS last in each response."""
    prompt_text, chosen_text = render(pt.tok, pair.prompt, pair.chosen)
    _, rejected_text = render(pt.tok, pair.prompt, pair.rejected)
    prompt = pt.encode(prompt_text)
    if pt.uses_bos:
        while prompt and prompt[0] == pt.bos:
            prompt = prompt[1:]
        prompt = [pt.bos] + prompt
    responses = []
    for text in (chosen_text, rejected_text):
        ids = pt.encode(text)
        while pt.uses_bos and ids and ids[0] == pt.bos:
            ids = ids[1:]
        if not ids or ids[-1] != pt.eos:
            ids = ids + [pt.eos]
        responses.append(ids)
    return prompt, responses[0], responses[1]


def tokenize_default(pt: "PairTokenizer", pair: Pair, where: str | None = None) -> dict:
    """`data.pipeline: default`: this project's tokenisation of one pair (see the module docstring).
    A prompt too long for `truncation` other than keep_end gives {"_too_long": True, "prompt_len": n}."""
    s = pt.settings
    prompt, chosen, rejected = _default_ids(pt, pair)
    prompt_truncated = response_truncated = False
    if len(prompt) > s.max_prompt_length and len(prompt) + max(len(chosen), len(rejected)) > s.max_length:
        if s.truncation != "keep_end":
            return {"_too_long": True, "prompt_len": len(prompt)}
        keep = s.max_prompt_length - (1 if pt.uses_bos else 0)
        prompt = ([pt.bos] if pt.uses_bos else []) + prompt[len(prompt) - keep:]
        prompt_truncated = True
    budget = s.max_length - len(prompt)
    if len(chosen) > budget or len(rejected) > budget:
        chosen, rejected = chosen[:budget], rejected[:budget]
        response_truncated = True
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "prompt_truncated": prompt_truncated,
        "response_truncated": response_truncated,
    }


#: `data.pipeline` -> the function that tokenises one pair: (PairTokenizer, Pair, where) -> ids.
PIPELINES: dict[str, Callable[..., dict]] = {"default": tokenize_default, "authors": tokenize_authors}


class PairTokenizer:
    """Turns message pairs into token ids with the pipeline `settings.pipeline` names (`PIPELINES`)."""

    def __init__(self, tokenizer, settings: TokenizeSettings):
        if settings.pipeline not in PIPELINES:
            raise ConfigError(f"data.pipeline must be {' or '.join(PIPELINES)}, not '{settings.pipeline}'")
        if settings.pipeline == "authors" and settings.truncation != "keep_end":
            raise ConfigError(
                f"data.truncation={settings.truncation} is not available with data.pipeline=authors: the "
                "authors' pipeline always truncates (keep_end)"
            )
        self.tok = tokenizer
        self.settings = settings
        self.pipeline = PIPELINES[settings.pipeline]
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no EOS token; set one before training")
        self.uses_bos = uses_document_bos(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def __call__(self, pair: Pair, where: str | None = None) -> dict:
        """One pair's token ids; `where` (e.g. "train.jsonl, row 3") only names the row in errors."""
        return self.pipeline(self, pair, where)
