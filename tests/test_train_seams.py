"""The trainer's seams, without monkeypatching: injected models and splits, the epoch/resume batch
stream, the logging window, the output directory's lifecycle, the stop signals, and the package's
`train` export."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alphadpo_cli.config import ConfigError, resolve_config
from alphadpo_cli.models.loading import load_models
from alphadpo_cli.stats import summary_stats
from alphadpo_cli.train import run_dir
from alphadpo_cli.train.checkpoint import TrainerState
from alphadpo_cli.train.logging import MetricWindow, average
from alphadpo_cli.train.plan import Plan
from alphadpo_cli.train.signals import StopSignals
from alphadpo_cli.train.step import epoch_batches
from alphadpo_cli.train.trainer import Trainer, train


def tiny_config(out: Path, dataset, *extra):
    sets = [f"data.dataset={dataset}", f"training.output_dir={out}", "training.max_steps=2", "data.max_samples=16",
            "data.max_eval_samples=8", "training.logging_steps=1", *extra]
    return resolve_config(preset="tiny", overrides=sets)


# -- injected models and splits -------------------------------------------------------------------


def test_injected_models_and_splits_train_exactly_like_loaded_ones(tmp_path, prefs_dir):
    loaded = train(tiny_config(tmp_path / "loaded", prefs_dir))

    # the data path does not exist: the run must train on the injected splits, never read it
    tr = Trainer(tiny_config(tmp_path / "injected", tmp_path / "no-such-data"))
    reader = Trainer(tiny_config(tmp_path / "reader", prefs_dir))
    models = load_models(tr.cfg.model, tr.cfg.lora, need_reference_model=False)  # after Trainer(): its seed
    splits = reader.load_data(models.tokenizer)
    injected = tr.run(models=models, splits=splits)

    assert tr.models is models  # the injected policy is the one trained and saved
    assert any(p.detach().abs().sum() > 0 for n, p in models.policy.named_parameters() if "lora_B" in n)
    assert injected.losses == loaded.losses  # bit for bit
    assert injected.eval_before == loaded.eval_before and injected.eval_after == loaded.eval_after
    rows = [json.loads(line) for line in (tmp_path / "injected" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_an_injected_split_sets_the_plan(tmp_path, prefs_dir, tiny_split):
    tr = Trainer(tiny_config(tmp_path / "o", tmp_path / "no-such-data", "training.per_device_batch_size=2",
                             "training.global_batch_size=2", "training.max_steps=-1"))
    split = tiny_split(6)
    plan = tr.run(dry_run=True, splits=(split, None))
    assert isinstance(plan, Plan)
    assert (plan.train_pairs, plan.eval_pairs, plan.steps_per_epoch, plan.total_steps) == (6, 0, 3, 3)
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


# -- the batch stream: epochs and resume ----------------------------------------------------------


class _Loader(list):
    def __init__(self, items):
        super().__init__(items)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_epoch_batches_run_epoch_after_epoch_and_skip_what_a_resumed_run_did(prefs_dir):
    loader = _Loader(["a", "b", "c"])
    acc = SimpleNamespace(skip_first_batches=lambda dl, n: list(dl)[n:])
    state = TrainerState()
    stream = epoch_batches(acc, loader, state)
    seen = [(next(stream), state.epoch, state.batches_in_epoch) for _ in range(4)]
    assert seen == [("a", 0, 1), ("b", 0, 2), ("c", 0, 3), ("a", 1, 1)]
    assert loader.epochs == [0, 1]

    # resumed at epoch 1 after two of its batches: the third comes first, then epoch 2
    resumed = TrainerState(step=5, epoch=1, batches_in_epoch=2)
    stream = epoch_batches(acc, loader, resumed)
    assert [next(stream) for _ in range(3)] == ["c", "a", "b"]
    assert (resumed.epoch, resumed.batches_in_epoch) == (2, 2)

    # a checkpoint at an epoch's last step (all its batches done) resumes with the next epoch
    at_end = TrainerState(epoch=0, batches_in_epoch=3)
    stream = epoch_batches(acc, loader, at_end)
    assert next(stream) == "a" and (at_end.epoch, at_end.batches_in_epoch) == (1, 1)


def test_resume_from_the_middle_of_an_epoch_continues_the_same_run(tmp_path, prefs_dir):
    # 12 pairs, 4 per micro-batch, 2 micro-batches per step: step 2 ends epoch 0 with one micro-batch,
    # step 3 takes two of epoch 1's three, step 4 the last one
    sets = ("data.max_samples=12", "training.max_steps=-1", "training.num_epochs=2", "training.save_steps=1")
    full = train(tiny_config(tmp_path / "full", prefs_dir, *sets))
    assert full.steps == 4
    out = tmp_path / "full"
    resumed = train(tiny_config(out, prefs_dir, *sets), resume=str(out / "checkpoints" / "step-0000003"))
    assert resumed.steps == 4 and resumed.losses == full.losses[3:]  # the same last step, bit for bit
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["epoch"] == 2.0


# -- the logging window ---------------------------------------------------------------------------


def test_the_window_averages_keeps_extremes_and_last_values():
    steps = [{"loss": 1.0, "margin/min": -1.0, "margin/max": 2.0, "learning_rate": 0.1, "grad_norm": None},
             {"loss": 3.0, "margin/min": -3.0, "margin/max": 1.0, "learning_rate": 0.2, "grad_norm": 4.0}]
    assert average(steps) == {"loss": 2.0, "margin/min": -3.0, "margin/max": 2.0, "learning_rate": 0.2,
                              "grad_norm": 4.0}
    window = MetricWindow()
    for m in steps:
        window.add(m, pairs=8, tokens=100)
    rec = window.record(epoch=0.5)
    assert rec["epoch"] == 0.5 and rec["pairs_per_second"] > 0
    assert rec["tokens_per_second"] == pytest.approx(rec["pairs_per_second"] * 100 / 8)
    window.reset()
    assert (window.steps, window.pairs, window.tokens) == ([], 0, 0)


def test_summary_stats_by_formula():
    x = torch.tensor([1.0, 2.0, 4.0])
    s = {k: v.item() for k, v in summary_stats("margin", x).items()}
    mean = 7 / 3
    std = (((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2) ** 0.5
    assert s == pytest.approx({"margin/mean": mean, "margin/std": std, "margin/min": 1.0, "margin/max": 4.0})
    assert summary_stats("m", torch.tensor([5.0]))["m/std"].item() == 0.0
    assert all(v.dtype == torch.float64 for v in summary_stats("m", x.half()).values())


# -- the output directory -------------------------------------------------------------------------


def test_run_dir_refuses_a_used_directory_and_sets_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    run_dir.prepare(out, overwrite=False, resume=False)  # created, writable
    assert out.is_dir() and not list(out.iterdir())
    (out / "model.bin").write_text("old")
    with pytest.raises(ConfigError, match="not empty"):
        run_dir.prepare(out, overwrite=False, resume=False)
    run_dir.prepare(out, overwrite=False, resume=True)
    run_dir.prepare(out, overwrite=True, resume=False)
    run_dir.set_previous_run_aside(out)
    assert [p.name for p in out.iterdir()] == [run_dir.PREVIOUS]
    assert run_dir.previous_run(out) == out / run_dir.PREVIOUS
    assert (out / run_dir.PREVIOUS / "model.bin").read_text() == "old"
    run_dir.prepare(out, overwrite=False, resume=False)  # a set-aside run alone is not "non-empty"
    run_dir.drop_previous_run(out)
    assert run_dir.previous_run(out) is None and not list(out.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        run_dir.prepare(tmp_path / "file", overwrite=True, resume=False)


# -- signals --------------------------------------------------------------------------------------


def test_first_signal_asks_to_stop_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    console = SimpleNamespace(print=lambda *a, **k: None)
    with StopSignals(console) as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# -- the package export ---------------------------------------------------------------------------


def test_from_alphadpo_cli_import_train_trains(tmp_path, prefs_dir):
    import alphadpo_cli.train.trainer as trainer_mod
    from alphadpo_cli import train as api_train
    from alphadpo_cli.train import Trainer as exported

    assert exported is trainer_mod.Trainer
    plan = api_train(tiny_config(tmp_path / "o", prefs_dir), dry_run=True)
    assert isinstance(plan, Plan) and plan.total_steps == 2
