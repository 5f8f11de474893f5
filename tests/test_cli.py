"""The `alphadpo` command: every command group registered, `--help` without torch, errors by type."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from alphadpo_cli.cli import friendly, main

COMMANDS = {"train", "presets", "losses", "eval", "margins", "data"}


def test_every_command_group_is_registered():
    assert set(main.commands) == COMMANDS
    assert set(main.commands["presets"].commands) == {"list", "show"}
    assert set(main.commands["eval"].commands) == {"alpacaeval", "arena-hard", "preference", "reward"}


@pytest.mark.parametrize("args", [[], ["train"], ["presets"], ["presets", "show"], ["losses"], ["eval"],
                                  ["eval", "preference"], ["eval", "reward"], ["margins"], ["data"], ["data", "build"]])
def test_help_is_instant_no_torch(args):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom alphadpo_cli.cli import main\n"
            f"r = CliRunner().invoke(main, {args + ['--help']!r})\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_python_dash_m_runs_the_same_command():
    out = subprocess.run([sys.executable, "-m", "alphadpo_cli.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert f"  {name} " in out.stdout


def _command(exc: BaseException) -> click.Command:
    @click.command()
    @friendly
    def boom():
        raise exc

    return boom


@pytest.mark.parametrize("make", [
    lambda: __import__("alphadpo_cli.config", fromlist=["ConfigError"]).ConfigError("bad key"),
    lambda: __import__("alphadpo_cli.data", fromlist=["MissingSplitError"]).MissingSplitError("bad key"),
    lambda: __import__("alphadpo_cli.losses", fromlist=["UnknownLossError"]).UnknownLossError("bad key"),
])
def test_expected_errors_are_one_line_and_exit_2(make):
    r = CliRunner().invoke(_command(make()), [])
    assert r.exit_code == 2 and "error:" in r.output and "bad key" in r.output and "Traceback" not in r.output


def test_other_errors_are_bugs_and_keep_their_traceback():
    r = CliRunner().invoke(_command(ValueError("bad key")), [])  # a plain ValueError: not matched by its text
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)
