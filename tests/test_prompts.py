"""One prompt reader for the data builder and the reward evaluation (`alphadpo_cli.prompts`): the
layouts it reads, that a preference row's prompt is the one training sees, and bad rows named by
file, row and field."""

from __future__ import annotations

import json

import pytest

from alphadpo_cli.data import DataError, to_pair
from alphadpo_cli.prompts import extract_prompt, prompt_key, read_prompts

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "yo"}
S = {"role": "system", "content": "be brief"}


def test_prompt_layouts():
    assert extract_prompt({"prompt": "hi"}, "w") == ([U], None)
    assert extract_prompt({"prompt": [S, U]}, "w") == ([S, U], None)
    assert extract_prompt({"messages": [S, U, A]}, "w") == ([S, U], "yo")
    # a lone conversation (no rejected answer): the prompt of its last answer
    assert extract_prompt({"chosen": [U, A, U, A], "rejected": []}, "w") == ([U, A, U], "yo")
    assert extract_prompt({"instruction": "hi", "prompt": "no"}, "w", prompt_field="instruction") == ([U], None)


def test_a_preference_rows_prompt_is_the_one_training_sees():
    # The conversations carry a system turn the `prompt` string lacks: training's prompt has it.
    row = {"prompt": "hi", "chosen": [S, U, A], "rejected": [S, U, {"role": "assistant", "content": "no"}]}
    messages, reference = extract_prompt(row, "w")
    assert messages == to_pair(row, "w").prompt == [S, U]
    assert reference == "yo"
    strings = {"prompt": "hi", "chosen": "yo", "rejected": "no"}
    assert extract_prompt(strings, "w") == ([U], "yo")


def test_read_prompts_keeps_the_rows_other_fields_and_names_bad_rows(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [{"prompt": "hi", "constraints": ["no_commas"], "score_chosen": 1.0},
            {"messages": [U, A], "id": 7}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, source = read_prompts(str(f), "train")
    assert [p.extras for p in got] == [{"constraints": ["no_commas"]}, {"id": 7}]
    assert got[0].key == got[1].key == prompt_key([U])  # the same prompt, keyed by its messages
    assert "train.jsonl" in source and "row 1" in got[0].where
    assert len(read_prompts(str(f), "train", max_prompts=1)[0]) == 1
    f.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "?"}) + "\n"
                 + json.dumps({"messages": [A]}) + "\n" + json.dumps({"prompt": [U, A]}) + "\n")
    with pytest.raises(DataError) as err:
        read_prompts(str(f), "train")
    text = str(err.value)
    assert "3 row(s)" in text and "train.jsonl" in text
    assert "row 2 (line 2): no prompt" in text and "question" in text
    assert "row 3 (line 3): field 'messages' holds no prompt" in text
    assert "row 4 (line 4): field 'prompt' ends with an assistant turn" in text
