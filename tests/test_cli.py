"""The `alphadpo` command: every command group registered, `--help` without torch, errors by type."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from alphadpo_cli.cli import friendly, main

COMMANDS = {"train", "presets", "losses", "eval", "margins", "data", "iterate", "compare"}


def test_every_command_group_is_registered():
    assert set(main.commands) == COMMANDS
    assert set(main.commands["presets"].commands) == {"list", "show"}
    assert set(main.commands["eval"].commands) == {"alpacaeval", "arena-hard", "preference", "reward"}


@pytest.mark.parametrize("args", [[], ["train"], ["presets"], ["presets", "show"], ["losses"], ["eval"],
                                  ["eval", "preference"], ["eval", "reward"], ["margins"], ["data"], ["data", "build"], ["iterate"], ["compare"]])
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
    lambda: __import__("alphadpo_cli.models.sources", fromlist=["SourceError"]).SourceError("bad key"),
])
def test_expected_errors_are_one_line_and_exit_2(make):
    r = CliRunner().invoke(_command(make()), [])
    assert r.exit_code == 2 and "error:" in r.output and "bad key" in r.output and "Traceback" not in r.output


def test_other_errors_are_bugs_and_keep_their_traceback():
    r = CliRunner().invoke(_command(ValueError("bad key")), [])  # a plain ValueError: not matched by its text
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)


def test_a_config_error_is_a_click_exception_and_a_value_error():
    from alphadpo_cli.config import ConfigError

    exc = ConfigError("training.seed = -1 is out of range")
    assert isinstance(exc, click.ClickException) and isinstance(exc, ValueError)
    assert exc.exit_code == 2 and str(exc) == "training.seed = -1 is out of range"


def test_a_bad_preset_is_one_paragraph_on_stderr_exit_2_without_torch():
    """`alphadpo train --preset nope`: the message on stderr, nothing on stdout, no traceback, and the
    error path loads no torch (nothing the message needs)."""
    code = ("import json, sys\nfrom click.testing import CliRunner\nfrom alphadpo_cli.cli import main\n"
            "r = CliRunner().invoke(main, ['train', '--preset', 'nope'])\n"
            "print(json.dumps([r.exit_code, r.stdout, r.stderr, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status, stdout, stderr, torch_loaded = json.loads(out.stdout)
    assert (status, stdout, torch_loaded) == (2, "", False), out.stdout
    assert stderr.startswith("error: Unknown preset 'nope'. Available presets: demo, ") and stderr.count("\n") == 1


def test_a_full_disk_is_an_expected_error():
    r = CliRunner().invoke(_command(OSError(errno.ENOSPC, "No space left on device", "/o/model.safetensors")), [])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.startswith("error: the disk is full while writing /o/model.safetensors: free some space")


def test_interrupt_exits_130_and_a_stopped_run_with_its_own_status():
    from alphadpo_cli.train.trainer import TrainingStopped

    r = CliRunner().invoke(_command(KeyboardInterrupt()), [])
    assert r.exit_code == 130 and "interrupted" in r.stderr
    r = CliRunner().invoke(_command(TrainingStopped("stopped by SIGTERM at step 2", None, exit_code=143)), [])
    assert r.exit_code == 143 and "stopped by SIGTERM at step 2" in r.stderr and "Traceback" not in r.output
