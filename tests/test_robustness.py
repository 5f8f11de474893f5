"""Nothing lost: resume equality, signals, kill -9 during a save, non-finite steps, corrupt caches,
and bad input answered with a message instead of a traceback."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import alphadpo_cli.train.checkpoint as ckpt
import alphadpo_cli.train.setup as setup_mod
from alphadpo_cli.cli import main
from alphadpo_cli.config import ConfigError, resolve_config
from alphadpo_cli.data import TokenizeSettings, tokenize_split
from alphadpo_cli.io import cache_home
from alphadpo_cli.losses import compute_loss
from alphadpo_cli.models.loading import build_tiny_tokenizer, load_for_inference
from alphadpo_cli.train import run_dir
from alphadpo_cli.train.trainer import Trainer, TrainingStopped, train

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(out, prefs_dir, *extra):
    sets = [f"data.dataset={prefs_dir}", f"training.output_dir={out}", "data.max_samples=16", "data.max_eval_samples=4",
            "training.logging_steps=1", "training.per_device_batch_size=4", "training.global_batch_size=8",
            "training.warmup_ratio=0.2", *extra]
    return resolve_config(preset="tiny", overrides=sets)


def logged_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, prefs_dir, monkeypatch):
    # 16 pairs, 8 per step: 2 steps per epoch, so the checkpoint at step 3 is in the middle of epoch 2.
    full = train(cfg_for(tmp_path / "full", prefs_dir, "training.max_steps=6"))
    assert len(full.losses) == 6

    real_save = ckpt.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated crash right after the step-3 checkpoint")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_for(out, prefs_dir, "training.max_steps=6", "training.save_steps=3"))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert ckpt.latest_checkpoint(out).name == "step-0000003"

    resumed = train(cfg_for(out, prefs_dir, "training.max_steps=6", "training.save_steps=3"), resume=True)
    assert resumed.steps == 6
    steps_losses = logged_losses(out)
    assert [s for s, _ in steps_losses] == [1, 2, 3, 4, 5, 6]
    assert [l for _, l in steps_losses] == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    # and the normaliser state came back too (its sigma is logged)
    a = [json.loads(l)["normalizer/sigma"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l)["normalizer/sigma"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, prefs_dir):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(cfg_for(tmp_path / "o", prefs_dir), resume=True)


def _env(tmp_path):
    env = dict(os.environ)
    env["ALPHADPO_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, prefs_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "alphadpo_cli.cli", "train", "--preset", "tiny", "--dataset", str(prefs_dir),
           "-o", str(out), "--set", "training.max_steps=400", "--set", "training.logging_steps=1",
           "--set", "data.max_eval_samples=2"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "--resume" in output
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None
    stopped_at = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped_at < 400
    # Resume with a shorter horizon so the test ends quickly.
    r = subprocess.run(cmd[:-6] + ["--set", f"training.max_steps={stopped_at + 1}", "--set", "data.max_eval_samples=2",
                                   "--resume"], env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {latest}" in (r.stdout + r.stderr).replace("\n", "")


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from accelerate import Accelerator
    import alphadpo_cli.train.checkpoint as ckpt
    import alphadpo_cli.integrity as integrity

    out = Path(sys.argv[1])
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(model, opt, sched)
    ckpt.save_checkpoint(out, acc, ckpt.TrainerState(step=1))
    real_seal = integrity.seal_dir
    def slow_seal(d):
        print("WRITING", flush=True)
        time.sleep(60)
        real_seal(d)
    ckpt.seal_dir = slow_seal
    ckpt.save_checkpoint(out, acc, ckpt.TrainerState(step=2))
    """
)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    proc.kill()  # SIGKILL in the middle of the second save
    proc.wait()
    assert ckpt.latest_checkpoint(out).name == "step-0000001"
    # The half-written step-2 directory was never renamed into place.
    assert not (out / "checkpoints" / "step-0000002").exists()
    # A directory that looks complete but whose files were cut is rejected too.
    bad = out / "checkpoints" / "step-0000003"
    import shutil

    shutil.copytree(out / "checkpoints" / "step-0000001", bad)
    with open(bad / "accelerate" / "optimizer.bin", "r+b") as fh:
        fh.truncate(10)
    assert ckpt.latest_checkpoint(out).name == "step-0000001"


