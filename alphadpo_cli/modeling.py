"""Loading the policy, its reference and tokenizer.

LoRA and QLoRA runs keep one copy of the weights: the reference is the same model with its
adapters disabled. Full fine-tuning loads a separate frozen reference (or none at all when the
reference log-probs are precomputed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, LoraConfig, ModelConfig

TINY = "tiny-random"

# ChatML, the template of SmolLM2 and of the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma-2's template as the α-DPO authors set it (training_configs/gemma-2-9b-it-alpha-dpo.yaml):
# a system message is trimmed, followed by a blank line and merged into the first message, the
# assistant's role is called model, and every turn's content is trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set content = (system + message['content']) if loop.first else message['content'] %}"
    "{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral-Instruct's template as the α-DPO authors install it (MISTRAL_CHAT_TEMPLATE in their
# scripts/run_alpha_dpo.py): a system message is stripped, followed by a blank line and merged into
# the first message; user turns are `[INST] text [/INST]`, assistant turns ` text </s>`, contents
# stripped. No BOS in the text (the tokenisation adds it) and no generation prompt (the model
# continues after `[/INST]`).
MISTRAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set content = (system + message['content']) if loop.first else message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "mistral": MISTRAL_TEMPLATE}


def quiet_libraries() -> None:
    """Silence import-time chatter that would bury our own messages."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else deepspeed warns on import
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    # Deprecation notices from inside transformers/peft are for us, not for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def resolve_dtype(name: str) -> torch.dtype:
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 weights halve
    memory and run the step about 2x faster than float32; elsewhere bf16 is emulated and slower.

    ALPHADPO_CPU_BF16=0/1 overrides the detection.
    """
    forced = os.environ.get("ALPHADPO_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# tiny random model (tests and smoke runs; no files, no hub)


def build_tiny_tokenizer():
    """A byte-level tokenizer with ChatML special tokens, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_hidden_size * 2,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=max(1, cfg.tiny_heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# ---------------------------------------------------------------------------------------------
# tokenizer


def model_source(cfg: ModelConfig) -> str:
    """Where from_pretrained should look (converting GGUF files once, see sources.py)."""
    if cfg.name_or_path == TINY:
        return TINY
    from .sources import resolve_model_source

    try:
        return resolve_model_source(cfg.name_or_path, check_hub=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_tokenizer(cfg: ModelConfig):
    if cfg.name_or_path == TINY and not cfg.tokenizer:
        tok = build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        src = cfg.tokenizer or model_source(cfg)
        if cfg.tokenizer:
            from .sources import resolve_model_source

            src = resolve_model_source(cfg.tokenizer, check_hub=True)
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
        except OSError as exc:
            raise ConfigError(
                f"could not load the tokenizer of '{cfg.tokenizer or cfg.name_or_path}': {exc}. "
                "Pass a local directory or a hub id that is reachable (set HF_HUB_OFFLINE=0 if needed)."
            ) from None
    if cfg.chat_template:
        tok.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    if tok.chat_template is None:
        raise ConfigError(
            f"the tokenizer of '{cfg.name_or_path}' has no chat template; set model.chat_template "
            "(chatml, gemma, mistral, or a Jinja string)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------
# models


@dataclass
class LoadedModels:
    """The trainable policy and, when it is a separate network, the frozen reference."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: object
    # True when the reference is the policy with adapters disabled.
    reference_is_adapter_disabled: bool
    fingerprint: str


def _load_base(cfg: ModelConfig, tokenizer, dtype: torch.dtype, quantize_4bit: bool = False, seed: int = 0):
    if cfg.name_or_path == TINY:
        return build_tiny_model(cfg, vocab_size=len(tokenizer), seed=seed).to(dtype)
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        return AutoModelForCausalLM.from_pretrained(model_source(cfg), **kwargs)
    except OSError as exc:
        raise ConfigError(f"could not load model '{cfg.name_or_path}': {exc}") from None


def model_fingerprint(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> str:
    """Identity of the reference weights, for cache keys: path plus the files' sizes and mtimes."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.name_or_path, str(dtype), cfg.attn_implementation], sort_keys=True).encode())
    if cfg.name_or_path == TINY:
        h.update(json.dumps([cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed]).encode())
    else:
        src = model_source(cfg)
        p = Path(src)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model"):
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            h.update(src.encode())
    return h.hexdigest()[:16]


def _apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def load_models(cfg: ModelConfig, lora: LoraConfig, *, need_reference_model: bool, seed: int = 0) -> LoadedModels:
    """Build the policy (and a reference network only when one is needed and not shared)."""
    quiet_libraries()
    dtype = resolve_dtype(cfg.dtype)
    if cfg.mode == "qlora" and not torch.cuda.is_available():
        raise ConfigError(
            "QLoRA needs a CUDA GPU: bitsandbytes 4-bit NF4 weights are not supported on this machine. "
            "Use --mode lora (the default on CPU) or run on a machine with an NVIDIA GPU."
        )
    tokenizer = load_tokenizer(cfg)
    base = _load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    reference = None
    if cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.mode in ("lora", "qlora"):
        policy = _apply_lora(base, lora)
    else:
        policy = base
        if need_reference_model:
            reference = _load_base(cfg, tokenizer, dtype, seed=seed)
            freeze(reference)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.mode != "full" and hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()
    policy.config.use_cache = False
    return LoadedModels(
        policy=policy,
        reference=reference,
        tokenizer=tokenizer,
        reference_is_adapter_disabled=cfg.mode in ("lora", "qlora"),
        fingerprint=model_fingerprint(cfg, dtype, seed),
    )


def load_reference_only(cfg: ModelConfig, seed: int = 0):
    """The frozen initial model, for precomputing reference log-probs before training."""
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    model = _load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    freeze(model)
    return model


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


@contextlib.contextmanager
def reference_mode(policy, reference=None) -> Iterator[torch.nn.Module]:
    """Yield the network that computes reference log-probs: the separate copy, or the policy with
    its adapters disabled (no second copy of the weights)."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise RuntimeError("no reference: the policy has no adapters and no reference model was loaded")
    was_training = policy.training
    policy.eval()  # no dropout in the reference pass
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(was_training)


def _adapter_base_name(adapter_dir: Path) -> str | None:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    return json.loads(cfg_file.read_text()).get("base_model_name_or_path")


def load_for_inference(
    model: str,
    adapter: str | None = None,
    *,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    chat_template: str | None = None,
    tiny_seed: int = 0,
):
    """(model, tokenizer) for generation and scoring: a base plus an optional LoRA adapter.

    `model` may also be a training output directory holding an adapter and its config.
    """
    quiet_libraries()
    mpath = Path(model)
    if adapter is None and (mpath / "adapter_config.json").is_file():
        adapter, model = str(mpath), None  # a LoRA output dir: base recorded in its config
    cfg = ModelConfig(name_or_path=model or "", dtype=dtype, chat_template=chat_template)
    if adapter is not None:
        adir = Path(adapter)
        if not (adir / "adapter_config.json").is_file():
            raise ConfigError(f"adapter directory {adir} has no adapter_config.json")
        run_cfg = adir / "config.yaml"
        if run_cfg.is_file():
            from .config import load_config_file

            trained = load_config_file(run_cfg).model
            if not model:
                cfg = trained
                cfg.dtype = dtype
            elif trained.name_or_path != model:
                raise ConfigError(
                    f"adapter {adir} was trained on base model '{trained.name_or_path}', "
                    f"not '{model}'. Pass --model {trained.name_or_path} (or omit --model)."
                )
            if chat_template:
                cfg.chat_template = chat_template
        elif not model:
            base = _adapter_base_name(adir)
            if not base:
                raise ConfigError(f"adapter {adir}: cannot tell its base model; pass --model")
            cfg.name_or_path = base
    tokenizer = load_tokenizer(cfg)
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() and cfg.name_or_path == TINY:
        tokenizer = load_tokenizer(cfg)
    net = _load_base(cfg, tokenizer, resolve_dtype(cfg.dtype), seed=tiny_seed)
    if adapter is not None:
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(net, adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"adapter {adapter} does not fit base model '{cfg.name_or_path}': {str(exc).splitlines()[0]}"
            ) from None
    net.to(device or default_device())
    freeze(net)
    return net, tokenizer
