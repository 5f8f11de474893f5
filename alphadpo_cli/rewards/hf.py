"""A Hugging Face reward model as a `Reward`: a sequence-classification head over the rendered chat.

ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1, the reward of the paper's v0.2 data) has its own model code
(``trust_remote_code``) and returns the preference score as ``output.score``; a plain
``AutoModelForSequenceClassification`` returns ``logits[:, 0]``. Every pair is rendered with the
reward model's chat template: it was trained on that format, not on the policy's.

Batching must not change a score: each pair scores as it would alone, unpadded, with the model's
config as shipped. The heads find the token they read by the pad id, not by the attention mask
(transformers' heads read the rightmost token that is not the pad id; ArmoRM's code the token
before the first pad id), so the rows are right-padded with:

* the model's own ``pad_token_id`` when its config has one (both rules then read what they read
  alone);
* otherwise an id that occurs in no row of the batch (the tokenizer's pad, EOS or UNK token when
  absent, else the highest unused id), set as the config's pad id for that batch. Padding with EOS,
  the usual fallback, would move ArmoRM's read to the first end of turn (the user's) and
  transformers' to before a final EOS.

The heads read the last token, so an input longer than ``max_length`` keeps its end: the
conversation is cut from the left (after a leading BOS, which stays), keeping the end of the answer
and the template's final tokens (cutting from the right, the head would read a token in the middle
of the answer). Such items are marked ``cut``; the callers count and report them. An item whose
score comes out NaN or infinite is marked ``failed`` (its score unusable): the callers leave it
out and count it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import ConfigError, ModelConfig
from ..models.loading import model_source, quiet_libraries, resolve_dtype
from .base import Reward, RewardItem, Scored


class HFRewardModel(Reward):
    def __init__(self, name_or_path: str, *, device=None, dtype: str = "auto", batch_size: int = 8,
                 max_length: int = 4096, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_libraries()
        self.name = name_or_path
        self.batch_size, self.max_length = max(1, int(batch_size)), int(max_length)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        source = model_source(ModelConfig(name_or_path=name_or_path))
        self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"reward model {name_or_path}: its tokenizer has no chat template to render the pairs")
        torch_dtype = resolve_dtype(dtype)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self._configs = list({id(c): c for c in (self.model.config, self.model.config.get_text_config())}.values())
        self._shipped_pad = getattr(self._configs[-1], "pad_token_id", None)
        embeddings = self.model.get_input_embeddings()
        self._vocab = getattr(embeddings, "num_embeddings", None) or len(self.tokenizer)

    def _pad_id(self, rows: Sequence[list[int]]) -> int:
        """The id the rows are padded with (see the module docstring)."""
        if self._shipped_pad is not None:
            return int(self._shipped_pad)
        used = set().union(*map(set, rows))
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if cand is not None and 0 <= cand < self._vocab and cand not in used:
                return int(cand)
        return next(i for i in range(self._vocab - 1, -1, -1) if i not in used)

    def encode(self, item: RewardItem) -> list[int]:
        """Token ids of the pair under the reward model's own chat template (no second BOS), at most
        `max_length` of them: a longer input keeps its leading BOS and its last ids (`_encode`)."""
        return self._encode(item)[0]

    def _encode(self, item: RewardItem) -> tuple[list[int], bool]:
        """(ids, whether the input was cut): see `encode`."""
        messages = [*item.prompt, {"role": "assistant", "content": item.response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= self.max_length:
            return ids, False
        bos = self.tokenizer.bos_token_id
        head = ids[:1] if bos is not None and ids[0] == bos and self.max_length > 1 else []
        return head + ids[len(ids) - (self.max_length - len(head)):], True

    @torch.no_grad()
    def score(self, items: Sequence[RewardItem]) -> list[Scored]:
        encoded, cut = zip(*(self._encode(it) for it in items)) if items else ((), ())
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))  # similar lengths: little padding
        out: list[Scored | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            pad = self._pad_id([encoded[i] for i in idx])
            if self._shipped_pad is None:
                for cfg in self._configs:  # the heads read the pad id from the config
                    cfg.pad_token_id = pad
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: the classification head reads the last real token
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, : len(encoded[i])] = 1
            result = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            values = result.score if getattr(result, "score", None) is not None else result.logits[:, 0]
            for r, i in enumerate(idx):
                value = float(values[r].reshape(-1)[0])
                failed = None if math.isfinite(value) else f"the reward model's output is {value}"
                out[i] = Scored(value, cut=cut[i], failed=failed)
        return out

    def close(self) -> None:
        self.model = None
