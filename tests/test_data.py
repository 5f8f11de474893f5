"""Data loading, validation messages, templating (BOS/EOS), truncation and the tokenised cache."""

from __future__ import annotations

import json

import pytest

from alphadpo_cli.data import DataError, PairTokenizer, TokenizeSettings, load_rows, to_pair, tokenize_split, validate_rows
from alphadpo_cli.logps.layouts import PairCollator
from alphadpo_cli.models.loading import build_tiny_tokenizer
from alphadpo_cli.models.templates import CHATML_TEMPLATE

SETTINGS = TokenizeSettings(max_length=256, max_prompt_length=128)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def msgs(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_three_layouts_give_the_same_pair():
    conv = {"chosen": msgs("hi", "yes"), "rejected": msgs("hi", "no")}
    strings = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    split = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]}
    pairs = [to_pair(r, "x") for r in (conv, strings, split)]
    assert pairs[0] == pairs[1] == pairs[2]
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}]


def test_ultrafeedback_style_with_prompt_column_and_multi_turn():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    row = {"prompt": "c", "chosen": history + [{"role": "assistant", "content": "good"}],
           "rejected": history + [{"role": "assistant", "content": "bad"}]}
    pair = to_pair(row, "x")
    assert pair.prompt == history and pair.chosen[-1]["content"] == "good"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a", "rejectd": "b"}, r"row 1 \(line 1\): missing field 'rejected' \('rejectd' looks like 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"row 1 \(line 1\): field 'chosen' must be a string or a list of messages, got int 3"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, r"row 1 \(line 1\): field 'chosen': the response is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"row 1 \(line 1\): fields 'chosen' and 'rejected' are identical"),
        ({"chosen": msgs("p", "x"), "rejected": msgs("p", "x")}, r"fields 'chosen' and 'rejected' are identical"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": 5}], "rejected": "b"},
         r"field 'chosen\[0\]\.content' must be a string, got int 5"),
        ({"chosen": "a", "rejected": "b"}, r"missing field 'prompt'"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "y", "rejected": "n"}
    f = write_jsonl(tmp_path / "train.jsonl", [row, good])
    with pytest.raises(DataError, match=message) as err:
        validate_rows(load_rows(str(f), "train"))
    assert str(f) in str(err.value)


def test_all_errors_reported_together(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "", "rejected": "b"}] * 3)
    with pytest.raises(DataError, match=r"(?s)3 invalid row\(s\).*row 1.*row 2.*row 3"):
        validate_rows(load_rows(str(f), "train"))


def test_file_level_errors(tmp_path):
    trunc = tmp_path / "t.jsonl"
    trunc.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + '\n{"prompt": "p", "cho')
    with pytest.raises(DataError, match=r"t\.jsonl: line 2 is not valid JSON.*truncated"):
        load_rows(str(trunc), "train")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="e.jsonl: the file is empty"):
        load_rows(str(empty), "train")
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl: line 1 is not valid UTF-8 \(byte 0xe9"):
        load_rows(str(latin), "train")
    with pytest.raises(DataError, match="dataset not found"):
        load_rows(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(DataError, match="no file for split 'validation'"):
        load_rows(str(tmp_path), "validation")


def test_json_and_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows * 2), tmp_path / "test.parquet")
    assert len(load_rows(str(tmp_path), "train").rows) == 1
    assert len(load_rows(str(tmp_path), "test").rows) == 2
    assert len(load_rows(str(tmp_path / "test.parquet"), "train").rows) == 2


def test_prompt_and_response_rendering(tok):
    pt = PairTokenizer(tok, SETTINGS)
    pair = to_pair({"prompt": "Hi", "chosen": "Yes", "rejected": "No"}, "x")
    out = pt(pair)
    assert tok.decode(out["prompt_ids"]) == "<|im_start|>user\nHi<|im_end|>\n"
    # The assistant header and the EOS belong to the response; EOS is its last token.
    assert tok.decode(out["chosen_ids"]) == "<|im_start|>assistant\nYes<|im_end|>"
    assert out["chosen_ids"][-1] == tok.eos_token_id and out["rejected_ids"][-1] == tok.eos_token_id


