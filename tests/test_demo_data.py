"""The demo preference dataset (alphadpo_cli/demo, shipped in the wheel; examples/demo links to it) and
the verifiable reward that ranked it."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEMO = ROOT / "alphadpo_cli" / "demo"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


vr = _load("verifiable_reward")


# --------------------------------------------------------------------------------------------
# Reward functions on hand examples
# --------------------------------------------------------------------------------------------


def test_count_words_and_bullets():
    assert vr.count_words("") == 0
    assert vr.count_words("Hello, world!") == 2
    assert vr.count_words("It's a well-known fact: 42 is the answer.") == 8
    assert vr.count_bullets("- a\n- b\n* c\n• d\n1. e\n-f") == 4


@pytest.mark.parametrize(
    "text, constraint, expected",
    [
        ("one two three", "max_words:3", True),
        ("one two three four", "max_words:3", False),
        ("all lower case here.", "lowercase", True),
        ("Not lower case.", "lowercase", False),
        ("123 !!", "lowercase", False),  # no letters at all is not an answer in lowercase
        ("Water is wet.", "include_word:water", True),
        ("Saltwater is wet.", "include_word:water", False),  # whole words only
        ("- one\n- two\n- three", "bullets:3", True),
        ("- one\n\n* two\n• three\n", "bullets:3", True),
        ("- one\n- two", "bullets:3", False),
        ("Intro:\n- one\n- two\n- three", "bullets:3", False),  # nothing but the list
        ("1. one\n2. two\n3. three", "bullets:3", False),
        ("Paris is nice. Hope this helps!", "end_with:Hope this helps!", True),
        ("Paris is nice. hope this helps!  \n", "end_with:Hope this helps!", True),
        ("Hope this helps! Paris is nice.", "end_with:Hope this helps!", False),
        ("No commas here.", "no_commas", True),
        ("Yes, a comma.", "no_commas", False),
    ],
)
def test_check(text, constraint, expected):
    assert vr.check(text, constraint) is expected


@pytest.mark.parametrize(
    "bad", ["nope", "max_words", "max_words:x", "max_words:0", "bullets:-1", "lowercase:1",
            "include_word:"]
)
def test_parse_rejects_bad_constraints(bad):
    with pytest.raises(ValueError):
        vr.parse(bad)


def test_every_constraint_has_an_instruction():
    examples = {"max_words": "max_words:20", "lowercase": "lowercase",
                "include_word": "include_word:light", "bullets": "bullets:3",
                "end_with": "end_with:That is all.", "no_commas": "no_commas"}
    assert set(examples) == set(vr.CONSTRAINT_NAMES)
    for c in examples.values():
        assert vr.describe(c).endswith(".")
    assert "20" in vr.describe("max_words:20") and '"light"' in vr.describe("include_word:light")


def test_constraint_score_is_the_fraction_satisfied():
    cons = ["max_words:5", "lowercase", "no_commas"]
    assert vr.constraint_score("short and lower", cons) == 1.0
    assert vr.constraint_score("Short, and upper", cons) == pytest.approx(1 / 3)
    assert vr.constraint_score("anything", []) == 1.0


def test_score_response_tie_break_orders_only_equal_fractions():
    cons = ["max_words:30", "no_commas"]
    short, long_ok, violating = "Yes it is.", " ".join(["word"] * 25), "Yes, it is."
    s_short, s_long, s_bad = (vr.score_response(t, cons) for t in (short, long_ok, violating))
    assert s_short > s_long > s_bad  # brevity breaks the tie between two full passes
    assert s_long - 1.0 < vr.TIE_BREAK and s_short - 1.0 <= vr.TIE_BREAK
    # The tie-break can never outweigh one constraint, even with three of them.
    assert vr.TIE_BREAK < 1 / 3
    # A truncated answer gets no tie-break; empty answers and echoes of the prompt score 0.
    assert vr.score_response(short, cons, finished=False) == 1.0
    assert vr.score_response("   ", cons) == 0.0
    prompt = "Why is the sky blue? Answer in at most 30 words."
    assert vr.score_response("Why is the sky blue?", cons, prompt=prompt) == 0.0
    assert vr.score_response("Sunlight scatters.", cons, prompt=prompt) > 1.0


def test_brevity():
    assert vr.brevity("") == 1.0
    assert vr.brevity(" ".join(["w"] * vr.BREVITY_CAP_WORDS)) == 0.0
    assert vr.brevity(" ".join(["w"] * 500)) == 0.0


# --------------------------------------------------------------------------------------------
# The builder's pure parts (no model)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder():
    return _load("build_demo_dataset")


def test_prompts_are_deterministic_and_disjoint(builder):
    train, test = builder.build_prompts(seed=0, per_topic=5, test_topics=18)
    assert (train, test) == builder.build_prompts(seed=0, per_topic=5, test_topics=18)
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert len({p for p, _ in train}) == len(train)
    for prompt, cons in train + test:
        assert all(vr.describe(c) in prompt for c in cons) and 1 <= len(cons) <= 2


def test_drawn_constraints_are_compatible(builder):
    rng = random.Random(1)
    for _ in range(500):
        cons = builder.draw_constraints(rng)
        names = {vr.parse(c)[0] for c in cons}
        assert len(names) == len(cons)
        assert not ({"lowercase", "end_with"} <= names or {"bullets", "end_with"} <= names)


def test_make_pair_keeps_best_and_worst(builder):
    prompt, cons = "Why is the sky blue? Answer in at most 10 words.", ["max_words:10"]
    answers = [
        ("Sunlight scatters off air molecules.", True),
        ("The sky is blue because " + "blue light scatters more " * 5, False),
        ("Because of Rayleigh scattering of sunlight in the air above.", True),
        ("Why is the sky blue?", True),
    ]
    row = builder.make_pair(prompt, cons, answers, min_gap=0.0)
    assert row["chosen"][1]["content"] == "Sunlight scatters off air molecules."
    assert row["rejected"][1]["content"] in {answers[1][0], "Why is the sky blue?"}
    assert row["score_chosen"] > row["score_rejected"]
    # The chosen answer is the best one that finished, even when a cut-off one scores higher.
    row = builder.make_pair(prompt, cons, [("Tiny.", False), ("Short answer.", True),
                                           (" ".join(["long"] * 20), True)], 0.0)
    assert row["chosen"][1]["content"] == "Short answer."
    # No pair when every answer is the same, or when no answer finished.
    assert builder.make_pair(prompt, cons, [("Same.", True)] * 4, 0.0) is None
    assert builder.make_pair(prompt, cons, [("Short.", False), ("", True)], 0.0) is None
    assert builder.make_pair(prompt, cons, [("Short.", False), ("Other.", False)], 0.0) is None


# --------------------------------------------------------------------------------------------
# The shipped files
# --------------------------------------------------------------------------------------------


def _rows(split: str) -> list[dict]:
    path = DEMO / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def shipped():
    return {split: _rows(split) for split in ("train", "test")}


def test_shipped_sizes(shipped):
    assert 300 <= len(shipped["train"]) <= 450
    assert 60 <= len(shipped["test"]) <= 100


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_rows_are_well_formed(shipped, split):
    for row in shipped[split]:
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                            "constraints"}
        prompt = row["prompt"]
        assert isinstance(prompt, str) and prompt
        for key in ("chosen", "rejected"):
            user, assistant = row[key]
            assert user == {"role": "user", "content": prompt}
            assert assistant["role"] == "assistant"
            assert isinstance(assistant["content"], str) and assistant["content"].strip()
        assert row["chosen"][1]["content"] != row["rejected"][1]["content"]
        assert isinstance(row["score_chosen"], float) and isinstance(row["score_rejected"], float)
        assert row["score_chosen"] > row["score_rejected"]
        assert row["constraints"] and all(vr.describe(c) in prompt for c in row["constraints"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_scores_are_the_reward(shipped, split):
    """Scores are recomputable from the row: chosen answers finished; rejected may be cut off."""
    for row in shipped[split]:
        cons, prompt = row["constraints"], row["prompt"]
        chosen, rejected = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert row["score_chosen"] == round(
            vr.score_response(chosen, cons, finished=True, prompt=prompt), 4)
        assert row["score_rejected"] in {
            round(vr.score_response(rejected, cons, finished=f, prompt=prompt), 4)
            for f in (True, False)
        }


def test_shipped_prompts_are_disjoint(shipped):
    train = {r["prompt"] for r in shipped["train"]}
    test = {r["prompt"] for r in shipped["test"]}
    assert len(train) == len(shipped["train"]) and len(test) == len(shipped["test"])
    assert not train & test
