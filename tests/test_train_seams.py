"""The trainer's seams, without monkeypatching: injected models and splits, the epoch/resume batch
stream, the logging window, the output directory's lifecycle, the stop signals, and the package's
`train` export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alphadpo_cli.config import ConfigError, resolve_config
from alphadpo_cli.losses import PreferenceLogps
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


# -- what the loss needs comes from its resolved parameters ----------------------------------------


def _reference_cache_entries() -> list[str]:
    from alphadpo_cli.logps.cache import ReferenceCache

    root = ReferenceCache().root
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_the_reference_is_prepared_exactly_when_the_resolved_params_read_it(tmp_path, prefs_dir):
    """alpha_dpo_policy_ref with reference_variant=ratio is alpha_dpo itself: it must train, bit for bit
    like alpha_dpo (it failed with "needs reference log-probs": no reference was prepared). alpha_dpo
    with reference_variant=policy is alpha_dpo_policy_ref itself: the same losses, and no reference
    computed (it precomputed one that nothing read)."""
    def run(name, loss, *extra):
        cfg = tiny_config(tmp_path / name, prefs_dir, f"loss.name={loss}", "loss.params={}", *extra)
        tr = Trainer(cfg)
        return tr.objective, tr.run()

    _, alpha = run("alpha", "alpha_dpo")
    assert _reference_cache_entries()  # alpha_dpo reads the reference: precomputed (and cached)
    for entry in _reference_cache_entries():
        shutil.rmtree(Path(os.environ["ALPHADPO_CACHE"]) / "reference" / entry)

    objective, ratio = run("ratio", "alpha_dpo_policy_ref", "loss.params.reference_variant=ratio")
    assert objective.needs_reference
    assert ratio.losses == alpha.losses and ratio.eval_after == alpha.eval_after
    assert _reference_cache_entries()

    for entry in _reference_cache_entries():
        shutil.rmtree(Path(os.environ["ALPHADPO_CACHE"]) / "reference" / entry)
    _, policy_ref = run("policy_ref", "alpha_dpo_policy_ref")
    objective, policy = run("policy", "alpha_dpo", "loss.params.reference_variant=policy")
    assert not objective.needs_reference
    assert policy.losses == policy_ref.losses and policy.losses != alpha.losses
    assert _reference_cache_entries() == []  # no reference pass in either run

    # the margin inspector asks the same question: per-pair scores without a reference suffice here
    from alphadpo_cli.losses import requirements
    from alphadpo_cli.margins.series import compute_series

    assert not requirements("alpha_dpo", {"reference_variant": "policy"}).needs_reference
    assert requirements("alpha_dpo_policy_ref", {"reference_variant": "ratio"}).needs_reference
    scores = PreferenceLogps(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5]), torch.tensor([3.0, 5.0]),
                             torch.tensor([4.0, 3.0]))
    series = compute_series(scores, "alpha_dpo", {"reference_variant": "policy"}, norm="none")
    same = compute_series(scores, "alpha_dpo_policy_ref", norm="none")
    assert series.loss.tolist() == same.loss.tolist()


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


def test_a_resumed_run_reuses_the_evaluation_before_training_and_times_its_own_steps(tmp_path, prefs_dir):
    """Interrupted (SIGTERM) after step 2 of 4 and resumed: the resumed session does not evaluate the
    initial model again (the report recorded before the interruption is its eval_before, equal to an
    uninterrupted run's), and its pairs/s counts its own 2 steps' 12 pairs over its own seconds."""
    from rich.console import Console

    from alphadpo_cli.train.trainer import TrainingStopped

    # 12 pairs, micro-batches of 4, 2 per step, 2 epochs: steps of 8, 4, 8 and 4 pairs
    sets = ("data.max_samples=12", "training.max_steps=-1", "training.num_epochs=2")
    full = train(tiny_config(tmp_path / "full", prefs_dir, *sets))
    out = tmp_path / "run"
    first = Trainer(tiny_config(out, prefs_dir, *sets))
    inner, calls = first.objective.loss_fn, []

    def interrupted(*args):  # the signal arrives during step 2 (its one micro-batch); step 2 completes
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(*args)

    first.objective.loss_fn = interrupted
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 2"):
        first.run()

    console = Console(record=True, width=200)
    started = time.perf_counter()
    resumed = Trainer(tiny_config(out, prefs_dir, *sets), console=console, resume=True).run()
    wall = time.perf_counter() - started
    text = console.export_text()
    assert text.count("(implicit length-normalised reward)") == 1, text  # one evaluation: after training
    assert "before training: " in text and "not evaluated again" in text, text
    assert resumed.eval_before == full.eval_before and resumed.losses == full.losses[2:]
    assert (resumed.steps, resumed.session_steps, resumed.resumed_from_step) == (4, 2, 2)
    assert resumed.pairs == 8 + 4 and full.pairs == 8 + 4 + 8 + 4  # counted as the steps took them
    assert 0 < resumed.seconds < wall and resumed.pairs_per_second == pytest.approx(resumed.pairs / resumed.seconds)
    saved = json.loads((out / "train_results.json").read_text())
    assert (saved["steps"], saved["session_steps"], saved["pairs"]) == (4, 2, 12)
    assert saved["pairs_per_second"] == pytest.approx(12 / saved["seconds"])


def test_bf16_on_a_cpu_without_bf16_instructions_is_said_once_before_the_model_loads(tmp_path, prefs_dir,
                                                                                     monkeypatch):
    from rich.console import Console

    def dry_run(dtype, native):
        monkeypatch.setenv("ALPHADPO_CPU_BF16", native)  # the detection's override (alphadpo_cli.hardware)
        console = Console(record=True, width=400)
        Trainer(tiny_config(tmp_path / "o", prefs_dir, f"model.dtype={dtype}"), console=console).run(dry_run=True)
        return console.export_text()

    text = dry_run("bf16", "0")
    assert text.count("without bf16 instructions") == 1 and "--set model.dtype=fp32" in text, text
    assert text.index("without bf16 instructions") < text.index("data: ")  # before loading model and data
    assert "without bf16 instructions" not in dry_run("bf16", "1")
    assert "without bf16 instructions" not in dry_run("fp32", "0")


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


def test_report_to_names_accelerates_trackers_and_a_missing_wandb_is_a_clear_error():
    import importlib.util

    from alphadpo_cli.config import ConfigError
    from alphadpo_cli.train.distributed import tracker_names

    assert tracker_names(["tensorboard", "none"]) == ["tensorboard"] and tracker_names([]) == []
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"--report-to wandb needs the wandb package: pip install 'alphadpo\[wandb\]'"):
            tracker_names(["tensorboard", "wandb"])