def test_exactly_one_bos_when_template_and_tokenizer_both_add_it():
    tok = build_tiny_tokenizer()
    tok.chat_template = "{{ bos_token }}{{ bos_token }}" + CHATML_TEMPLATE  # a template that doubles it
    pt = PairTokenizer(tok, SETTINGS)
    assert pt.uses_bos
    out = pt(to_pair({"prompt": "Hi", "chosen": "Yes", "rejected": "No"}, "x"))
    assert out["prompt_ids"][0] == tok.bos_token_id and out["prompt_ids"][1] != tok.bos_token_id
    assert tok.bos_token_id not in out["chosen_ids"] and tok.bos_token_id not in out["rejected_ids"]


def test_a_bos_that_marks_every_turn_is_left_alone():
    # SmolLM2 names its ChatML turn opener <|im_start|> as BOS: it must stay at the start of
    # every turn, responses included, and never be doubled.
    tok = build_tiny_tokenizer()
    tok.bos_token = "<|im_start|>"
    pt = PairTokenizer(tok, SETTINGS)
    assert not pt.uses_bos
    out = pt(to_pair({"prompt": "Hi", "chosen": "Yes", "rejected": "No"}, "x"))
    assert tok.decode(out["prompt_ids"]) == "<|im_start|>user\nHi<|im_end|>\n"
    assert tok.decode(out["chosen_ids"]) == "<|im_start|>assistant\nYes<|im_end|>"


def test_eos_appended_when_missing():
    tok = build_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    out = PairTokenizer(tok, SETTINGS)(to_pair({"prompt": "Hi", "chosen": "Yes", "rejected": "No"}, "x"))
    assert out["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(out["chosen_ids"][:-1]) == "assistant: Yes\n"


def test_truncation_keeps_prompt_end_then_cuts_responses(tok):
    settings = TokenizeSettings(max_length=60, max_prompt_length=30)
    pt = PairTokenizer(tok, settings)
    long_prompt = "start " + "x" * 100 + " THE-END"
    out = pt(to_pair({"prompt": long_prompt, "chosen": "y" * 80, "rejected": "n"}, "x"))
    assert len(out["prompt_ids"]) == 30 and out["prompt_truncated"]
    assert tok.decode(out["prompt_ids"]).endswith("THE-END<|im_end|>\n")
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 60 and out["response_truncated"]
    assert len(out["rejected_ids"]) < 30  # a short response is left alone


def test_truncation_modes_error_and_drop_are_reported(tmp_path, tok):
    rows = [{"prompt": "z" * 300, "chosen": "a", "rejected": "b"}, {"prompt": "short", "chosen": "a", "rejected": "b"}]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"1 prompt\(s\) longer than max_prompt_length=30.*row 1 \(line 1\)"):
        tokenize_split(str(f), "train", tok, TokenizeSettings(60, 30, "error"))
    dropped = tokenize_split(str(f), "train", tok, TokenizeSettings(60, 30, "drop"))
    assert len(dropped) == 1 and dropped.stats.dropped_too_long == 1
    assert "1 dropped" in dropped.stats.summary()
    kept = tokenize_split(str(f), "train", tok, TokenizeSettings(60, 30, "keep_end"))
    assert len(kept) == 2 and kept.stats.prompt_truncated == 1