def test_nonfinite_steps_are_skipped_then_training_stops(tmp_path, prefs_dir):
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out.losses = out.losses * float("nan")
        return out

    def run(cfg):  # the run's loss, replaced through its seam
        trainer = Trainer(cfg)
        trainer.objective.loss_fn = sometimes_nan
        return trainer.run()

    bad_calls = {3}  # one micro-batch of step 2
    res = run(cfg_for(tmp_path / "a", prefs_dir, "training.max_steps=3"))
    assert res.steps == 3 and res.skipped_nonfinite == 1
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["nonfinite_skipped"] == 1 and rows[1]["loss"] is None
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["loss"] is not None)

    calls["n"] = 0
    bad_calls = set(range(1, 1000))
    with pytest.raises(TrainingStopped, match=r"(?s)2 non-finite steps in a row.*rows \[") as err:
        run(cfg_for(tmp_path / "b", prefs_dir, "training.max_steps=10", "training.max_nonfinite_steps=2"))
    assert err.value.checkpoint is not None and ckpt.latest_checkpoint(tmp_path / "b") == err.value.checkpoint


def test_corrupt_tokenised_cache_is_rebuilt(prefs_dir):
    tok = build_tiny_tokenizer()
    first = tokenize_split(str(prefs_dir), "train", tok, TokenizeSettings(256, 128))
    arrow = next((cache_home() / "tokenized" / first.fingerprint / "data").glob("*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])  # truncated
    again = tokenize_split(str(prefs_dir), "train", tok, TokenizeSettings(256, 128))
    assert not again.stats.cache_hit
    assert again.dataset["chosen_ids"] == first.dataset["chosen_ids"]
    assert tokenize_split(str(prefs_dir), "train", tok, TokenizeSettings(256, 128)).stats.cache_hit


def test_corrupt_reference_cache_is_rebuilt(tmp_path, prefs_dir):
    train(cfg_for(tmp_path / "a", prefs_dir, "training.max_steps=1"))
    files = sorted((cache_home() / "reference").glob("*/logps.safetensors"))
    assert files
    good = {f: f.read_bytes() for f in files}
    for f in files:
        raw = bytearray(good[f])
        raw[-1] ^= 0xFF  # one flipped byte: same size, wrong checksum
        f.write_bytes(bytes(raw))
    train(cfg_for(tmp_path / "b", prefs_dir, "training.max_steps=1"))
    for f in files:
        assert f.read_bytes() == good[f]  # recomputed: the same numbers as the first time


def test_adapter_for_another_base_model(tmp_path, prefs_dir):
    out = tmp_path / "o"
    train(cfg_for(out, prefs_dir, "training.max_steps=1"))
    with pytest.raises(ConfigError, match="was trained on base model 'tiny-random'"):
        load_for_inference("HuggingFaceTB/SmolLM2-360M-Instruct", adapter=str(out))
    model, tok = load_for_inference(str(out))  # the run's own base is found from its config
    assert hasattr(model, "disable_adapter")


def run_cli(args):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "cho', "line 2 is not valid JSON"),
        (b'{"prompt": "p", "chosen": ["x"], "rejected": "b"}\n', "field 'chosen[0]' must be a message object"),
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', "not valid UTF-8"),
        (b"", "the file is empty"),
    ],
)
def test_bad_files_give_a_message_not_a_traceback(tmp_path, content, message):
    f = tmp_path / "train.jsonl"
    f.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("earlier output")
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(f), "-o", str(out), "--overwrite"])
    assert r.exit_code == 2, r.output
    assert message in r.output.replace("\n", " ") and str(f) in r.output.replace("\n", "")
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert (out / "earlier.txt").read_text() == "earlier output"  # nothing destroyed


def test_long_prompt_is_truncated_and_reported_or_refused(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"prompt": "z" * 500, "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n")
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(f), "-o", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0 and "1 prompts truncated" in r.output
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(f), "-o", str(tmp_path / "o"), "--dry-run",
                 "--set", "data.truncation=error"])
    assert r.exit_code == 2 and "longer than max_prompt_length" in r.output and "row 1" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "lama3-v0.2"], "Did you mean 'llama3-v0.2'"),
        (["--preset", "tiny", "--set", "training.learnin_rate=1"], "Did you mean 'learning_rate'"),
        (["--preset", "tiny", "--loss", "alpha-dpo"], "alpha_dpo"),
    ],
)
def test_config_mistakes(args, message):
    r = run_cli(["train", *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_unwritable_output_dir(tmp_path, prefs_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(blocker / "sub")])
    assert r.exit_code == 2 and "cannot write to output directory" in r.output


def test_full_disk_while_saving_keeps_earlier_output(tmp_path, prefs_dir, monkeypatch):
    out = tmp_path / "o"
    assert run_cli(["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out),
                    "--set", "training.max_steps=1"]).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "adapter_model.safetensors"))

    monkeypatch.setattr(ckpt, "save_final_model", disk_full)
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out), "--overwrite",
                 "--set", "training.max_steps=1"])
    assert r.exit_code == 2 and "disk is full" in r.output, r.output
    kept = out / run_dir.PREVIOUS / "adapter_model.safetensors"
    assert kept.read_bytes() == before  # the earlier run's model is still there
    assert str(out / run_dir.PREVIOUS) in r.output.replace("\n", "")


