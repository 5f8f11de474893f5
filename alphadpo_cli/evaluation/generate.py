"""Answer generation for the benchmarks: the preset's decoding, vLLM on a GPU when installed,
batched transformers generation otherwise.

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`) and
tokenised without adding special tokens, with exactly one BOS for models that use one (the
double-BOS trap of the SimPO evaluation reports), by the rule training uses
(`alphadpo_cli.data.uses_document_bos`). Generation stops at EOS, at the chat template's end of
turn (Gemma's <end_of_turn>, Llama-3's <|eot_id|>) or at any of the preset's stop ids
(`stop_token_ids`, the one rule, also used by the sampled KL of `alphadpo eval preference`);
temperature 0 means greedy decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..config import ConfigError
from ..data import uses_document_bos
from ..kernels.cpu import keep_cpu_memory
from .greedy import greedy_decode, left_padded, plain_greedy

DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass
class Decoding:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_token_ids: list = field(default_factory=list)
    batch_size: int = 8
    seed: int = 42

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What changes the answers (batch size does not, apart from numerics)."""
        d = self.to_dict()
        d.pop("batch_size")
        if self.greedy:
            d.pop("seed")
            d.pop("top_p")
        return d


def decoding_for(preset: str | None = None, *, temperature: float | None = None, top_p: float | None = None,
                 max_new_tokens: int | None = None, batch_size: int | None = None, seed: int | None = None,
                 greedy: bool = False) -> tuple[Decoding, str | None, str | None]:
    """(decoding, the preset's model, the preset's chat template). Without a preset: greedy,
    1024 new tokens. `greedy=True` (Arena-Hard) keeps the preset's stop ids and length."""
    dec = Decoding()
    model = chat_template = None
    if preset:
        from ..config import resolve_config

        cfg = resolve_config(preset=preset)
        g = cfg.generation
        dec = Decoding(temperature=float(g.temperature), top_p=float(g.top_p), max_new_tokens=int(g.max_new_tokens),
                       stop_token_ids=[int(i) for i in (g.stop_token_ids or [])])
        model, chat_template = cfg.model.name_or_path, cfg.model.chat_template
    if greedy:
        dec.temperature = 0.0
    if temperature is not None:
        dec.temperature = float(temperature)
    if top_p is not None:
        dec.top_p = float(top_p)
    if max_new_tokens is not None:
        dec.max_new_tokens = int(max_new_tokens)
    if batch_size is not None:
        dec.batch_size = int(batch_size)
    if seed is not None:
        dec.seed = int(seed)
    if dec.temperature < 0 or not 0 < dec.top_p <= 1 or dec.max_new_tokens < 1 or dec.batch_size < 1:
        raise ConfigError(f"invalid decoding settings: {dec.to_dict()} (temperature >= 0, 0 < top_p <= 1, "
                          "max_new_tokens >= 1, batch_size >= 1)")
    return dec, model, chat_template


@dataclass
class Answer:
    text: str
    tokens: int
    finish: str  # "stop" (EOS / stop id) or "length"


def vllm_available() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


# vLLM (0.30, the `vllm` extra; 0.33 alike) serves LoRA adapters up to `max_lora_rank`, 16 by
# default, one of these values
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(adapter: str | Path) -> int:
    """The `max_lora_rank` vLLM needs for an adapter: its rank `r`, rounded up to a value vLLM
    accepts (vLLM refuses an adapter above its default of 16)."""
    path = Path(adapter) / "adapter_config.json"
    try:
        r = int(json.loads(path.read_text()).get("r") or 16)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the adapter's rank 'r' ({exc})") from None
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ConfigError(f"{path}: LoRA rank {r} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}); "
                      "use --backend transformers, or merge the adapter first")


def resolve_backend(backend: str, model: str | None) -> str:
    if backend not in ("auto", "vllm", "transformers"):
        raise ConfigError(f"unknown generation backend '{backend}' (auto, vllm, transformers)")
    if backend == "transformers":
        return backend
    ok = vllm_available()
    if backend == "vllm" and not ok:
        raise ConfigError("--backend vllm needs the vllm package and a CUDA GPU; use --backend transformers")
    from ..models.loading import TINY

    return "vllm" if ok and model != TINY else "transformers"


_ANSWER_MARK = "ALPHADPO_ANSWER_END_PROBE"


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template writes right after an assistant's answer (Gemma's
    <end_of_turn> 107, Llama-3's <|eot_id|> 128009, ChatML's <|im_end|>), found by rendering a
    two-turn chat whose answer is a marker: [] when the template writes no special token there
    (or cannot render the probe)."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _ANSWER_MARK}], tokenize=False)
    except Exception:  # a template with other rules (roles, a system turn): no probe, no extra stop id
        return []
    if not isinstance(text, str) or _ANSWER_MARK not in text:
        return []
    tail = text[text.rindex(_ANSWER_MARK) + len(_ANSWER_MARK):]
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [int(ids[0])] if ids and ids[0] in special else []