def test_tokenised_cache_hits_and_misses_on_any_setting_change(prefs_dir, tok):
    first = tokenize_split(str(prefs_dir), "train", tok, SETTINGS)
    again = tokenize_split(str(prefs_dir), "train", tok, SETTINGS)
    assert not first.stats.cache_hit and again.stats.cache_hit
    assert again.fingerprint == first.fingerprint and again.dataset["chosen_ids"] == first.dataset["chosen_ids"]
    for changed in (TokenizeSettings(255, 128), TokenizeSettings(256, 127), TokenizeSettings(256, 128, "drop")):
        other = tokenize_split(str(prefs_dir), "train", tok, changed)
        assert not other.stats.cache_hit and other.fingerprint != first.fingerprint
    tok2 = build_tiny_tokenizer()
    tok2.chat_template = CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> ")
    assert not tokenize_split(str(prefs_dir), "train", tok2, SETTINGS).stats.cache_hit
    sub = tokenize_split(str(prefs_dir), "train", tok, SETTINGS, max_samples=5)
    assert len(sub) == 5 and sub.fingerprint != first.fingerprint


def test_collator_masks_only_response_tokens(prefs_dir, tok):
    split = tokenize_split(str(prefs_dir), "train", tok, SETTINGS)
    batch = PairCollator(tok.pad_token_id)([split.dataset[0], split.dataset[1]])
    ex = split.dataset[0]
    assert batch["input_ids"].shape[0] == 4
    p, c = len(ex["prompt_ids"]), len(ex["chosen_ids"])
    assert batch["response_mask"][0].nonzero().flatten().tolist() == list(range(p, p + c))
    assert batch["attention_mask"][0].sum() == p + c
    assert batch["index"].tolist() == [0, 1]


# --------------------------------------------------------------------------------------------
# folders as `datasets.load_dataset(folder)` reads them (a hub download keeps the hub's layout)

