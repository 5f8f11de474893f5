"""Tests for alphadpo_cli.losses.

Expected values are worked out on plain Python floats with math.* straight
from the formulas (paper eq. 9-12, Table 3; the semantics note), never by
calling the implementation.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from alphadpo_cli.losses import (
    AlphaDPOParams,
    LossOutput,
    MarginNormalizer,
    PreferenceLogps,
    SimPOParams,
    alpha_dpo_loss,
    compute_loss,
    make_params,
)

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]

# ---- a small fixed batch (B = 3), summed log-probs --------------------------------------
PC = [-12.0, -30.0, -8.0]  # policy chosen (sum)
PR = [-15.0, -28.0, -14.0]  # policy rejected (sum)
RC = [-13.0, -29.0, -9.0]  # reference chosen (sum)
RR = [-14.0, -29.5, -12.0]  # reference rejected (sum)
LW = [4.0, 10.0, 2.0]  # |y_w|
LL = [5.0, 7.0, 7.0]  # |y_l|


def t(xs, requires_grad=False):
    return torch.tensor(xs, dtype=F64, requires_grad=requires_grad)


def batch(pc=PC, pr=PR, rc=RC, rr=RR, lw=LW, ll=LL, **kw) -> PreferenceLogps:
    return PreferenceLogps(
        policy_chosen_logps=t(pc),
        policy_rejected_logps=t(pr),
        chosen_lengths=t(lw),
        rejected_lengths=t(ll),
        ref_chosen_logps=None if rc is None else t(rc),
        ref_rejected_logps=None if rr is None else t(rr),
        **kw,
    )


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def smoothed(x: float, eps: float) -> float:
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def zscore(gs: list[float]) -> list[float]:
    mu, sd = statistics.fmean(gs), statistics.stdev(gs)  # stdev: unbiased (N-1)
    return [(g - mu) / sd for g in gs]


def close(actual, expected, tol=1e-10):
    actual = actual.detach().tolist() if isinstance(actual, torch.Tensor) else actual
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=tol, abs_tol=tol), (actual, expected)


AVG_W = [PC[i] / LW[i] for i in range(3)]
AVG_L = [PR[i] / LL[i] for i in range(3)]
RAVG_W = [RC[i] / LW[i] for i in range(3)]
RAVG_L = [RR[i] / LL[i] for i in range(3)]


# ==========================================================================================
# Hand values, one per method
# ==========================================================================================


def test_alpha_dpo_hand_values():
    beta, gbr, alpha, eps = 2.5, 0.4, 0.2, 0.1
    out = compute_loss(
        "alpha_dpo", batch(), {"beta": beta, "gamma_beta_ratio": gbr, "alpha": alpha, "label_smoothing": eps}
    )
    g = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    # pair 0: (−12/4 − (−13/4)) − (−15/5 − (−14/5)) = 0.25 − (−0.2) = 0.45
    assert math.isclose(g[0], 0.45)
    z = zscore(g)  # no normaliser passed: a fresh EMA's first step = this batch's own stats
    m = [gbr + alpha * zi for zi in z]
    logits = [beta * (AVG_W[i] - AVG_L[i] - m[i]) for i in range(3)]
    close(out.losses, [smoothed(x, eps) for x in logits])
    close(out.margins, m)
    close(out.chosen_rewards, [beta * (AVG_W[i] - alpha * (AVG_W[i] - RAVG_W[i])) for i in range(3)])
    close(out.rejected_rewards, [beta * (AVG_L[i] - alpha * (AVG_L[i] - RAVG_L[i])) for i in range(3)])
    close(out.reward_margins, [out.chosen_rewards[i].item() - out.rejected_rewards[i].item() for i in range(3)])
    assert math.isclose(out.metrics["margin/mean"], statistics.fmean(m))
    assert math.isclose(out.metrics["margin/std"], statistics.stdev(m))
    assert math.isclose(out.metrics["margin/min"], min(m)) and math.isclose(out.metrics["margin/max"], max(m))
    assert math.isclose(out.metrics["normalizer/mu"], statistics.fmean(g))
    assert math.isclose(out.metrics["normalizer/sigma"], statistics.stdev(g))
    assert math.isclose(out.metrics["g/mean"], statistics.fmean(g))
    for key in ("margin/mean", "margin/std", "margin/min", "margin/max", "normalizer/mu", "normalizer/sigma", "g/mean"):
        assert isinstance(out.metrics[key], float)

    # The public entry point on pre-averaged inputs gives the same numbers.
    pub = alpha_dpo_loss(
        t(AVG_W), t(AVG_L), t(RAVG_W), t(RAVG_L), beta=beta, gamma_beta_ratio=gbr, alpha=alpha, label_smoothing=eps
    )
    assert isinstance(pub, LossOutput)
    close(pub.losses, [smoothed(x, eps) for x in logits])
    close(pub.margins, m)
    assert not pub.margins.requires_grad and not pub.chosen_rewards.requires_grad


def test_simpo_hand_values():
    beta, gbr, sft, eps = 2.0, 0.4, 0.5, 0.1
    out = compute_loss(
        "simpo", batch(rc=None, rr=None), SimPOParams(beta=beta, gamma_beta_ratio=gbr, sft_weight=sft, label_smoothing=eps)
    )
    # i=0: avg_w=-3, avg_l=-3 -> x = 2*(0-0.4) = -0.8
    # SFT term: the cross-entropy over all chosen tokens, (12 + 30 + 8) / (4 + 10 + 2) = 3.125;
    # pair i carries -PC[i] / mean(|y_w|) of it, so that the mean over pairs is exactly 3.125.
    token_nll = -sum(PC) / sum(LW)
    assert token_nll == 3.125
    expected = [smoothed(beta * (AVG_W[i] - AVG_L[i] - gbr), eps) + sft * (-PC[i] / (sum(LW) / 3)) for i in range(3)]
    assert math.isclose(expected[0], 0.9 * math.log1p(math.exp(0.8)) + 0.1 * math.log1p(math.exp(-0.8)) + 0.5 * 12 / (16 / 3))
    close(out.losses, expected)
    assert math.isclose(out.loss.item(), statistics.fmean(smoothed(beta * (AVG_W[i] - AVG_L[i] - gbr), eps)
                                                          for i in range(3)) + sft * 3.125, rel_tol=1e-12)
    assert math.isclose(out.metrics["nll"], 3.125, rel_tol=1e-12)
    close(out.chosen_rewards, [beta * a for a in AVG_W])
    close(out.rejected_rewards, [beta * a for a in AVG_L])
    close(out.margins, [gbr] * 3)


def test_dpo_hand_values():
    beta, eps = 0.1, 0.2
    out = compute_loss("dpo", batch(), {"beta": beta, "label_smoothing": eps})
    # log-ratios (summed): r_w = [1, -1, 1], r_l = [-1, 1.5, -2]
    r_w = [PC[i] - RC[i] for i in range(3)]
    r_l = [PR[i] - RR[i] for i in range(3)]
    assert r_w == [1.0, -1.0, 1.0] and r_l == [-1.0, 1.5, -2.0]
    close(out.losses, [smoothed(beta * (r_w[i] - r_l[i]), eps) for i in range(3)])
    close(out.chosen_rewards, [beta * x for x in r_w])
    close(out.rejected_rewards, [beta * x for x in r_l])
    close(out.margins, [0.0] * 3)
    # without smoothing, pair 0: -log sigma(0.2) = log(1 + e^-0.2)
    plain = compute_loss("dpo", batch(), {"beta": beta})
    assert math.isclose(plain.losses[0].item(), math.log(1 + math.exp(-0.2)), rel_tol=1e-12)


def test_ipo_hand_values_length_averaged():
    tau = 0.5
    out = compute_loss("ipo", batch(), {"tau": tau})
    h = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    # pair 0: (−3 − (−3.25)) − (−3 − (−2.8)) = 0.25 + 0.2 = 0.45 ; target 1/(2·0.5) = 1
    assert math.isclose(h[0], 0.45)
    close(out.losses, [(x - 1.0) ** 2 for x in h])
    assert math.isclose(out.losses[0].item(), 0.55**2)
    close(out.margins, [1.0] * 3)


def test_cpo_hand_values():
    beta, w = 0.1, 1.0
    out = compute_loss("cpo", batch(rc=None, rr=None), {"beta": beta, "nll_weight": w})
    pref = [-logsig(beta * (PC[i] - PR[i])) for i in range(3)]
    # the NLL weighs every chosen token equally: (12 + 30 + 8) / (4 + 10 + 2) = 3.125, not the
    # mean of the per-sequence means (3 + 3 + 4) / 3 = 3.333...
    assert math.isclose(out.loss.item(), statistics.fmean(pref) + w * 3.125, rel_tol=1e-12)
    assert math.isclose(out.metrics["nll"], 3.125, rel_tol=1e-12)
    # pair 0: -log sigma(0.1*(-12+15)) + 12 / (16/3)
    assert math.isclose(out.losses[0].item(), math.log1p(math.exp(-0.3)) + 12 * 3 / 16, rel_tol=1e-12)
    close(out.chosen_rewards, [beta * x for x in PC])
    # the per-sequence mean stays available as a named option
    seq = compute_loss("cpo", batch(rc=None, rr=None), {"beta": beta, "nll_weight": w, "nll_reduction": "sequence"})
    close(seq.losses, [pref[i] + w * (-PC[i] / LW[i]) for i in range(3)])
    assert math.isclose(seq.loss.item(), statistics.fmean(pref) + (3 + 3 + 4) / 3, rel_tol=1e-12)


def test_kto_hand_values():
    beta = 0.1
    # (a) r_w = [1, -1, 1] (mean 1/3), r_l = [-1, 1.5, -2] (mean -0.5 -> clamped to 0).
    # The chosen term uses the rejected half's estimate, the rejected term the chosen half's.
    out = compute_loss("kto", batch(), {"beta": beta})
    r_w, r_l = [1.0, -1.0, 1.0], [-1.0, 1.5, -2.0]
    kl_w, kl_l = max(0.0, statistics.fmean(r_w)), max(0.0, statistics.fmean(r_l))
    assert math.isclose(kl_w, 1 / 3) and kl_l == 0.0
    expected = [0.5 * ((1 - sig(beta * (r_w[i] - kl_l))) + (1 - sig(beta * (kl_w - r_l[i])))) for i in range(3)]
    close(out.losses, expected)
    close(out.margins, [kl_l] * 3)
    assert math.isclose(out.metrics["kl/chosen"], 1 / 3) and out.metrics["kl/rejected"] == 0.0
    # (b) lower the reference by 1 nat everywhere: r -> r + 1, both estimates positive; λ weights
    out = compute_loss(
        "kto", batch(rc=[x - 1 for x in RC], rr=[x - 1 for x in RR]), {"beta": beta, "lambda_w": 2.0, "lambda_l": 0.5}
    )
    r_w, r_l = [x + 1 for x in r_w], [x + 1 for x in r_l]
    kl_w, kl_l = statistics.fmean(r_w), statistics.fmean(r_l)
    assert math.isclose(kl_w, 4 / 3) and math.isclose(kl_l, 0.5)
    expected = [0.5 * (2.0 * (1 - sig(beta * (r_w[i] - kl_l))) + 0.5 * (1 - sig(beta * (kl_w - r_l[i]))))
                for i in range(3)]
    close(out.losses, expected)
    close(out.margins, [kl_l] * 3)
    close(out.chosen_rewards, [beta * x for x in r_w])


def test_kto_is_the_mean_over_2b_examples_and_half_at_the_reference():
    # policy = reference: every example's loss is 1 - σ(0) = 0.5, so the loss is 0.5 (a per-pair
    # sum would give 1.0: twice the paper's loss and gradient)
    same = batch(rc=PC, rr=PR)
    out = compute_loss("kto", same, {"beta": 0.1})
    close(out.losses, [0.5] * 3)
    assert out.loss.item() == 0.5
    # the gradient is that of the mean over the 2B examples: d/d pc_i of ½·(1 − σ(β r_w,i)) / B
    # at r = 0 is −½·β·σ'(0) / B = −β / (8B)
    pc = t(PC, requires_grad=True)
    inp = PreferenceLogps(pc, t(PR), t(LW), t(LL), t(PC), t(PR))
    compute_loss("kto", inp, {"beta": 0.1}).loss.backward()
    close(pc.grad, [-0.1 / (8 * 3)] * 3, tol=1e-12)


def test_kto_reference_estimate_is_detached():
    pr = t(PR, requires_grad=True)
    inp = PreferenceLogps(t(PC), pr, t(LW), t(LL), t(RC), t(RR))
    compute_loss("kto", inp, {"beta": 0.1}).loss.backward()
    # only the rejected term touches pr. With the estimate kl_l (the mean of r_l) detached,
    # d/d pr_i of ½·λ_l·(1 − σ(β·(kl_w − r_l,i)))/B is +½·β·σ'(β·(kl_w − r_l,i))/B; a gradient
    # through kl_l would add a term to every pair's chosen loss.
    r_l = [PR[i] - RR[i] for i in range(3)]
    kl_w = max(0.0, statistics.fmean(PC[i] - RC[i] for i in range(3)))
    expected = [0.5 * 0.1 * sig(0.1 * (kl_w - r)) * (1 - sig(0.1 * (kl_w - r))) / 3 for r in r_l]
    close(pr.grad, expected, tol=1e-12)


def test_orpo_hand_values():
    lam = 0.5
    out = compute_loss("orpo", batch(rc=None, rr=None), {"lam": lam})

    def log_odds(p):  # log(p / (1 - p)) with p = exp(mean log-prob)
        return p - math.log(1 - math.exp(p))

    ratio = [lam * logsig(log_odds(AVG_W[i]) - log_odds(AVG_L[i])) for i in range(3)]
    # pair 0: avg_w = avg_l = -3 -> odds ratio 0 -> its NLL share 12/(16/3) - 0.5*log(1/2)
    assert math.isclose(out.losses[0].item(), 12 * 3 / 16 + 0.5 * math.log(2), rel_tol=1e-12)
    close(out.losses, [-PC[i] / (sum(LW) / 3) - ratio[i] for i in range(3)])
    # token-weighted NLL (12 + 30 + 8)/16 with unequal lengths, not the mean of means
    assert math.isclose(out.loss.item(), 3.125 - statistics.fmean(ratio), rel_tol=1e-12)
    seq = compute_loss("orpo", batch(rc=None, rr=None), {"lam": lam, "nll_reduction": "sequence"})
    close(seq.losses, [-AVG_W[i] - ratio[i] for i in range(3)])
    # stable near p̄ -> 0 (probability -> 1) and finite gradient
    pc = torch.tensor([-1e-9, -1e-3], dtype=torch.float32, requires_grad=True)
    near = PreferenceLogps(pc, torch.tensor([-2.0, -2.0]), torch.ones(2), torch.ones(2))
    loss = compute_loss("orpo", near).losses.sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all()


def test_rdpo_hand_values():
    beta, alpha = 0.1, 0.05
    out = compute_loss("rdpo", batch(), {"beta": beta, "alpha": alpha})
    r_w, r_l = [1.0, -1.0, 1.0], [-1.0, 1.5, -2.0]
    length_term = [alpha * LW[i] - alpha * LL[i] for i in range(3)]  # [-0.05, 0.15, -0.25]
    # R-DPO paper: the logit gains +α(|y_w| − |y_l|) (Table 3 of the α-DPO paper prints −)
    close(out.losses, [-logsig(beta * (r_w[i] - r_l[i]) + length_term[i]) for i in range(3)])
    close(out.margins, [-x / beta for x in length_term])


def test_rdpo_longer_chosen_explains_the_preference():
    # h = 0 (policy = reference) and |y_w| − |y_l| = 100: with α = 0.1 the logit is +10, so the
    # loss is log(1 + e^-10) ≈ 4.5e-5, near 0 (the Table 3 sign would give ≈ 10)
    inp = PreferenceLogps(t([-50.0]), t([-20.0]), t([150.0]), t([50.0]), t([-50.0]), t([-20.0]))
    out = compute_loss("rdpo", inp, {"beta": 0.1, "alpha": 0.1})
    assert math.isclose(out.losses[0].item(), math.log1p(math.exp(-10.0)), rel_tol=1e-12)
    assert out.losses[0].item() < 1e-4


# ==========================================================================================
# α-DPO properties
# ==========================================================================================


def _random_batch(B=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randint(3, 40, (B,), generator=g).to(F64)
    ll = torch.randint(3, 40, (B,), generator=g).to(F64)
    pc = -(torch.rand(B, generator=g, dtype=F64) * 2 + 0.2) * lw
    pr = -(torch.rand(B, generator=g, dtype=F64) * 2 + 0.2) * ll
    rc = pc + torch.randn(B, generator=g, dtype=F64)
    rr = pr + torch.randn(B, generator=g, dtype=F64)
    tensors = [x.clone().requires_grad_(requires_grad) for x in (pc, pr, rc, rr)]
    return PreferenceLogps(tensors[0], tensors[1], lw, ll, tensors[2], tensors[3])


def test_alpha_zero_is_simpo():
    inp = _random_batch()
    for a_name, s_name in (("alpha_dpo", "simpo"), ("alpha_dpo_sum", "simpo_sum")):
        a = compute_loss(a_name, inp, {"beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.0, "label_smoothing": 0.1})
        s = compute_loss(s_name, inp, {"beta": 2.5, "gamma_beta_ratio": 0.3, "label_smoothing": 0.1})
        torch.testing.assert_close(a.losses, s.losses, atol=1e-7, rtol=0)
        torch.testing.assert_close(a.margins, s.margins, atol=1e-7, rtol=0)


def test_gradients_reference_zero_and_policy_equals_simpo_at_same_logit():
    inp = _random_batch(requires_grad=True)
    norm = MarginNormalizer("ema")
    norm(torch.randn(16, dtype=F64))  # some history, so the margin is not the plain batch z-score
    params = AlphaDPOParams(beta=2.5, gamma_beta_ratio=0.3, alpha=0.2)
    out = compute_loss("alpha_dpo", inp, params, norm)
    out.losses.sum().backward()
    for ref in (inp.ref_chosen_logps, inp.ref_rejected_logps):
        assert ref.grad is None or torch.all(ref.grad == 0)
    # SimPO with gamma_beta_ratio = m_i on pair i has the same logit, hence the same gradient.
    for i in range(len(out.losses)):
        pc = inp.policy_chosen_logps.detach()[i : i + 1].clone().requires_grad_(True)
        pr = inp.policy_rejected_logps.detach()[i : i + 1].clone().requires_grad_(True)
        single = PreferenceLogps(pc, pr, inp.chosen_lengths[i : i + 1], inp.rejected_lengths[i : i + 1])
        s = compute_loss("simpo", single, {"beta": 2.5, "gamma_beta_ratio": out.margins[i].item()})
        torch.testing.assert_close(s.losses[0], out.losses[i].detach(), atol=1e-12, rtol=0)
        s.losses.sum().backward()
        torch.testing.assert_close(pc.grad[0], inp.policy_chosen_logps.grad[i], atol=1e-12, rtol=0)
        torch.testing.assert_close(pr.grad[0], inp.policy_rejected_logps.grad[i], atol=1e-12, rtol=0)


def test_no_stop_gradient_same_value_different_gradient():
    def grads(name, normalization):
        inp = _random_batch(requires_grad=True)
        out = compute_loss(name, inp, {"alpha": 0.2, "normalization": normalization})
        out.losses.sum().backward()
        return out, inp

    sg, inp_sg = grads("alpha_dpo", "batch")
    nsg, inp_nsg = grads("alpha_dpo_no_sg", "batch")
    torch.testing.assert_close(sg.losses.detach(), nsg.losses.detach())  # forward value identical
    assert not torch.allclose(inp_sg.policy_chosen_logps.grad, inp_nsg.policy_chosen_logps.grad)
    assert inp_nsg.ref_chosen_logps.grad is None  # the reference is a constant in every variant

    # Closed form without normalisation: logit = β(Δθ − γ/β − α(Δθ − Δref)), so
    # ∂L_i/∂logp_θ(w)_i = −σ(−logit_i)·β(1−α)/|y_w|.
    beta, gbr, alpha = 2.5, 0.5, 0.2
    inp = _random_batch(requires_grad=True)
    out = compute_loss("alpha_dpo_no_sg", inp, {"beta": beta, "gamma_beta_ratio": gbr, "alpha": alpha, "normalization": "none"})
    out.losses.sum().backward()
    for i in range(len(out.losses)):
        pw = inp.policy_chosen_logps[i].item() / inp.chosen_lengths[i].item()
        pl = inp.policy_rejected_logps[i].item() / inp.rejected_lengths[i].item()
        rw = inp.ref_chosen_logps[i].item() / inp.chosen_lengths[i].item()
        rl = inp.ref_rejected_logps[i].item() / inp.rejected_lengths[i].item()
        logit = beta * ((pw - pl) - gbr - alpha * ((pw - pl) - (rw - rl)))
        expected = -sig(-logit) * beta * (1 - alpha) / inp.chosen_lengths[i].item()
        assert math.isclose(inp.policy_chosen_logps.grad[i].item(), expected, rel_tol=1e-9)


# ==========================================================================================
# the README's "Using the losses in your own trainer" example runs
# ==========================================================================================


def test_readme_example_runs():
    text = (REPO / "README.md").read_text()
    section = text.split("## Using the losses in your own trainer", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's losses section has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "docs_example"})


@pytest.mark.parametrize("name, key, value", [
    ("kto", "lambda_w", 0.0), ("cpo", "nll_weight", -1.0), ("simpo", "sft_weight", -0.5),
    ("alpha_dpo", "alpha", -0.1), ("alpha_dpo", "normalizer_momentum", 1.0), ("rdpo", "alpha", float("nan")),
    ("ipo", "tau", 0.0), ("dpo", "label_smoothing", 0.5),
])
def test_the_library_refuses_out_of_range_parameters(name, key, value):
    # the same ranges the config checks (alphadpo_cli.ranges), enforced by the dataclasses themselves
    with pytest.raises(ValueError, match=rf"{key}.*(out of range|must be finite)"):
        make_params(name, {key: value})


# ==========================================================================================
# Metrics: kept as tensors by the loss, floats when read
# ==========================================================================================


def test_metrics_stay_tensors_until_read():
    out = compute_loss("alpha_dpo", batch())
    raw = out.metrics.tensors()
    assert set(raw) == set(out.metrics)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in raw.values())
    g = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    assert math.isclose(out.metrics["g/mean"], statistics.fmean(g)) and isinstance(out.metrics["g/mean"], float)
    assert dict(out.metrics) == {k: float(v) for k, v in raw.items()}
    with pytest.raises(KeyError):
        out.metrics["nope"]
    assert dict(compute_loss("dpo", batch()).metrics) == {}


def test_importing_the_losses_stays_light():
    import subprocess
    import sys

    code = "import sys, alphadpo_cli.losses; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