def stop_token_ids(tokenizer, extra: Sequence[int] = (), vocab: int | None = None) -> list[int]:
    """The ids that end an answer: EOS, the template's end of turn (`end_of_turn_ids`), and `extra`
    (a preset's or a run's `generation.stop_token_ids`), in that order, without repeats, each
    inside the vocabulary. Generation (`ChatGenerator`) and the sampled KL both stop by it."""
    vocab = len(tokenizer) if vocab is None else vocab
    stops = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer), *extra]
    return [int(i) for i in dict.fromkeys(s for s in stops if s is not None and 0 <= int(s) < vocab)]


def render_prompt(tokenizer, messages: list[dict], *, bos: bool, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of a chat prompt ending in the assistant header; exactly one BOS if `bos`."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if bos:
        b = tokenizer.bos_token_id
        while ids and ids[0] == b:
            ids = ids[1:]
        if max_prompt_tokens is not None and len(ids) + 1 > max_prompt_tokens:
            ids = ids[len(ids) + 1 - max_prompt_tokens:]
        return [b] + ids
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[len(ids) - max_prompt_tokens:]
    return ids


class ChatGenerator:
    """Loads the model once and answers batches of chat prompts."""

    def __init__(self, model: str, adapter: str | None = None, *, decoding: Decoding, backend: str = "auto",
                 dtype: str = "auto", chat_template: str | None = None, device=None, vllm_args: dict | None = None):
        self.model_ref, self.adapter = model, adapter
        self.decoding = decoding
        self.backend = resolve_backend(backend, model)
        self.dtype, self.chat_template, self.device = dtype, chat_template, device
        self.vllm_args = dict(vllm_args or {})  # more vllm.LLM arguments, e.g. gpu_memory_utilization
        self.model = self.tokenizer = self._llm = None
        self._bos = False
        self._stop: list[int] = []

    # -- loading ---------------------------------------------------------------------------------
    def load(self):
        if self.tokenizer is not None:
            return self
        if self.backend == "vllm":  # pragma: no cover - needs a GPU and vllm
            self._load_vllm()
        else:
            from ..models.loading import load_for_inference

            ref, adapter = (self.model_ref, self.adapter) if self.model_ref else (self.adapter, None)
            self.model, self.tokenizer = load_for_inference(ref, adapter, dtype=self.dtype,
                                                            device=self.device, chat_template=self.chat_template)
            if self.model is not None and next(self.model.parameters()).device.type == "cpu":
                # decoding allocates a grown KV cache every step: glibc keeps the freed blocks for the
                # next step instead of faulting in fresh pages (kernels/cpu.py: a third of the faults)
                keep_cpu_memory()
        tok = self.tokenizer
        self._bos = uses_document_bos(tok)  # training's rule: prompts start as in training
        self._stop = stop_token_ids(tok, self.decoding.stop_token_ids)
        return self

    def _load_vllm(self):  # pragma: no cover - needs a GPU and vllm
        from vllm import LLM

        from ..config import ModelConfig
        from ..models.loading import load_tokenizer, model_source

        base, adapter = self.model_ref, self.adapter
        if adapter is None and base and (Path(base) / "adapter_config.json").is_file():
            adapter, base = base, None
        if adapter is not None and not base:
            run_cfg = Path(adapter) / "config.yaml"
            if run_cfg.is_file():
                from ..config import load_config_file

                base = load_config_file(run_cfg).model.name_or_path
            else:
                base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        cfg = ModelConfig(name_or_path=base, chat_template=self.chat_template)
        self.tokenizer = load_tokenizer(cfg)
        self.adapter = adapter
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.dtype, "auto")
        args = dict(model=model_source(cfg), tokenizer=model_source(cfg), dtype=dtype, seed=self.decoding.seed)
        if adapter is not None:
            args.update(enable_lora=True, max_lora_rank=vllm_lora_rank(adapter))
        self._llm = LLM(**{**args, **self.vllm_args})

    def close(self):
        """Free the model (a later call loads it again); on a GPU, its memory too."""
        had_llm = self._llm is not None
        self.model = self._llm = self.tokenizer = None
        if had_llm:  # pragma: no cover - GPU only: vLLM holds its memory until told otherwise
            import contextlib
            import gc

            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import destroy_model_parallel

                destroy_model_parallel()
            gc.collect()
            with contextlib.suppress(Exception):
                import torch

                torch.cuda.empty_cache()

    # -- generation ------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        self.load()
        return render_prompt(self.tokenizer, messages, bos=self._bos)

    def generate(self, batch: Sequence[list[dict]], seed_key: str = "") -> list[Answer]:
        """One answer per prompt."""
        self.load()
        prompts = [self.prompt_ids(m) for m in batch]
        if self.backend == "vllm":  # pragma: no cover
            return [a[0] for a in self._generate_vllm(prompts)]
        return self._generate_hf(prompts, seed_key)

    def sample(self, batch: Sequence[list[dict]], n: int, seed_key: str = "") -> list[list[Answer]]:
        """`n` answers per prompt (the on-policy data builder's samples), seeded by (seed, `seed_key`):
        vLLM's `SamplingParams(n=...)` with a seed per prompt, or transformers with each prompt
        repeated `n` times in one batch."""
        if n < 1:
            raise ConfigError(f"the number of samples per prompt must be >= 1, got {n}")
        self.load()
        prompts = [self.prompt_ids(m) for m in batch]
        if self.backend == "vllm":  # pragma: no cover - GPU only
            seeds = [self._seed(f"{seed_key}:{i}") for i in range(len(prompts))]
            return self._generate_vllm(prompts, n=n, seeds=seeds)
        flat = self._generate_hf([p for p in prompts for _ in range(n)], seed_key)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _seed(self, key: str) -> int:
        return int(hashlib.sha256(f"{self.decoding.seed}:{key}".encode()).hexdigest()[:8], 16)

    def _finish(self, ids: list[int], stopped: bool = False) -> Answer:
        stop = set(self._stop)
        cut = next((i for i, t in enumerate(ids) if t in stop), None)
        finish = "stop" if cut is not None or stopped else "length"
        ids = ids if cut is None else ids[:cut]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Answer(text=text, tokens=len(ids), finish=finish)

    def _generate_hf(self, prompts: list[list[int]], seed_key: str) -> list[Answer]:
        import torch
        from transformers import GenerationConfig

        tok, d = self.tokenizer, self.decoding
        pad = tok.pad_token_id if tok.pad_token_id is not None else self._stop[0]
        if d.greedy and plain_greedy(self.model):  # finished answers leave the batch (greedy.py: generate's answers)
            answers = greedy_decode(self.model, prompts, max_new_tokens=d.max_new_tokens, stop_ids=self._stop,
                                    pad_id=pad)
            return [self._finish(a) for a in answers]
        ids, mask = left_padded(prompts, pad)
        width = ids.shape[1]
        device = next(self.model.parameters()).device
        kwargs = dict(max_new_tokens=d.max_new_tokens, eos_token_id=self._stop, pad_token_id=pad)
        if d.greedy:
            gc = GenerationConfig(do_sample=False, **kwargs)
        else:
            gc = GenerationConfig(do_sample=True, temperature=d.temperature, top_p=d.top_p, top_k=0, **kwargs)
        seed = self._seed(seed_key)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
        return [self._finish(row[width:].tolist()) for row in out.cpu()]

    def _generate_vllm(self, prompts: list[list[int]], n: int = 1,
                       seeds: list[int] | None = None) -> list[list[Answer]]:  # pragma: no cover - GPU only
        """`n` answers per prompt; one seed for all prompts (the evaluations) or one per prompt."""
        from vllm import SamplingParams

        d = self.decoding

        def params(seed: int):
            return SamplingParams(n=n, temperature=d.temperature, top_p=d.top_p if not d.greedy else 1.0,
                                  max_tokens=d.max_new_tokens, stop_token_ids=self._stop, seed=seed)

        sampling = params(d.seed) if seeds is None else [params(s) for s in seeds]
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, str(self.adapter))
        outs = self._llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, lora_request=lora,
                                  use_tqdm=False)
        return [[self._finish(list(c.token_ids), stopped=c.finish_reason == "stop") for c in o.outputs]
                for o in outs]