HUB_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# A preference dataset, as `huggingface-cli download --repo-type dataset ... --local-dir uf` leaves it
"""


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _conv_rows(n, start=0):
    return [{"prompt": f"q{i}", "chosen": msgs(f"q{i}", "good"), "rejected": msgs(f"q{i}", "bad"), "score_chosen": 9.0}
            for i in range(start, start + n)]


def test_a_hub_download_folder_loads_like_load_dataset(tmp_path):
    uf = tmp_path / "uf"
    train = _parquet(uf / "data" / "train-00000-of-00001.parquet", _conv_rows(5))
    _parquet(uf / "data" / "test-00000-of-00001.parquet", _conv_rows(2, start=100))
    (uf / "README.md").write_text(HUB_README)
    raw = load_rows(str(uf), "train")
    assert len(raw.rows) == 5 and raw.source == str(train)
    assert [r["prompt"] for r in load_rows(str(uf), "test").rows] == ["q100", "q101"]
    assert len(validate_rows(raw)) == 5
    with pytest.raises(DataError, match=r"uf: no file for split 'validation' \(found splits: test, train\)"):
        load_rows(str(uf), "validation")
    # the same folder without its README: the hub's file-name conventions still find the splits
    (uf / "README.md").unlink()
    assert len(load_rows(str(uf), "train").rows) == 5 and len(load_rows(str(uf), "test").rows) == 2


def test_row_errors_in_a_sharded_split_name_the_file_and_its_row(tmp_path):
    uf = tmp_path / "uf"
    _parquet(uf / "data" / "train-00000-of-00002.parquet", _conv_rows(3))
    bad = _conv_rows(2, start=3)
    bad[1]["rejected"] = bad[1]["chosen"]
    second = _parquet(uf / "data" / "train-00001-of-00002.parquet", bad)
    (uf / "README.md").write_text(HUB_README)
    raw = load_rows(str(uf), "train")
    assert len(raw.rows) == 5 and raw.source == f"{uf}[train]"
    with pytest.raises(DataError, match=r"1 invalid row\(s\)") as err:
        validate_rows(raw)
    assert f"{second}, row 2: fields 'chosen' and 'rejected' are identical" in str(err.value)
    # max_samples keeps where each row came from
    assert raw.head(4).where(3) == f"{second}, row 1"


def test_readme_configs_choose_the_files(tmp_path):
    d = tmp_path / "d"
    (d / "prefs").mkdir(parents=True)
    write_jsonl(d / "prefs" / "sft.jsonl", [{"prompt": "a", "chosen": "y", "rejected": "n"}] * 3)
    write_jsonl(d / "prefs" / "holdout.jsonl", [{"prompt": "b", "chosen": "y", "rejected": "n"}, {"chosen": 1}])
    (d / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                 "    path: prefs/sft.jsonl\n  - split: test\n    path: prefs/holdout.jsonl\n---\n")
    assert len(load_rows(str(d), "train").rows) == 3
    with pytest.raises(DataError, match=r"holdout\.jsonl, row 2 \(line 2\): missing field 'rejected'"):
        validate_rows(load_rows(str(d), "test"))


def test_cli_trains_on_the_hub_folder_itself(tmp_path):
    from click.testing import CliRunner

    from alphadpo_cli.cli import main

    uf = tmp_path / "uf"
    _parquet(uf / "data" / "train-00000-of-00001.parquet", _conv_rows(8))
    _parquet(uf / "data" / "test-00000-of-00001.parquet", _conv_rows(4, start=50))
    (uf / "README.md").write_text(HUB_README)
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--dataset", str(uf), "-o", str(tmp_path / "o"),
                                  "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "train pairs" in r.output and "eval pairs" in r.output and "no file for split" not in r.output


def test_data_shipped_in_a_package():
    raw = load_rows("pkg:alphadpo_cli/demo", "train")
    assert len(raw.rows) == 329 and raw.source.endswith("demo/train.jsonl")
    assert len(load_rows("pkg:alphadpo_cli/demo", "test").rows) == 71
    with pytest.raises(DataError, match="Python package 'no_such_pkg' is not installed"):
        load_rows("pkg:no_such_pkg/demo", "train")
    with pytest.raises(DataError, match="has no 'nothing'"):
        load_rows("pkg:alphadpo_cli/nothing", "train")


# ---------------------------------------------------------------------------------------------
# a missing split is a type (MissingSplitError), not a message to match


def test_a_missing_split_raises_its_own_type_with_the_same_message(tmp_path):
    import re

    import datasets

    from alphadpo_cli.data import MissingSplitError

    assert issubclass(MissingSplitError, DataError)  # every `except DataError` still catches it
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(MissingSplitError, match=r"^" + re.escape(str(d)) + r": no file for split 'test' \(found splits: train\)$"):
        load_rows(str(d), "test")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])}) \
        .save_to_disk(str(saved))
    with pytest.raises(MissingSplitError, match=r"^" + re.escape(str(saved)) + r": no split 'test' \(available: train\)$"):
        load_rows(str(saved), "test")
    # other data errors are not missing splits
    write_jsonl(d / "test.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError) as err:
        validate_rows(load_rows(str(d), "test"))
    assert not isinstance(err.value, MissingSplitError)


def test_load_splits_skips_a_missing_held_out_split_unless_it_was_asked_for(tmp_path, tok):
    from alphadpo_cli.config import DataConfig
    from alphadpo_cli.data import MissingSplitError, load_splits

    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)])
    train, held_out = load_splits(DataConfig(dataset=str(d), eval_split="test"), tok, use_cache=False)
    assert len(train) == 3 and held_out is None
    # named with data.eval_dataset: its missing split is an error, with the loader's message
    with pytest.raises(MissingSplitError, match=r"no file for split 'test' \(found splits: train\)"):
        load_splits(DataConfig(dataset=str(d), eval_split="test", eval_dataset=str(d)), tok, use_cache=False)
    # a held-out split that exists but is broken is reported, not skipped
    write_jsonl(d / "test.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"test\.jsonl, row 1 \(line 1\): missing field 'rejected'"):
        load_splits(DataConfig(dataset=str(d), eval_split="test"), tok, use_cache=False)
