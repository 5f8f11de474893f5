"""alphadpo_cli.values: the one coercion helper (config values and loss parameters) and the one
"did you mean" helper, and the sites that use them keep their messages."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from alphadpo_cli.config import ConfigError, from_dict, load_preset_dict, parse_scalar
from alphadpo_cli.data import DataError, to_pair
from alphadpo_cli.losses import UnknownLossError, get_loss, make_params
from alphadpo_cli.values import BadValue, coerce, did_you_mean, kind_from_annotation, kind_from_default, parse_number


# -- strict reading (config) ----------------------------------------------------------------------


@pytest.mark.parametrize("value, kind, expected", [
    ("3", "int", 3), (3.0, "int", 3), ("3.0", "int", 3), (7, "int", 7),
    ("5e-2", "float", 0.05), (2, "float", 2.0), (".5", "float", 0.5), (" -4 ", "float", -4.0),
    (float("nan"), "float", "nan"),  # strict mode leaves ranges to the caller
    (True, "bool", True), (False, "bool", False),
    (3, "str", "3"), ("x", "str", "x"),
    ("a, b,,c ", "list", ["a", "b", "c"]), (["x"], "list", ["x"]),
    ({"a": 1}, "dict", {"a": 1}), ([1], "any", [1]),
])
def test_strict_coercion(value, kind, expected):
    got = coerce(value, kind)
    if expected == "nan":
        assert math.isnan(got)
    else:
        assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, kind, message", [
    ("two", "int", "expected an integer, got 'two'"),
    ("2.5", "int", "expected an integer, got 2.5"),  # the number it read, not the text
    (True, "int", "expected an integer, got True"),
    ("abc", "float", "expected a number, got 'abc'"),
    ("nan", "float", "expected a number, got 'nan'"),
    (False, "float", "expected a number, got False"),
    ("true", "bool", "expected true or false, got 'true'"),
    (1, "bool", "expected true or false, got 1"),
    ("a", "dict", "expected a mapping, got 'a'"),
    (None, "int", "expected an integer, got None"),
    (None, "str", "expected a string, got None"),
])
def test_strict_coercion_refuses(value, kind, message):
    with pytest.raises(BadValue) as exc:
        coerce(value, kind)
    assert str(exc.value) == message
    assert isinstance(exc.value, ValueError)


def test_none_passes_only_where_nullable():
    assert coerce(None, "int", True) is None and coerce(None, "list", True) is None
    with pytest.raises(BadValue) as exc:
        coerce(None, "list")
    assert exc.value.value is None
    with pytest.raises(ValueError, match="unknown kind"):
        coerce(1, "complex")


# -- lenient reading (loss parameters) ------------------------------------------------------------


@pytest.mark.parametrize("value, kind, expected", [
    (" 10 ", "float", 10.0), ("5e-2", "float", 0.05), ("1_0", "float", 10.0), (3, "float", 3.0),
    (torch.tensor(0.25), "float", 0.25), (torch.tensor([2.0]), "float", 2.0), (torch.tensor(True), "float", 1.0),
    ("false", "bool", False), (" YES ", "bool", True), ("off", "bool", False), ("1", "bool", True),
    (0, "bool", False), (1.0, "bool", True), (True, "bool", True),
    ("ema", "str", "ema"), (None, "any", None), ([1, 2], "any", [1, 2]),
])
def test_lenient_coercion(value, kind, expected):
    got = coerce(value, kind, kind == "any", lenient=True)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, kind, message", [
    ("lots", "float", "expected a number, got 'lots'"), (True, "float", "expected a number, got True"),
    (None, "float", "expected a number, got None"), (torch.tensor([1.0, 2.0]), "float", "expected a number, got tensor([1., 2.])"),
    ("nan", "float", "expected finite, got nan"), (float("inf"), "float", "expected finite, got inf"),
    (2, "bool", "expected a boolean, got 2"), ("maybe", "bool", "expected a boolean, got 'maybe'"),
    (None, "bool", "expected a boolean, got None"), (3, "str", "expected a string, got 3"),
])
def test_lenient_coercion_refuses(value, kind, message):
    with pytest.raises(BadValue) as exc:
        coerce(value, kind, lenient=True)
    assert str(exc.value) == message


def test_kinds_from_annotations_and_defaults():
    assert kind_from_annotation("int") == ("int", False)
    assert kind_from_annotation("int | None") == ("int", True)
    assert kind_from_annotation("str | None") == ("str", True)
    assert kind_from_annotation("float") == ("float", False)
    assert kind_from_annotation("bool") == ("bool", False)
    assert kind_from_annotation("list") == ("list", False)
    assert kind_from_annotation("dict") == ("dict", False)
    assert kind_from_annotation("Any") == ("any", True)
    assert kind_from_default(True) == ("bool", False)
    assert kind_from_default(0.5) == ("float", False) and kind_from_default(3) == ("float", False)
    assert kind_from_default("ema") == ("str", False)
    assert kind_from_default(None) == ("any", True)


def test_parse_number():
    assert parse_number("5e-2") == 0.05 and parse_number(" 3 ") == 3.0 and parse_number("+.5") == 0.5
    assert parse_number("nan") is None and parse_number("1_0") is None and parse_number("x1") is None


# -- the sites keep their messages ----------------------------------------------------------------


def test_config_and_loss_messages_through_the_one_helper():
    with pytest.raises(ConfigError, match=r"^config: training\.seed: expected an integer, got 'two'$"):
        from_dict({"training": {"seed": "two"}})
    with pytest.raises(ConfigError, match=r"^config: training\.seed: null is not allowed here$"):
        from_dict({"training": {"seed": None}})
    with pytest.raises(ConfigError, match=r"^config: model\.gradient_checkpointing: expected true or false, got 'yes'$"):
        from_dict({"model": {"gradient_checkpointing": "yes"}})
    assert from_dict({"data": {"max_samples": None, "eval_split": 5}}).data.eval_split == "5"
    assert from_dict({"training": {"report_to": "tensorboard, wandb"}}).training.report_to == ["tensorboard", "wandb"]
    assert parse_scalar("5e-2") == 0.05 and parse_scalar("abc") == "abc" and parse_scalar("1") == 1

    with pytest.raises(ValueError, match=r"^parameter 'alpha' must be a number, got 'lots'$"):
        make_params("alpha_dpo", {"alpha": "lots"})
    with pytest.raises(ValueError, match=r"^parameter 'alpha' must be finite, got nan$"):
        make_params("alpha_dpo", {"alpha": "nan"})
    with pytest.raises(ValueError, match=r"^parameter 'stop_gradient' must be a boolean, got 2$"):
        make_params("alpha_dpo", {"stop_gradient": 2})
    with pytest.raises(ValueError, match=r"^parameter 'normalization' must be a string, got 3$"):
        make_params("alpha_dpo", {"normalization": 3})
    assert make_params("alpha_dpo", {"stop_gradient": "off", "beta": torch.tensor(3.0)}).beta == 3.0


# -- did you mean ---------------------------------------------------------------------------------


def test_did_you_mean():
    assert did_you_mean("learning_rte", ["seed", "learning_rate"]) == "learning_rate"
    assert did_you_mean("xyz", ["seed", "learning_rate"]) is None
    assert did_you_mean(None, ["None", "nine"]) == "None"  # compared as str(word)
    # the cutoff decides: 'lora' vs 'loss' is 0.5 similar
    assert did_you_mean("lora", ["loss"], cutoff=0.5) == "loss"
    assert did_you_mean("lora", ["loss"]) is None  # difflib's default 0.6


def test_did_you_mean_sites_keep_their_messages():
    with pytest.raises(ConfigError, match=r"^config: unknown section 'trainin'\. Did you mean 'training'\?$"):
        from_dict({"trainin": {}})
    with pytest.raises(ConfigError) as exc:
        from_dict({"training": {"zzzz": 1}})
    assert str(exc.value).startswith("config: unknown key 'training.zzzz'. Valid keys: adam_beta1, adam_beta2,")
    with pytest.raises(ConfigError, match=r"^Unknown preset 'lama3-v0\.2'\. Did you mean 'llama3-v0\.2'\? Available presets: "):
        load_preset_dict("lama3-v0.2")
    with pytest.raises(DataError, match=r"^f row 1: missing field 'chosen' \('choosen' looks like 'chosen': rename the column\)\. "
                                        r"Found columns: choosen, rejected\."):
        to_pair({"choosen": "a", "rejected": "b"}, "f row 1")
    with pytest.raises(UnknownLossError, match=r"\. Did you mean 'alpha_dpo'\?$"):
        get_loss("alpha-dpo")
    with pytest.raises(UnknownLossError) as exc:
        get_loss("zzzzzz")
    assert "Did you mean" not in str(exc.value)
    with pytest.raises(ValueError, match=r"^unknown parameter 'bta' for loss 'dpo'; valid keys: beta, label_smoothing\. "
                                         r"Did you mean 'beta'\?$"):
        make_params("dpo", {"bta": 1})


def test_values_is_pure_python():
    code = "import sys, alphadpo_cli.values; print('torch' in sys.modules, 'yaml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False False"