def reuse_generations(out_path: Path, meta_path: Path, identity: dict, overwrite: bool) -> dict | None:
    """Earlier answers in `out_path` are reused only if `meta_path` (generation.json) records the
    same identity (model, adapter, decoding, template): `artefacts.claim_identity`, which refuses
    another identity listing the changes, and with `overwrite` deletes both. Returns the recorded
    metadata (None when there is none yet); `save_generations` records it."""
    from ..artefacts import claim_identity

    return claim_identity(meta_path, identity, overwrite=overwrite, artefacts=[out_path], kind="generated answers",
                          hint="pass --overwrite to generate again, or choose another --output-dir")


def save_generations(meta_path: Path, identity: dict, decoding: Decoding, backend: str, **extra) -> None:
    """Record what made the answers next to them (generation.json): the identity, the decoding,
    the backend, and `extra` (e.g. per-answer token counts)."""
    from ..artefacts import save_identity

    save_identity(meta_path, identity, decoding=decoding.to_dict(), backend=backend, **extra)


def generate_missing(gen: ChatGenerator, items: list[tuple[str, list[dict]]], on_batch: Callable[[list[tuple[str, Answer]]], None],
                     *, advance: Callable[[int], None] | None = None) -> None:
    """Answer every (key, messages) item, longest prompts first, calling `on_batch` after each batch
    so the caller can persist it (an interruption loses at most one batch)."""
    if not items:
        return
    gen.load()
    lengths = {k: len(gen.prompt_ids(m)) for k, m in items}
    order = sorted(items, key=lambda kv: -lengths[kv[0]])
    bs = gen.decoding.batch_size if gen.backend == "transformers" else max(gen.decoding.batch_size, 64)
    for start in range(0, len(order), bs):
        chunk = order[start:start + bs]
        answers = gen.generate([m for _, m in chunk], seed_key=chunk[0][0])
        on_batch([(k, a) for (k, _), a in zip(chunk, answers)])
        if advance is not None:
            advance(len(chunk))
