"""A Hugging Face reward model as a `Reward`: a sequence-classification head over the rendered chat.

ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1, the reward of the paper's v0.2 data) has its own model code
(``trust_remote_code``) and returns the preference score as ``output.score``; a plain
``AutoModelForSequenceClassification`` returns ``logits[:, 0]``. Every pair is rendered with the
reward model's chat template: it was trained on that format, not on the policy's.
"""

from __future__ import annotations

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
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:  # batched rows: where each one ends
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def encode(self, item: RewardItem) -> list[int]:
        """Token ids of the pair under the reward model's own chat template (no second BOS)."""
        messages = [*item.prompt, {"role": "assistant", "content": item.response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_length).input_ids

    @torch.no_grad()
    def score(self, items: Sequence[RewardItem]) -> list[Scored]:
        encoded = [self.encode(it) for it in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))  # similar lengths: little padding
        out: list[Scored | None] = [None] * len(items)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: the classification head reads the last real token
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, : len(encoded[i])] = 1
            result = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            values = result.score if getattr(result, "score", None) is not None else result.logits[:, 0]
            for r, i in enumerate(idx):
                out[i] = Scored(float(values[r].reshape(-1)[0]))
        return out

    def close(self) -> None:
        self.model = None
