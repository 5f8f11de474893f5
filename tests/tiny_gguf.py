"""A tiny Llama GGUF written from scratch with the `gguf` package (a few tens of kB, no hub): a
byte-level BPE tokenizer with ChatML special tokens and a chat template, random weights, the
matrices Q8_0-quantised as in a real quantised file. tests/ is on sys.path under pytest."""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    ff: int = 64, context: int = 512, seed: int = 0) -> Path:
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_chars + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(byte_chars) + [3, 3, 3])
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(vocab - 3)  # <|im_start|>, as SmolLM2's GGUF names it
    w.add_eos_token_id(vocab - 2)  # <|im_end|>
    w.add_pad_token_id(vocab - 2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def matrix(name: str, shape: tuple[int, int]) -> None:
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    kv = hidden // heads * kv_heads
    matrix("token_embd.weight", (vocab, hidden))  # no output.weight: the head is tied to it
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        matrix(f"blk.{i}.attn_q.weight", (hidden, hidden))
        matrix(f"blk.{i}.attn_k.weight", (kv, hidden))
        matrix(f"blk.{i}.attn_v.weight", (kv, hidden))
        matrix(f"blk.{i}.attn_output.weight", (hidden, hidden))
        matrix(f"blk.{i}.ffn_gate.weight", (ff, hidden))
        matrix(f"blk.{i}.ffn_up.weight", (ff, hidden))
        matrix(f"blk.{i}.ffn_down.weight", (hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