# --------------------------------------------------------------------------------------------
# every bad value caught before anything loads


def _first_bad_values():
    from alphadpo_cli.config import RANGES

    for key, rng in RANGES.items():
        integer = key in ("generation.stop_token_ids",) or isinstance(rng.lo, int) or isinstance(rng.hi, int)
        bad = rng.outside(integer=integer)[0]
        yield pytest.param(key, f"[{bad!r}]" if key == "generation.stop_token_ids" else repr(bad), id=key)


@pytest.mark.parametrize("key, value", list(_first_bad_values()))
def test_out_of_range_values_exit_2_with_one_message_before_loading(key, value, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(setup_mod, "load_models", no_loading)
    r = run_cli(["train", "--preset", "tiny", "--set", f"{key}={value}", "--dry-run"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert f"error: {key} = " in text and "out of range: allowed" in text and "Traceback" not in r.output


def test_out_of_range_loss_parameter_exits_2_naming_the_key():
    r = run_cli(["train", "--preset", "tiny", "--loss", "kto", "--set", "loss.params.lambda_w=-1", "--dry-run"])
    assert r.exit_code == 2 and "loss.params.lambda_w = -1" in r.output, r.output
    r = run_cli(["train", "--preset", "tiny", "--set", "loss.params.beta=0", "--dry-run"])
    assert r.exit_code == 2 and "loss.params.beta = 0" in r.output, r.output


def _fake_run(out: Path, cfg, step: int = 2, complete: bool = True) -> Path:
    """A run directory with its config.yaml and one checkpoint (complete = sealed)."""
    from alphadpo_cli.config import save_config
    from alphadpo_cli.integrity import seal_dir

    where = out / "checkpoints" / f"step-{step:07d}"
    where.mkdir(parents=True)
    (where / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        seal_dir(where)
    save_config(cfg, out / "config.yaml")
    return where


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the resume check")

    monkeypatch.setattr(setup_mod, "load_models", refuse)


def test_resume_without_a_complete_checkpoint_fails_before_loading(tmp_path, prefs_dir, no_model_loading):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(cfg_for(out, prefs_dir), resume=True)
    _fake_run(out, cfg_for(out, prefs_dir), complete=False)
    with pytest.raises(ConfigError, match=r"no complete checkpoint .*\(1 incomplete: step-0000002\)"):
        train(cfg_for(out, prefs_dir), resume=True)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        train(cfg_for(out, prefs_dir), resume=str(out / "checkpoints" / "step-0000002"))
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        train(cfg_for(out, prefs_dir), resume=str(tmp_path / "elsewhere"))
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(tmp_path / "new"), "--resume"])
    assert r.exit_code == 2 and "no complete checkpoint" in r.output and "Traceback" not in r.output


def test_resume_lists_every_changed_setting_and_refuses_breaking_ones(tmp_path, prefs_dir, no_model_loading):
    out = tmp_path / "o"
    where = _fake_run(out, cfg_for(out, prefs_dir))
    # only settings that leave the run intact: listed as warnings (then the model would load)
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    with pytest.raises(AssertionError, match="a model was loaded"):
        train(cfg_for(out, prefs_dir, "training.learning_rate=5e-4", "loss.params.alpha=0.1"), resume=True,
              console=Console(file=buf, width=200))
    text = buf.getvalue()
    assert "2 setting(s) differ from the checkpoint's config" in text
    assert "training.learning_rate: 0.001 -> 0.0005 (no effect: the checkpoint's optimiser" in text
    assert "loss.params.alpha: 0.05 -> 0.1" in text
    # model, data, tokenisation, batch geometry, loss method: refused, every difference listed
    for change in ("model.tiny_hidden_size=32", "data.max_samples=12", "data.max_length=256",
                   "training.per_device_batch_size=2", "loss.name=alpha_dpo_sum", "training.seed=1"):
        with pytest.raises(ConfigError) as err:
            train(cfg_for(out, prefs_dir, change, "training.learning_rate=5e-4"), resume=True)
        msg = str(err.value)
        assert "setting(s) differ from the checkpoint's config" in msg and "--allow-config-change" in msg, msg
        assert f"{change.split('=')[0]}: " in msg and "<- changes the run: refused" in msg
        assert "training.learning_rate: 0.001 -> 0.0005" in msg
    # ... unless explicitly allowed
    with pytest.raises(AssertionError, match="a model was loaded"):
        train(cfg_for(out, prefs_dir, "data.max_samples=12"), resume=True, allow_config_change=True)
    # the same through the CLI: exit 2, one paragraph, no traceback; the flag needs --resume
    args = ["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out), "--set", "data.max_samples=12"]
    r = run_cli([*args, "--resume"])
    assert r.exit_code == 2 and "data.max_samples: 16 -> 12" in r.output and "Traceback" not in r.output
    r = run_cli([*args, "--allow-config-change"])
    assert r.exit_code == 2 and "only applies with --resume" in r.output
    # an explicit checkpoint (or run) directory is compared with its own run's config
    with pytest.raises(ConfigError, match="data.max_samples: 16 -> 12"):
        train(cfg_for(tmp_path / "other", prefs_dir, "data.max_samples=12"), resume=str(where))
    with pytest.raises(ConfigError, match="data.max_samples: 16 -> 12"):
        train(cfg_for(tmp_path / "other", prefs_dir, "data.max_samples=12"), resume=str(out))


def test_resume_with_a_changed_learning_rate_warns_and_continues(tmp_path, prefs_dir):
    out = tmp_path / "o"
    train(cfg_for(out, prefs_dir, "training.max_steps=2", "training.save_steps=1"))
    assert ckpt.latest_checkpoint(out).name == "step-0000001"
    r = run_cli(["train", "--preset", "tiny", "--dataset", str(prefs_dir), "-o", str(out), "--resume",
                 *[x for s in ("data.max_samples=16", "data.max_eval_samples=4", "training.logging_steps=1",
                               "training.per_device_batch_size=4", "training.global_batch_size=8",
                               "training.warmup_ratio=0.2", "training.max_steps=2", "training.save_steps=1",
                               "training.learning_rate=5e-4") for x in ("--set", s)]])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "1 setting(s) differ from the checkpoint's config" in text
    assert "training.learning_rate: 0.001 -> 0.0005" in text and "resumed from" in text


def test_a_checkpoint_holds_the_trainable_weights_only_and_restores_them_the_rng_and_the_normaliser(tmp_path):
    """One path through accelerate's save_state/load_state: the weights file keeps the trainable
    parameters only (a LoRA run's frozen base would be ten times the size), and loading restores
    them, the optimiser, the registered normaliser and the RNG; a normaliser the checkpoint lacks, or
    a checkpoint of the older layout, is a clear error."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    class Holder:  # what the trainer registers: an object with state_dict/load_state_dict (the normaliser)
        def __init__(self):
            self.mu = torch.tensor(0.5)

        def state_dict(self):
            return {"mu": self.mu.clone()}

        def load_state_dict(self, state):
            self.mu = state["mu"].clone()

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # the frozen base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(model, opt, sched)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    normalizer = Holder()
    acc.register_for_checkpointing(normalizer)
    path = ckpt.save_checkpoint(tmp_path, acc, ckpt.TrainerState(step=7, epoch=1))
    after_save = torch.rand(3)
    assert sorted(load_file(str(path / "accelerate" / "model.safetensors"))) == ["1.bias", "1.weight"]

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    model(torch.ones(3, 4)).sum().backward()
    opt.step()  # another step: other weights and optimiser state
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the frozen base is not the checkpoint's to restore
    normalizer.mu = torch.tensor(9.0)
    state = ckpt.load_checkpoint(path, acc, normalizer)
    assert (state.step, state.epoch) == (7, 1)
    assert torch.equal(torch.rand(3), after_save)
    assert torch.equal(model[1].weight, saved["1.weight"]) and torch.equal(model[1].bias, saved["1.bias"])
    assert torch.equal(model[0].weight, saved["0.weight"] + 1.0)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert float(normalizer.mu) == 0.5
    with pytest.raises(ConfigError, match="holds margin normaliser state and this run's loss has none"):
        ckpt.load_checkpoint(path, acc, None)
    (path / "accelerate").rename(path / "moved")
    ckpt.seal_dir(path)
    with pytest.raises(ConfigError, match="no accelerate/ directory"):
        ckpt.load_checkpoint(path, acc, normalizer)
