"""Every optimiser step is the mean over its pairs, whatever the split of the step.

10 pairs at a global batch of 8 make two steps: 8 pairs, then the 2 that are left, the short last
step of the epoch. Cut as 1 process × batch 8 × accumulation 1, 1 × 4 × 2 (a short last micro-batch
of 2) and 1 × 2 × 4, and as 2 processes (gloo on 127.0.0.1) × batch 1 × accumulation 4, the two
steps see the same pairs, so their gradients (the logged norms, unclipped) and the trained weights
must be the same (to 1e-9: the tiny model runs in float64, as in tests/test_normalizer_layouts.py,
so that only the split differs, not the rounding of the log-probs). The old loop divided every
micro-loss by the full accumulation count, so the last step weighed its 2 pairs at 1/2 (batch 4) or
1/4 (batch 2, and 1 × 4 on 2 processes) of their mean: another update.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from helpers import run_in_two_processes

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"
PAIRS = 10
DTYPE = torch.float64
SETS = [
    f"data.dataset={PREFS}", "data.eval_split=null", f"data.max_samples={PAIRS}", "training.max_steps=-1",
    "training.num_epochs=1", "training.warmup_ratio=0", "training.global_batch_size=8", "training.logging_steps=1",
    "model.mode=full", "training.precompute_ref=true", "training.learning_rate=1e-3",
    "training.max_grad_norm=0",  # clipping to norm 1 would hide a wrongly scaled gradient (these norms are > 1)
]


def _layout_run(out: Path, loss: str, per_device: int) -> dict:
    """Train the tiny policy (float64) in this process (in whatever process group accelerate finds);
    the final weights, the pairs each step saw, and the logged rows."""
    from rich.console import Console

    import alphadpo_cli.train.trainer as trainer_mod
    from alphadpo_cli.config import resolve_config
    from alphadpo_cli.models.loading import load_models
    from helpers import read_metrics

    cfg = resolve_config(preset="tiny", loss=loss, overrides=[*SETS, f"training.output_dir={out}",
                                                              f"training.per_device_batch_size={per_device}"])
    steps: list[dict] = []
    real_step = trainer_mod.step

    def step(parts, objective, batches, state, **kw):
        out_ = real_step(parts, objective, batches, state, **kw)
        steps.append({"pairs": out_.pairs, "finite": out_.finite})
        return out_

    trainer_mod.step = step
    try:
        tr = trainer_mod.Trainer(cfg, console=Console(file=io.StringIO()), overwrite=True)
        models = load_models(cfg.model, cfg.lora, need_reference_model=False)
        models = dataclasses.replace(models, policy=models.policy.to(DTYPE))
        tr.run(models=models)
    finally:
        trainer_mod.step = real_step
    weights = {k: v.detach().clone() for k, v in models.policy.state_dict().items()}
    return {"weights": weights, "steps": steps, "rows": read_metrics(out) if tr.is_main else None}


def _assert_same_update(got: dict, want: dict, what: str) -> None:
    assert got["steps"] == want["steps"] == [{"pairs": 8, "finite": True}, {"pairs": 2, "finite": True}], what
    for key, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][key], w, rtol=0, atol=1e-9, msg=lambda m: f"{what}: {key}: {m}")
    for a, b in zip(want["rows"], got["rows"]):  # the same gradient; the logged loss is the step's pair mean too
        for key in ("grad_norm", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), (what, a["step"], key)


@pytest.mark.parametrize("loss", ["simpo", "dpo"])
def test_an_optimiser_step_is_the_mean_over_its_pairs_however_it_is_cut(tmp_path, one_torch_thread, loss):
    whole = _layout_run(tmp_path / "b8", loss, per_device=8)  # steps of [8] and [2]
    for per_device in (4, 2):  # [4, 4] and [2]; [2, 2, 2, 2] and [2]
        _assert_same_update(_layout_run(tmp_path / f"b{per_device}", loss, per_device), whole,
                            f"{loss}: batch {per_device} x accumulation {8 // per_device}")
    # what was compared means something: the last step moved the weights as much as a full one would
    init = _initial_weights()
    assert max((whole["weights"][k] - init[k].to(DTYPE)).abs().max().item() for k in init) > 1.5e-3  # 2 Adam steps of 1e-3


@pytest.mark.slow
def test_two_processes_cut_the_steps_into_the_same_updates(tmp_path, one_torch_thread):
    """2 processes × batch 1 × accumulation 4 (DDP, gloo): each rank's step 2 is one micro-batch of 1
    pair out of 4 micro-batches, and the gradient is averaged over the ranks, not summed."""
    whole = _layout_run(tmp_path / "b8", "simpo", per_device=8)
    ranks = run_in_two_processes(_layout_run, tmp_path / "two", loss="simpo", per_device=1)
    for key, w in ranks[0]["weights"].items():  # DDP keeps the ranks' weights identical
        assert torch.equal(ranks[1]["weights"][key], w), key
    _assert_same_update(ranks[0], whole, "simpo: 2 processes x batch 1 x accumulation 4")


def _initial_weights() -> dict:
    from alphadpo_cli.config import resolve_config
    from alphadpo_cli.models.loading import load_models

    cfg = resolve_config(preset="tiny", overrides=SETS)
    return {k: v.detach().clone() for k, v in load_models(cfg.model, cfg.lora, need_reference_model=False).policy.state_dict().items()}
