"""Loading the policy, its reference and tokenizer.

LoRA and QLoRA runs keep one copy of the weights: the reference is the same model with its
adapters disabled. Full fine-tuning loads a separate frozen reference (or none at all when the
reference log-probs are precomputed).

QLoRA: the base is quantised by bitsandbytes to 4-bit NF4 with double quantisation and prepared by
peft's `prepare_model_for_kbit_training` (its other weights in float32), on a GPU or on a CPU
(bitsandbytes >= 0.46 has CPU 4-bit kernels). The 4-bit matmuls compute in the model dtype on a GPU;
on a CPU in bf16 where it multiplies bf16 natively (`cpu_has_native_bf16`), else in float32. The
reference is that 4-bit base with the adapters disabled; `merged_model` writes the adapters merged
into the dequantised base.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, LoraConfig, ModelConfig
from ..hardware import cpu_has_native_bf16  # (the one CPU detection; re-exported here)
from .templates import CHAT_TEMPLATES, CHATML_TEMPLATE

TINY = "tiny-random"

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


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int = 0, attn_implementation: str | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = LlamaConfig(
        **extra,
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
    """Where from_pretrained should look (converting GGUF files once, see alphadpo_cli/models/sources.py)."""
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


_NOTICES: set[str] = set()


def notice(message: str) -> None:
    """Print `message` on stderr once per process (and only on the main process of a launched job)."""
    if message in _NOTICES:
        return
    _NOTICES.add(message)
    if os.environ.get("RANK", "0") not in ("", "0"):
        return
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]notice:[/] {message}", highlight=False, soft_wrap=True)


FLASH_ATTENTION = {"flash_attention_2": ("flash_attn", "is_flash_attn_2_available"),
                   "flash_attention_3": ("flash_attn_3", "is_flash_attn_3_available")}


def resolve_attn_implementation(requested: str | None, dtype: torch.dtype | None = None) -> str | None:
    """The attention implementation to load the model with: `requested`, except FlashAttention where it
    cannot run (no CUDA GPU, the flash-attn package missing, float32 weights), which falls back to
    PyTorch's SDPA with one notice. Packed batches use alphadpo's segment attention either way."""
    if requested not in FLASH_ATTENTION:
        return requested
    package, probe = FLASH_ATTENTION[requested]
    if not torch.cuda.is_available():
        reason = "there is no CUDA GPU here"
    elif dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        reason = f"FlashAttention computes in bf16/fp16, not {str(dtype).replace('torch.', '')}"
    else:
        import transformers.utils as hf_utils

        reason = None if getattr(hf_utils, probe, lambda: False)() else f"the {package} package is not installed"
    if reason is None:
        return requested
    notice(f"model.attn_implementation={requested}: {reason}; using sdpa (PyTorch scaled-dot-product attention) "
           "instead. Packed training batches use alphadpo's own segment attention either way.")
    return "sdpa"


def quantization_device() -> torch.device:
    """Where a 4-bit model is loaded: this process's GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def qlora_compute_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The dtype the 4-bit matmuls compute in: the model dtype on a GPU; on a CPU bf16 where the CPU
    multiplies bf16 natively and bf16/fp16 is asked for, else float32 (emulated bf16 is slower)."""
    device = device or quantization_device()
    if device.type != "cpu":
        return dtype
    if dtype in (torch.bfloat16, torch.float16):
        if cpu_has_native_bf16():
            return torch.bfloat16
        notice("QLoRA on this CPU: the 4-bit matmuls compute in float32 (it has no native bf16; "
               "ALPHADPO_CPU_BF16=1 forces bf16)")
    return torch.float32


_4BIT_CHECKED: set[tuple[str, str]] = set()


def check_4bit_support(device: torch.device, compute: torch.dtype) -> None:
    """Refuse QLoRA, saying why, only where bitsandbytes cannot quantise to 4-bit NF4 on `device`
    (a round trip of a small matrix is the test, so what works is never refused)."""
    key = (str(device), str(compute))
    if key in _4BIT_CHECKED:
        return
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:
        raise ConfigError(
            f"--mode qlora needs bitsandbytes, which cannot be imported here ({exc}). Install it "
            "(pip install bitsandbytes) or use --mode lora."
        ) from None
    try:
        w = torch.randn(64, 64, device=device, dtype=compute)
        q, state = bnb_f.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        back = bnb_f.dequantize_4bit(q, state)
        if back.shape != w.shape or not torch.isfinite(back).all():
            raise RuntimeError("the NF4 round trip returned wrong values")
    except Exception as exc:  # noqa: BLE001 - any failure means: no 4-bit here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"QLoRA cannot run on this machine: bitsandbytes {getattr(bnb, '__version__', '?')} has no working "
            f"4-bit NF4 kernels for {device.type} ({str(compute).replace('torch.', '')}): {first}. "
            "Use --mode lora, or a machine where bitsandbytes supports 4-bit weights (CUDA, or a CPU with "
            "bitsandbytes >= 0.46)."
        ) from None
    _4BIT_CHECKED.add(key)


def bnb_4bit_config(compute: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def is_4bit(model: torch.nn.Module) -> bool:
    """Whether `model` (possibly inside peft) holds bitsandbytes 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def _load_base(cfg: ModelConfig, tokenizer, dtype: torch.dtype, quantize_4bit: bool = False, seed: int = 0):
    """The base network in `dtype`; with `quantize_4bit`, 4-bit NF4 (bitsandbytes) on `quantization_device()`."""
    attn = resolve_attn_implementation(cfg.attn_implementation, dtype)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    if quantize_4bit:
        device = quantization_device()
        compute = qlora_compute_dtype(dtype, device)
        check_4bit_support(device, compute)
        # loaded in the compute dtype: the weights are quantised from it, and the others end in float32
        # anyway (`_prepare_4bit`), so nothing is rounded to bf16 on the way when the 4-bit layers compute in float32
        kwargs.update(dtype=compute, quantization_config=bnb_4bit_config(compute), device_map={"": device})
    if cfg.name_or_path == TINY:
        model = build_tiny_model(cfg, vocab_size=len(tokenizer), seed=seed, attn_implementation=attn)
        if not quantize_4bit:
            return model.to(dtype)
        import tempfile

        from transformers import AutoModelForCausalLM

        # bitsandbytes quantises while transformers loads weights: the in-memory model goes through a
        # temporary checkpoint (a few hundred kB), exactly as a real model on disk would.
        with tempfile.TemporaryDirectory(prefix="alphadpo-tiny-") as tmp:
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
        model.name_or_path = model.config._name_or_path = ""  # as in memory: not the deleted temporary dir
        return _keep_4bit_layout(model)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_source(cfg), **kwargs)
    except OSError as exc:
        raise ConfigError(f"could not load model '{cfg.name_or_path}': {exc}") from None
    return _keep_4bit_layout(model) if quantize_4bit else model


