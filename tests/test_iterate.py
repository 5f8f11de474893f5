"""`alphadpo iterate`'s checks, before any model loads: bad input is one clear message with exit
status 2; the prompt slices; a changed setting refused with the changes listed. (The rounds
themselves: tests/test_iterate_rounds.py.)"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from alphadpo_cli.artefacts import IdentityMismatch
from alphadpo_cli.cli import main
from alphadpo_cli.config import ConfigError
from alphadpo_cli.iterate import IterateOptions, check_options, prepare


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "reward.py").write_text("def reward(prompt, response, row):\n    return len(response)\n")
    rows = [{"prompt": f"Say something about {i}.", "n": i} for i in range(10)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "heldout.jsonl").write_text(json.dumps(rows[3]) + "\n" + json.dumps({"prompt": "Other."}) + "\n")
    return tmp_path


def _cli(inputs, *extra):
    args = ["iterate", "-p", "tiny", "-d", str(inputs / "prompts.jsonl"), "-r", f"{inputs / 'reward.py'}:reward",
            "-o", str(inputs / "out"), *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks come first."""
    import alphadpo_cli.models.inference as inference
    import alphadpo_cli.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(inference, "load_base", boom)
    monkeypatch.setattr(loading, "load_base", boom)


@pytest.mark.parametrize("extra, message", [
    (["--rounds", "0", "--heldout-size", "2"], "--rounds must be >= 1, not 0"),
    (["--rounds", "3", "--prompts-per-round", "4", "--heldout-size", "2"],
     "8 training prompt(s) are too few for 3 rounds x 4 prompts per round (12 needed)"),
    (["--rounds", "9", "--heldout-size", "2"], "8 training prompt(s) are too few for 9 rounds of at least one"),
    (["--heldout-dataset", "HELDOUT", "--heldout-split", "train"], "1 held-out prompt(s)"),
    (["--heldout-size", "2", "-r", "REWARD_MISSING"], "missing.py"),
    (["--heldout-size", "2", "--set", "training.nope=1"], "training.nope"),
    ([], "give the held-out prompts"),
])
def test_bad_input_is_one_message_and_exit_2_before_any_model_loads(inputs, no_model_loads, extra, message):
    extra = [str(inputs / "heldout.jsonl") if e == "HELDOUT" else
             f"{inputs / 'missing.py'}:reward" if e == "REWARD_MISSING" else e for e in extra]
    r = _cli(inputs, *extra)
    assert r.exit_code == 2, r.output
    assert "error" in r.output.lower() and message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
    assert not (inputs / "out" / "round-1").exists()


def test_unknown_reference_is_refused():
    opts = IterateOptions(prompts="p.jsonl", reward="r.py:f", output_dir="o", preset="tiny", heldout_size=1,
                          reference="latest")
    with pytest.raises(ConfigError, match="unknown --reference 'latest' \\(choose previous or initial\\)"):
        check_options(opts)
    assert _cli_code(["--reference", "latest"]) == 2


def _cli_code(extra):
    return CliRunner().invoke(main, ["iterate", "-d", "x", "-r", "y", "-o", "z", *extra]).exit_code


def _opts(inputs, **kw):
    base = dict(prompts=str(inputs / "prompts.jsonl"), reward=f"{inputs / 'reward.py'}:reward",
                output_dir=str(inputs / "out"), preset="tiny", heldout_size=2, rounds=2)
    return IterateOptions(**{**base, **kw})


def test_slices_are_disjoint_and_the_heldout_never_trained_on(inputs):
    exp = prepare(_opts(inputs, rounds=3))
    exp.progress.close()
    slices, held = exp.prompts.slices, {p.key for p in exp.prompts.heldout}
    assert [len(s) for s in slices] == [2, 2, 2]  # 8 training prompts // 3 rounds
    keys = [p.key for s in slices for p in s]
    assert len(set(keys)) == len(keys) and not set(keys) & held
    reused = prepare(_opts(inputs, rounds=3, reuse_prompts=True, prompts_per_round=5, overwrite=True))
    reused.progress.close()
    assert [[p.key for p in s] for s in reused.prompts.slices] == [[p.key for p in reused.prompts.slices[0]]] * 3
    assert len(reused.prompts.slices[0]) == 5


def test_a_changed_setting_is_refused_listing_it_unless_overwrite(inputs):
    prepare(_opts(inputs)).progress.close()
    with pytest.raises(IdentityMismatch, match=r"settings.num_samples: 5 there, 3 now"):
        prepare(_opts(inputs, num_samples=3))
    prepare(_opts(inputs, num_samples=3, overwrite=True)).progress.close()
    prepare(_opts(inputs, num_samples=3, quiet=True)).progress.close()  # not a change of results


def test_a_directory_of_other_files_is_refused(inputs):
    (inputs / "out").mkdir()
    (inputs / "out" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds files no `alphadpo iterate` wrote"):
        prepare(_opts(inputs))


