"""The default margin normaliser trains the same α-DPO whatever the hardware layout of a step.

Three layouts of the same 8-pair optimiser steps, through the real trainer (`Trainer.run` with the
models injected): 1 process × batch 8; 1 process × batch 2 × accumulation 4; 2 processes (gloo on
127.0.0.1) × batch 2 × accumulation 2. Each pair's z and loss, and the weights after 3 steps, must
agree to 1e-6 (the tiny model in float64: see DTYPE). The reference is a second tiny model (another seed), so g has a real spread from
step 1 on and the statistics matter at every step (with the policy as its own reference, g would be
rounding noise at step 1, and σ would sit at its floor). Before pooling, each micro-batch updated
the statistics from its own 8, 2 or 2 × 2 gathered values: z differed from step 1 on.

Then hand-worked unit tests of the pooling and the lag (`begin_step`/`end_step`), the skipped step,
mid-step checkpoints, and the official mode's per-micro-batch updates and few-values warning.
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import warnings
from pathlib import Path

import pytest
import torch

from alphadpo_cli.losses import MarginNormalizer, compute_loss, make_normalizer
from helpers import run_in_two_processes

PREFS = Path(__file__).resolve().parent / "fixtures" / "prefs"
STEPS = 3
ALPHA, GBR = 0.5, 0.5
# The models run in float64 (injected; the config's dtype stays fp32): in fp32, the rounding of g
# (~5e-7 on per-token log-probs of ~−5.5), divided by σ(g) (~0.02 here), already moves z by ~1e-5
# between layouts whatever the normaliser does; in float64 the layouts agree to ~1e-15, so 1e-6 is a
# wide margin, and the old per-micro-batch statistics miss it by O(1).
DTYPE = torch.float64
SETS = [
    f"data.dataset={PREFS}", "data.eval_split=null", f"data.max_samples={8 * STEPS}", f"training.max_steps={STEPS}",
    "training.warmup_ratio=0", "training.global_batch_size=8", "training.logging_steps=1", "model.mode=full",
    "training.precompute_ref=true", "training.learning_rate=1e-4", "loss.name=alpha_dpo",
    f"loss.params.alpha={ALPHA}", f"loss.params.gamma_beta_ratio={GBR}",
]


def _layout_run(out: Path, per_device: int) -> dict:
    """Train the tiny policy against a different tiny reference in this process (whatever process
    group accelerate finds); returns {index: (z, loss, step)}, the final weights and the logged rows."""
    from rich.console import Console

    import alphadpo_cli.train.step as step_mod
    import alphadpo_cli.train.trainer as trainer_mod
    from alphadpo_cli.config import resolve_config
    from alphadpo_cli.models.loading import build_tiny_model, freeze, load_models

    cfg = resolve_config(preset="tiny", overrides=[*SETS, f"training.output_dir={out}",
                                                   f"training.per_device_batch_size={per_device}"])
    seen: list = []
    real_forward, real_loss = step_mod.forward, trainer_mod.compute_loss

    def forward(parts, objective, batch, reference):
        seen.append({"index": batch["index"].tolist()})
        return real_forward(parts, objective, batch, reference)

    def compute_loss_spy(name, inputs, params=None, normalizer=None):
        out_ = real_loss(name, inputs, params, normalizer)
        seen[-1].update(margins=out_.margins.tolist(), losses=out_.losses.tolist(), step=normalizer.steps)
        return out_

    step_mod.forward, trainer_mod.compute_loss = forward, compute_loss_spy
    try:
        tr = trainer_mod.Trainer(cfg, console=Console(file=io.StringIO()), overwrite=True)
        models = load_models(cfg.model, cfg.lora, need_reference_model=False)
        reference = build_tiny_model(cfg.model, len(models.tokenizer), seed=1)
        reference.config.use_cache = False
        freeze(reference)
        models = dataclasses.replace(models, reference=reference, fingerprint=models.fingerprint + "+reference-seed-1")
        models.policy.to(DTYPE)
        reference.to(DTYPE)
        tr.run(models=models)
    finally:
        step_mod.forward, trainer_mod.compute_loss = real_forward, real_loss
    pairs = {}
    for call in seen:
        for i, idx in enumerate(call["index"]):
            pairs[idx] = ((call["margins"][i] - GBR) / ALPHA, call["losses"][i], call["step"])
    weights = {k: v.detach().clone() for k, v in models.policy.state_dict().items()}
    from helpers import read_metrics

    return {"pairs": pairs, "weights": weights, "rows": read_metrics(out) if tr.is_main else None}


@pytest.mark.slow
def test_default_normalizer_is_the_same_in_every_layout(tmp_path, one_torch_thread):
    one = _layout_run(tmp_path / "b8", per_device=8)  # 1 process, batch 8, accumulation 1
    acc = _layout_run(tmp_path / "b2x4", per_device=2)  # 1 process, batch 2, accumulation 4
    ranks = run_in_two_processes(_layout_run, tmp_path / "two", per_device=2)
    two = {"pairs": {**ranks[0]["pairs"], **ranks[1]["pairs"]}, "weights": ranks[0]["weights"],
           "rows": ranks[0]["rows"]}

    assert sorted(one["pairs"]) == list(range(8 * STEPS))  # every pair once, one epoch
    for name, other in (("1 process, batch 2 x accumulation 4", acc), ("2 processes, batch 2 x accumulation 2", two)):
        assert sorted(other["pairs"]) == sorted(one["pairs"]), name
        for idx, (z, loss, step) in one["pairs"].items():
            oz, oloss, ostep = other["pairs"][idx]
            assert ostep == step, (name, idx)  # the same pairs in the same optimiser step
            assert oz == pytest.approx(z, rel=1e-6, abs=1e-6), (name, idx, "z")
            assert oloss == pytest.approx(loss, rel=1e-6, abs=1e-6), (name, idx, "loss")
        for key, w in one["weights"].items():
            torch.testing.assert_close(other["weights"][key], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {key}: {m}")
        for a, b in zip(one["rows"], other["rows"]):
            for key in ("normalizer/mu", "normalizer/sigma", "loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (name, a["step"], key)
    # what was compared means something: statistics of whole steps, a lag of one step ...
    zs = torch.tensor([one["pairs"][i][0] for i in range(8 * STEPS)], dtype=torch.float64)
    steps = [one["pairs"][i][2] for i in range(8 * STEPS)]
    assert sorted(set(steps)) == [0, 1, 2]  # the statistics a pair saw: none yet, after step 1, after step 2
    first = torch.tensor([s == 0 for s in steps])
    assert torch.all(zs[first] == 0)  # step 1: no statistics yet, z = 0 (the margin is γ/β)
    assert zs[~first].std() > 0.5  # later steps: g really z-scored (reference ≠ policy: g spreads)
    # ... and it trained: the weights moved
    init = _initial_weights()
    assert max((one["weights"][k] - init[k].to(DTYPE)).abs().max().item() for k in init) > 2e-4  # 3 Adam steps of 1e-4


def _initial_weights() -> dict:
    from alphadpo_cli.config import resolve_config
    from alphadpo_cli.models.loading import load_models

    cfg = resolve_config(preset="tiny", overrides=SETS)
    return {k: v.detach().clone() for k, v in load_models(cfg.model, cfg.lora, need_reference_model=False).policy.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# pooling and the one-step lag, by hand


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def zscore(gs, mu, sd):
    return [(g - mu) / sd for g in gs]


# one optimiser step = these micro-batches (any split of the same 6 values gives the same statistics)
STEP1 = [[0.1, 0.5], [-0.3, 0.9], [0.2, 0.4]]
STEP2 = [[1.0, -1.0, 0.5], [2.0, 0.0, 0.25]]
STEP3 = [[0.3, 0.6, 0.9, -0.2]]


def _run_steps(norm, steps):
    zs = []
    for micro in steps:
        norm.begin_step()
        zs.append([norm(t(g)).tolist() for g in micro])
        norm.end_step()
    return zs


def test_ema_pools_each_step_and_normalises_with_the_previous_ones():
    norm = MarginNormalizer("ema", momentum=0.9)
    zs = _run_steps(norm, [STEP1, STEP2, STEP3])
    flat = [sum(s, []) for s in (STEP1, STEP2, STEP3)]
    # step 1: no statistics yet -> z = 0 for every micro-batch
    assert zs[0] == [[0.0, 0.0]] * 3
    # after step 1: exactly the statistics of its 6 values (bias correction), used by all of step 2
    mu1, sd1 = statistics.fmean(flat[0]), statistics.stdev(flat[0])
    for got, g in zip(zs[1], STEP2):
        assert got == pytest.approx(zscore(g, mu1, sd1), rel=1e-12)
    # after step 2: bias-corrected EMA of the two steps' statistics (one update per step)
    a_mu = 0.9 * 0.1 * mu1 + 0.1 * statistics.fmean(flat[1])
    a_sd = 0.9 * 0.1 * sd1 + 0.1 * statistics.stdev(flat[1])
    mu2, sd2 = a_mu / (1 - 0.9**2), a_sd / (1 - 0.9**2)
    assert zs[2][0] == pytest.approx(zscore(STEP3[0], mu2, sd2), rel=1e-12)
    assert norm.steps == 3
    a_mu = 0.9 * a_mu + 0.1 * statistics.fmean(flat[2])
    a_sd = 0.9 * a_sd + 0.1 * statistics.stdev(flat[2])
    assert (norm.mu, norm.sigma) == pytest.approx((a_mu / (1 - 0.9**3), a_sd / (1 - 0.9**3)), rel=1e-12)


def test_the_split_of_a_step_does_not_matter():
    # the same steps cut as one micro-batch each, or as singletons: identical statistics and z
    whole = MarginNormalizer("ema")
    cut = MarginNormalizer("ema")
    z_whole = _run_steps(whole, [[sum(s, [])] for s in (STEP1, STEP2, STEP3)])
    z_cut = _run_steps(cut, [[[g] for g in sum(s, [])] for s in (STEP1, STEP2, STEP3)])
    flat = lambda zs: [z for step in zs for micro in step for z in micro]  # noqa: E731
    assert flat(z_whole) == pytest.approx(flat(z_cut), rel=1e-14)
    assert (whole.mu, whole.sigma, whole.steps) == pytest.approx((cut.mu, cut.sigma, cut.steps), rel=1e-14)
    # per-call (no steps), the two cuts differ: what the trainer did before
    a, b = MarginNormalizer("ema"), MarginNormalizer("ema")
    for s in (STEP1, STEP2):
        a(t(sum(s, [])))
        for g in s:
            b(t(g))
    assert a.mu != pytest.approx(b.mu, rel=1e-6)


def test_batch_mode_uses_the_previous_steps_global_batch():
    norm = MarginNormalizer("batch")
    zs = _run_steps(norm, [STEP1, STEP2])
    assert zs[0] == [[0.0, 0.0]] * 3
    flat1 = sum(STEP1, [])
    for got, g in zip(zs[1], STEP2):
        assert got == pytest.approx(zscore(g, statistics.fmean(flat1), statistics.stdev(flat1)), rel=1e-12)
    flat2 = sum(STEP2, [])
    assert (norm.mu, norm.sigma) == pytest.approx((statistics.fmean(flat2), statistics.stdev(flat2)), rel=1e-12)
    # σ floored at eps: identical g in a step
    norm.begin_step()
    norm(t([0.7, 0.7]))
    norm.end_step()
    assert (norm.mu, norm.sigma) == pytest.approx((0.7, 1e-3))


def test_skipped_frozen_and_non_finite_steps_leave_the_statistics():
    norm = MarginNormalizer("ema")
    _run_steps(norm, [STEP1])
    before = (norm.mu, norm.sigma, norm.steps)
    norm.begin_step()
    norm(t([5.0, 6.0]))
    assert norm.end_step(update=False) == 0  # the trainer's skipped (non-finite) step
    assert (norm.mu, norm.sigma, norm.steps) == before
    norm.begin_step()
    norm(t([1.0, float("nan")]))
    assert norm.end_step() == 0  # a non-finite g never reaches the statistics
    assert (norm.mu, norm.sigma, norm.steps) == before
    norm.begin_step()
    with norm.frozen():
        z = norm(t([5.0, 6.0]))  # normalised, not pooled
    assert norm.end_step() == 0 and (norm.mu, norm.sigma, norm.steps) == before
    assert z.tolist() == pytest.approx(zscore([5.0, 6.0], before[0], before[1]))
    norm.begin_step()
    norm(t([5.0, 6.0]))
    assert norm.end_step() == 2 and norm.steps == before[2] + 1
    with pytest.raises(RuntimeError, match="begin_step"):
        norm.end_step()


def test_state_dict_carries_an_open_step():
    a = MarginNormalizer("ema")
    _run_steps(a, [STEP1])
    a.begin_step()
    a(t(STEP2[0]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MarginNormalizer("ema")
    b.load_state_dict(torch.load(buf))
    assert b.in_step and (b.mu, b.sigma, b.steps) == (a.mu, a.sigma, a.steps)
    for n in (a, b):
        n(t(STEP2[1]))
        n.end_step()
    assert (b.mu, b.sigma, b.steps) == (a.mu, a.sigma, a.steps)
    # a state saved before steps were pooled loads as "between steps"
    old = {k: v for k, v in a.state_dict().items() if k not in ("in_step", "pending", "warned_few")}
    c = MarginNormalizer("ema")
    c.load_state_dict(old)
    assert not c.in_step and (c.mu, c.sigma, c.steps) == (a.mu, a.sigma, a.steps)


def test_standalone_calls_are_steps_of_their_own():
    # no trainer: each call updates from its own batch before normalising (the documented API)
    g = [0.1, 0.4, -0.2]
    for mode in ("ema", "batch"):
        z = MarginNormalizer(mode)(t(g))
        assert z.tolist() == pytest.approx(zscore(g, statistics.fmean(g), statistics.stdev(g)), rel=1e-12)
    # and a frozen call before any statistics gives z = 0 (μ = 0, σ = ∞)
    norm = MarginNormalizer("ema")
    with norm.frozen():
        assert norm(t(g)).tolist() == [0.0, 0.0, 0.0]
    assert (norm.mu, norm.sigma) == (0.0, math.inf)


def test_official_updates_every_call_inside_a_step_and_warns_on_few_values():
    norm = make_normalizer("alpha_dpo_official")
    mu = sigma = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm.begin_step()
        for g in STEP1:  # three micro-batches of 2 values: three updates, each before normalising
            z = norm(t(g))
            mu = 0.9 * mu + 0.1 * statistics.fmean(g)
            sigma = 0.9 * sigma + 0.1 * statistics.stdev(g)
            assert z.tolist() == pytest.approx(zscore(g, mu, sigma), rel=1e-12)
        assert norm.end_step() == 0 and norm.steps == 3
    few = [w for w in caught if "fewer than 8" in str(w.message)]
    assert len(few) == 1 and "2 values" in str(few[0].message)  # once per normaliser
    # 8 values: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MarginNormalizer("official")(t([float(i) for i in range(8)]))
    assert not [w for w in caught if "fewer than 8" in str(w.message)]


def test_loss_inside_a_step_uses_the_lagged_statistics():
    from test_losses import AVG_L, AVG_W, RAVG_L, RAVG_W, batch

    norm = make_normalizer("alpha_dpo")
    norm.begin_step()
    first = compute_loss("alpha_dpo", batch(), normalizer=norm)
    norm.end_step()
    assert first.margins.tolist() == pytest.approx([0.5] * 3, abs=1e-15)  # step 1: z = 0, SimPO's margin
    g = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    assert (first.metrics["normalizer/mu"], first.metrics["normalizer/sigma"]) == (0.0, math.inf)
    norm.begin_step()
    second = compute_loss("alpha_dpo", batch(), normalizer=norm)
    norm.end_step()
    mu, sd = statistics.fmean(g), statistics.stdev(g)
    assert second.margins.tolist() == pytest.approx([0.5 + 0.05 * z for z in zscore(g, mu, sd)], rel=1e-12)