def _keep_4bit_layout(model):
    """Switch off bitsandbytes' CPU inference repacking of 4-bit weights.

    On a CPU with AVX512-BF16, a `Linear4bit` called in eval mode without gradient rewrites its weight in
    place into a CPU-only layout, with the double-quantised absmax turned into bf16 (other numbers), and
    every later call, training ones included, goes through `gemv_4bit`, which has no autograd formula:
    the gradient into the layer's input is silently dropped ("an autograd kernel was not registered").
    The held-out evaluation before training and the reference passes would trigger it. Kept off, all
    passes compute with the same NF4 weights, and the backward is right.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def _prepare_4bit(model):
    """peft's k-bit preparation: base frozen, its non-quantised weights (norms, embeddings, head) in
    float32. Applied alike to the policy, the reference-only copy and an evaluated run, so that all
    three compute the same numbers. Checkpointing is enabled separately
    (`models.checkpointing.enable_checkpointing`)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def model_fingerprint(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> str:
    """Identity of the reference weights and of how they compute, for cache keys: the weights
    (`sources.weights_identity`: a hub snapshot's commit, else the content of the local weight and
    config files; never a path, a modification time or whether the hub was reachable), the dtype,
    the attention implementation and, for QLoRA, the 4-bit scheme. The tiny random model: its
    shape, seed and the torch version that draws it. The same online and offline."""
    from ..integrity import json_sha256

    ident: dict = {"dtype": str(dtype), "attn_implementation": cfg.attn_implementation}
    if cfg.mode == "qlora":  # a 4-bit base computes other numbers than its bf16/fp32 original
        ident["quantization"] = f"nf4-double-quant:{qlora_compute_dtype(dtype)}"
    if cfg.name_or_path == TINY:
        ident["tiny"] = [cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads, seed, torch.__version__]
    else:
        from .sources import SourceError, weights_identity

        try:
            ident["weights"] = weights_identity(model_source(cfg))
        except SourceError as exc:
            raise ConfigError(str(exc)) from None
    return json_sha256(ident)


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
    from .checkpointing import enable_checkpointing

    quiet_libraries()
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    base = _load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    reference = None
    if cfg.mode == "qlora":
        base = _prepare_4bit(base)
    if cfg.mode in ("lora", "qlora"):
        policy = _apply_lora(base, lora)
    else:
        policy = base
        if need_reference_model:
            reference = _load_base(cfg, tokenizer, dtype, seed=seed)
            freeze(reference)
    if cfg.gradient_checkpointing:
        # non-reentrant, the recompute under the forward's adapter casting (models.checkpointing.RecomputeAsForward)
        enable_checkpointing(policy)
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
    """The frozen initial model, for precomputing reference log-probs before training (for QLoRA the
    4-bit base, prepared as the policy's is: the adapter-disabled policy computes the same numbers)."""
    quiet_libraries()
    dtype = resolve_dtype(cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    model = _load_base(cfg, tokenizer, dtype, quantize_4bit=cfg.mode == "qlora", seed=seed)
    if cfg.mode == "qlora":
        model = _prepare_4bit(model)
    freeze(model)
    return model


def freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


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

    `model` may also be a training output directory holding an adapter and its config. The adapter
    of a QLoRA run (its config.yaml says model.mode: qlora) is loaded on the 4-bit base it was
    trained on, prepared as in training.
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
            from ..config import load_config_file

            trained = load_config_file(run_cfg).model
            if not model:
                cfg = trained
                cfg.dtype = dtype
            elif trained.name_or_path != model:
                raise ConfigError(
                    f"adapter {adir} was trained on base model '{trained.name_or_path}', "
                    f"not '{model}'. Pass --model {trained.name_or_path} (or omit --model)."
                )
            cfg.mode = trained.mode  # qlora: the adapter belongs on the 4-bit base
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
    qlora = adapter is not None and cfg.mode == "qlora"
    net = _load_base(cfg, tokenizer, resolve_dtype(cfg.dtype), quantize_4bit=qlora, seed=tiny_seed)
    if qlora:
        net = _prepare_4bit(net)
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


# ---------------------------------------------------------------------------------------------
# merging


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The adapters of a peft `model` merged into its base, as a plain transformers model.

    LoRA: peft's `merge_and_unload`. QLoRA: the 4-bit base is dequantised and the adapters' deltas
    added to it in float32, giving an ordinary (unquantised) model in the 4-bit layers' compute dtype
    that loads with `AutoModelForCausalLM.from_pretrained`; the trained model is left as it is. (peft's
    own merge of a 4-bit layer re-quantises the merged weight, a second rounding to 4 bits.)

    Its log-probs are those of the adapter on the 4-bit base up to float rounding. Measured,
    per-sequence response log-prob sums: float32 compute, SmolLM2-135M max |Δ| 5e-5 on sums of ~250
    (3e-6 per token), the tiny model 6e-5 on ~720 (tests/test_qlora.py asserts 1e-6 relative); bf16
    compute (a bf16 model throughout, where the 4-bit one keeps float32 norms and residuals),
    SmolLM2-135M max 1.1 on ~250 (mean 0.012 per token: bf16 rounding, as large as the 4-bit model's
    own bf16 matmuls vs float32 math), the tiny model 0.04 on ~720 (asserted: 5e-4 relative).
    """
    if not is_4bit(model):
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return _merge_dequantized(model)


@torch.no_grad()
def _merge_dequantized(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    compute = next((m.compute_dtype for m in base.modules() if isinstance(m, bnb.nn.Linear4bit) and m.compute_dtype),
                   torch.float32)

    def dense(layer) -> torch.Tensor:
        w = layer.weight
        if type(w).__name__ == "Params4bit":
            # in float32 (the codes times the absmax, as the kernels compute them), not rounded to the
            # dtype the weight was quantised from
            state = copy.copy(w.quant_state)
            state.dtype = torch.float32
            return dequantize_4bit(w.data, state)
        return w.detach().float()

    state: dict[str, torch.Tensor] = {}
    replaced: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in replaced):
            continue  # the base layer inside a LoRA layer, the adapters themselves
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            w = dense(layer)
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in module.merged_adapters:
                    w += module.get_delta_weight(adapter).float()
        elif isinstance(module, bnb.nn.Linear4bit):
            layer, w = module, dense(module)
        else:
            continue
        replaced.append(name + ".")
        state[name + ".weight"] = w.to(compute).cpu()
        if getattr(layer, "bias", None) is not None:
            state[name + ".bias"] = layer.bias.detach().to(compute).cpu()
    for name, p in base.named_parameters():
        if not any(name.startswith(prefix) for prefix in replaced):
            state[name] = p.detach().to(compute).cpu().clone()

    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.use_cache = True
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=compute)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    for name, buf in base.named_buffers():  # e.g. rotary inv_freq (not in the state dict)
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buf.detach().cpu().clone()
    plain.tie_weights()
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if unexpected or left:
        raise RuntimeError(f"merging the QLoRA adapters: unexpected weights {unexpected[:5]}, unset {left[:5]}")
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)
    plain.config.use_cache = True
    return plain.eval()
