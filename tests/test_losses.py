"""Tests for alphadpo_cli.losses.

Expected values are worked out on plain Python floats with math.* straight
from the formulas (paper eq. 9-12, Table 3; the semantics note), never by
calling the implementation.
"""

from __future__ import annotations

import io
import math
import re
import statistics
import warnings
from pathlib import Path

import pytest
import torch

from alphadpo_cli.losses import (
    LOSSES,
    AlphaDPOParams,
    LossOutput,
    MarginNormalizer,
    PreferenceLogps,
    SimPOParams,
    UnknownLossError,
    alpha_dpo_loss,
    compute_loss,
    get_loss,
    make_normalizer,
    make_params,
    sequence_kl,
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
# Ablation options
# ==========================================================================================


def test_ablation_no_normalization_uses_raw_g():
    gbr, alpha = 0.5, 0.05
    out = compute_loss("alpha_dpo_no_norm", batch())
    assert get_loss("alpha_dpo_no_norm").uses_normalizer is False
    g = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    close(out.margins, [gbr + alpha * x for x in g])
    # a stateful normaliser passed in is ignored by the "none" ablation
    norm = MarginNormalizer("ema")
    out2 = compute_loss("alpha_dpo_no_norm", batch(), normalizer=norm)
    close(out2.margins, [gbr + alpha * x for x in g])
    assert norm.steps == 0


def test_ablation_gamma_zero_lowers_loss_and_centres_margin():
    with_gamma = compute_loss("alpha_dpo", batch())
    no_gamma = compute_loss("alpha_dpo_no_gamma", batch())
    assert make_params("alpha_dpo_no_gamma").gamma_beta_ratio == 0.0  # the row's default (ABLATIONS)
    close(no_gamma.margins, [m - 0.5 for m in with_gamma.margins.tolist()])
    assert math.isclose(no_gamma.margins.mean().item(), 0.0, abs_tol=1e-12)  # α·z with batch z-scores
    assert torch.all(no_gamma.losses < with_gamma.losses)  # a smaller target margin is easier


@pytest.mark.parametrize(
    "name, source",
    [
        ("alpha_dpo", lambda i: (AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i])),  # U·(πθ/πref)^α
        ("alpha_dpo_policy_ref", lambda i: AVG_W[i] - AVG_L[i]),  # U·πθ^α
        ("alpha_dpo_ref_ref", lambda i: RAVG_W[i] - RAVG_L[i]),  # U·πref^α
        ("alpha_dpo_inv_ref", lambda i: -(RAVG_W[i] - RAVG_L[i])),  # U·(1/πref)^α
    ],
)
def test_ablation_reference_variants(name, source):
    beta, gbr, alpha = 2.5, 0.5, 0.05
    out = compute_loss(name, batch())
    z = zscore([source(i) for i in range(3)])
    # logit = βΔθ − γ − αβ·z(M)
    close(out.losses, [-logsig(beta * (AVG_W[i] - AVG_L[i]) - beta * gbr - alpha * beta * z[i]) for i in range(3)])
    close(out.margins, [gbr + alpha * zi for zi in z])


def test_reference_variants_relations_and_policy_needs_no_reference():
    ref = compute_loss("alpha_dpo_ref_ref", batch()).margins - 0.5
    inv = compute_loss("alpha_dpo_inv_ref", batch()).margins - 0.5
    torch.testing.assert_close(inv, -ref)
    assert get_loss("alpha_dpo_policy_ref").needs_reference is False
    no_ref = compute_loss("alpha_dpo_policy_ref", batch(rc=None, rr=None))
    with_ref = compute_loss("alpha_dpo_policy_ref", batch())
    torch.testing.assert_close(no_ref.losses, with_ref.losses)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        compute_loss("alpha_dpo", batch(rc=None, rr=None))
    with pytest.raises(ValueError, match="reference_variant='ratio'"):  # also when called directly
        get_loss("alpha_dpo").fn(batch(rc=None, rr=None), AlphaDPOParams(), None)


def test_ablation_summed_logps():
    beta, gbr, alpha = 2.5, 0.5, 0.05
    out = compute_loss("alpha_dpo_sum", batch())
    g = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(3)]  # [2, -2.5, 3]
    z = zscore(g)
    close(out.losses, [-logsig(beta * (PC[i] - PR[i] - gbr - alpha * z[i])) for i in range(3)])
    close(out.chosen_rewards, [beta * (PC[i] - alpha * (PC[i] - RC[i])) for i in range(3)])


def test_ablation_token_kl_sign_matches_lemma_4_3():
    # Under Lemma 4.3's approximation KL_seq(y) ≈ log πref(y) − log πθ(y), the δ margin equals M.
    approx = batch(
        chosen_seq_kl=t([RC[i] - PC[i] for i in range(3)]), rejected_seq_kl=t([RR[i] - PR[i] for i in range(3)])
    )
    out_kl = compute_loss("alpha_dpo_token_kl", approx)
    out_m = compute_loss("alpha_dpo", approx)
    torch.testing.assert_close(out_kl.margins, out_m.margins)
    torch.testing.assert_close(out_kl.losses, out_m.losses)
    # general values: g = KL(y_l)/|y_l| − KL(y_w)/|y_w|, z-scored, γ added
    kw, kl = [0.8, 2.0, 0.1], [3.5, 0.7, 1.4]
    out = compute_loss("alpha_dpo_token_kl", batch(chosen_seq_kl=t(kw), rejected_seq_kl=t(kl)))
    z = zscore([kl[i] / LL[i] - kw[i] / LW[i] for i in range(3)])
    close(out.margins, [0.5 + 0.05 * zi for zi in z])
    meta = get_loss("alpha_dpo_token_kl")
    assert meta.needs_token_kl and meta.needs_reference
    with pytest.raises(ValueError, match="seq_kl"):
        compute_loss("alpha_dpo_token_kl", batch())


def test_sequence_kl_hand_value_and_gradient():
    ref_logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [5.0, -5.0]]], dtype=F64, requires_grad=True)
    pol_logits = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 9.0]]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])

    def kl(a, b):  # KL(softmax a ‖ softmax b) for two logits
        pa = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        pb = [math.exp(x) / sum(math.exp(y) for y in b) for x in b]
        return sum(p * math.log(p / q) for p, q in zip(pa, pb))

    expected = kl([0.0, 1.0], [1.0, 0.0]) + kl([2.0, 0.0], [0.0, 0.0])  # third position masked
    out = sequence_kl(ref_logits, pol_logits, mask)
    assert out.shape == (1,) and math.isclose(out.item(), expected, rel_tol=1e-12)
    out.sum().backward()
    assert ref_logits.grad is None
    assert pol_logits.grad is not None and torch.all(pol_logits.grad[0, 2] == 0)


def test_label_smoothing_formula():
    x = compute_loss("alpha_dpo", batch(), {"alpha": 0.0})
    y = compute_loss("alpha_dpo", batch(), {"alpha": 0.0, "label_smoothing": 0.3})
    logits = [2.5 * (AVG_W[i] - AVG_L[i] - 0.5) for i in range(3)]
    close(x.losses, [-logsig(v) for v in logits])
    close(y.losses, [-0.7 * logsig(v) - 0.3 * logsig(-v) for v in logits])


# ==========================================================================================
# Margin normaliser
# ==========================================================================================

STREAM = [[0.1, 0.3, -0.2], [1.0, 2.0], [0.5, -0.5, 0.0, 1.5], [0.25]]


def test_official_mode_reproduces_authors_recurrence():
    norm = MarginNormalizer("official")
    mu = sigma = 0.0
    for gs in STREAM:
        z = norm(t(gs))
        mean = statistics.fmean(gs)
        std = statistics.stdev(gs) if len(gs) > 1 else 0.0
        mu = 0.9 * mu + 0.1 * mean
        sigma = 0.9 * sigma + 0.1 * std
        assert math.isclose(norm.mu, mu, rel_tol=1e-12) and math.isclose(norm.sigma, sigma, rel_tol=1e-12)
        close(z, [(g - mu) / sigma for g in gs])
    assert norm.steps == len(STREAM)
    # and, as in the authors' code, identical g at the first step divide by zero
    assert not torch.isfinite(MarginNormalizer("official")(t([0.0, 0.0]))).all()


def test_ema_mode_bias_corrected_recurrence():
    norm = MarginNormalizer("ema", momentum=0.9)
    a_mu = a_sd = 0.0
    for step, gs in enumerate(STREAM[:3], start=1):
        z = norm(t(gs))
        a_mu = 0.9 * a_mu + 0.1 * statistics.fmean(gs)
        a_sd = 0.9 * a_sd + 0.1 * statistics.stdev(gs)
        mu, sd = a_mu / (1 - 0.9**step), a_sd / (1 - 0.9**step)
        if step == 1:  # first step: exactly the batch's own statistics
            assert math.isclose(mu, statistics.fmean(gs)) and math.isclose(sd, statistics.stdev(gs))
        assert math.isclose(norm.mu, mu, rel_tol=1e-12) and math.isclose(norm.sigma, sd, rel_tol=1e-12)
        close(z, [(g - mu) / sd for g in gs])


def test_no_nan_when_all_g_identical():
    for mode in ("ema", "batch", "none"):
        norm = MarginNormalizer(mode)
        for gs in ([0.7, 0.7, 0.7], [0.0, 0.0], [0.3], [0.7, 0.7, 0.7]):
            z = norm(t(gs))
            assert torch.isfinite(z).all(), (mode, gs, z)
            assert math.isfinite(norm.mu) and math.isfinite(norm.sigma) and norm.sigma > 0
    # step 1 of ema with identical g: z = 0, the loss is SimPO's
    out = compute_loss("alpha_dpo", batch(rc=[PC[i] - 0.4 * LW[i] for i in range(3)], rr=PR))  # g = 0.4 for all
    assert torch.isfinite(out.losses).all()
    close(out.margins, [0.5] * 3, tol=1e-6)


def test_frozen_and_eval_do_not_update():
    norm = MarginNormalizer("ema")
    norm(t([0.0, 1.0, 2.0]))
    mu, sigma, steps = norm.mu, norm.sigma, norm.steps
    with norm.frozen():
        z = norm(t([10.0, 20.0]))
        assert not norm.training
    close(z, [(10.0 - mu) / sigma, (20.0 - mu) / sigma])
    assert (norm.mu, norm.sigma, norm.steps) == (mu, sigma, steps) and norm.training
    norm.eval()
    norm(t([5.0, 6.0]))
    assert (norm.mu, norm.sigma, norm.steps) == (mu, sigma, steps)
    norm.train()
    norm(t([5.0, 6.0]))
    assert norm.steps == steps + 1 and norm.mu != mu
    # same for the official mode, through the loss
    off = MarginNormalizer("official")
    compute_loss("alpha_dpo_official", batch(), normalizer=off)
    with off.frozen():
        compute_loss("alpha_dpo_official", batch(), normalizer=off)
    assert off.steps == 1


def test_state_dict_round_trip_restores_exactly():
    for mode in ("ema", "official", "batch"):
        a = MarginNormalizer(mode)
        for gs in STREAM[:3]:
            a(t(gs))
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        b = MarginNormalizer(mode)
        b.load_state_dict(torch.load(buf))
        assert (b.mu, b.sigma, b.steps) == (a.mu, a.sigma, a.steps)
        nxt = t([0.3, -1.2, 0.9])
        assert torch.equal(a(nxt), b(nxt))
        assert (b.mu, b.sigma, b.steps) == (a.mu, a.sigma, a.steps)
    with pytest.raises(ValueError, match="mode"):
        MarginNormalizer("batch").load_state_dict(MarginNormalizer("ema").state_dict())


def test_normalizer_mode_must_match_params():
    with pytest.raises(ValueError, match="normalization"):
        compute_loss("alpha_dpo", batch(), normalizer=MarginNormalizer("batch"))
    assert make_normalizer("alpha_dpo").mode == "ema"
    assert make_normalizer("alpha_dpo_official").mode == "official"
    assert make_normalizer("alpha_dpo", {"normalization": "batch"}).mode == "batch"
    assert make_normalizer("alpha_dpo_no_norm") is None and make_normalizer("simpo") is None
    with pytest.raises(ValueError, match="mode"):
        MarginNormalizer("zscore")


def test_normalizer_updates_before_normalising_across_loss_calls():
    # step 2 of an EMA normaliser inside the loss uses batch 1 and batch 2
    norm = make_normalizer("alpha_dpo")
    compute_loss("alpha_dpo", _random_batch(seed=1), normalizer=norm)
    out = compute_loss("alpha_dpo", batch(), normalizer=norm)
    assert norm.steps == 2
    g = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
    close(out.margins, [0.5 + 0.05 * (x - norm.mu) / norm.sigma for x in g])


# ==========================================================================================
# Registry
# ==========================================================================================


def test_registry_metadata():
    for name in ("simpo", "cpo", "orpo"):
        assert get_loss(name).needs_reference is False
    for name in ("dpo", "ipo", "kto", "rdpo", "alpha_dpo"):
        assert get_loss(name).needs_reference is True
    assert get_loss("alpha_dpo").uses_normalizer and get_loss("alpha_dpo").length_normalized
    assert get_loss("cpo").uses_chosen_nll and get_loss("orpo").uses_chosen_nll
    assert get_loss("alpha_dpo_sum").length_normalized is False
    alpha_fns = {m.fn for n, m in LOSSES.items() if n.startswith("alpha_dpo")}
    assert len(alpha_fns) == 1  # every ablation reuses the same function
    for name, m in LOSSES.items():
        assert m.name == name and m.description
        params = make_params(name)
        assert isinstance(params, m.params_cls)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(UnknownLossError) as exc:
        get_loss("alpha-dpo")
    msg = str(exc.value)
    for name in LOSSES:
        assert name in msg
    assert "Did you mean 'alpha_dpo'" in msg
    assert isinstance(exc.value, ValueError)
    with pytest.raises(UnknownLossError):
        compute_loss("nope", batch())


def test_make_params_bad_key_and_yaml_strings():
    with pytest.raises(ValueError) as exc:
        make_params("alpha_dpo", {"alhpa": 0.1})
    msg = str(exc.value)
    assert "'alhpa'" in msg and "'alpha_dpo'" in msg and "gamma_beta_ratio" in msg
    p = make_params("alpha_dpo", {"alpha": "5e-2", "beta": "10", "stop_gradient": "false"})
    assert p.alpha == 0.05 and isinstance(p.alpha, float) and p.beta == 10.0 and p.stop_gradient is False
    with pytest.raises(ValueError, match="alpha"):
        make_params("alpha_dpo", {"alpha": "lots"})
    with pytest.raises(ValueError, match="normalization"):
        make_params("alpha_dpo", {"normalization": "zscore"})
    # dataclass, dict or None all accepted by compute_loss; a preset accepts its base dataclass
    a = compute_loss("alpha_dpo_no_norm", batch(), AlphaDPOParams(normalization="none"))
    b = compute_loss("alpha_dpo_no_norm", batch(), {})
    torch.testing.assert_close(a.losses, b.losses)
    with pytest.raises(TypeError):
        compute_loss("dpo", batch(), AlphaDPOParams())
    with pytest.raises(ValueError, match="ref"):
        compute_loss("dpo", batch(rc=None, rr=None))


def test_bf16_inputs_work():
    inp = _random_batch()
    bf = PreferenceLogps(*(x.to(torch.bfloat16) for x in (inp.policy_chosen_logps, inp.policy_rejected_logps)),
                         inp.chosen_lengths, inp.rejected_lengths,
                         *(x.to(torch.bfloat16) for x in (inp.ref_chosen_logps, inp.ref_rejected_logps)))  # fmt: skip
    for name in LOSSES:
        if LOSSES[name].needs_token_kl:
            continue
        out = compute_loss(name, bf)
        assert torch.isfinite(out.losses.float()).all(), name


# ==========================================================================================
# Oracle: TRL 1.16's sigmoid DPO loss, through its public DPOTrainer.compute_loss
# ==========================================================================================


def test_dpo_matches_trl_sigmoid_loss(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    words = ["<pad>", "<eos>", "<unk>"] + list("abcdefghijklmnop")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    reference = LlamaForCausalLM(cfg)
    data = Dataset.from_dict(
        {
            "prompt": ["a b c", "d e", "f g h i"],
            "chosen": [" j k", " l m n o", " p"],
            "rejected": [" k k k", " a", " b c"],
        }
    )
    beta = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(
            output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid"], per_device_train_batch_size=3, report_to=[],
            use_cpu=True, bf16=False, max_length=None, disable_tqdm=True,
        )  # fmt: skip
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
        inputs = next(iter(trainer.get_train_dataloader()))  # rows: [chosen x3; rejected x3]
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, inputs).item()

    # Our side: summed completion log-probs from a plain forward of the same models.
    def summed_logps(model):
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        lp = logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        mask = inputs["completion_mask"][:, 1:]
        return (lp * mask).sum(1).double(), mask.sum(1).double()

    pol, lengths = summed_logps(trainer.model)
    ref, _ = summed_logps(reference)
    inp = PreferenceLogps(pol[:3], pol[3:], lengths[:3], lengths[3:], ref[:3], ref[3:])
    ours = compute_loss("dpo", inp, {"beta": beta}).losses.mean().item()
    assert abs(ours - math.log(2)) > 1e-3  # policy != reference, so the check is not trivial
    assert math.isclose(ours, trl_loss, rel_tol=1e-5, abs_tol=1e-6)


# ==========================================================================================
# Oracle: TRL 1.16's CPO and ORPO losses on tensors, with the NLL TRL takes over the chosen tokens
# ==========================================================================================


def _trl_logits_batch(seed=0):
    """Random logits for B = 3 pairs with unequal prompt and response lengths, TRL-style labels."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 3, 12, 11
    logits = torch.randn(2 * B, T, V, generator=g, dtype=F64) * 2
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    prompt = [3, 5, 2, 3, 5, 2]
    length = [4, 6, 2, 5, 3, 7]  # response tokens: chosen rows 0..2, rejected rows 3..5
    labels = torch.full((2 * B, T), -100)
    for i in range(2 * B):
        labels[i, prompt[i]: prompt[i] + length[i]] = ids[i, prompt[i]: prompt[i] + length[i]]
    return logits, labels, B


def _ours_from_logits(logits, labels, B):
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = logits[:, :-1].log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sums, counts = (lp * mask).sum(1), mask.sum(1).to(F64)
    return PreferenceLogps(sums[:B], sums[B:], counts[:B], counts[B:])


def _trl_nll(logits, labels, B):
    # TRL's CPO/ORPO concatenated_forward: nn.CrossEntropyLoss over the shifted chosen rows
    return torch.nn.functional.cross_entropy(
        logits[:B, :-1].reshape(-1, logits.shape[-1]), labels[:B, 1:].reshape(-1), ignore_index=-100
    )


def test_cpo_matches_trl():
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    logits, labels, B = _trl_logits_batch()
    beta, w = 0.3, 1.0
    trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    logps = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=False)
    trl_losses, trl_c, _ = CPOTrainer.cpo_loss(trl_self, logps[:B], logps[B:])
    trl_loss = trl_losses.mean() + w * _trl_nll(logits, labels, B)

    ours = compute_loss("cpo", _ours_from_logits(logits, labels, B), {"beta": beta, "nll_weight": w})
    assert math.isclose(ours.loss.item(), trl_loss.item(), rel_tol=1e-10)
    close(ours.chosen_rewards, trl_c.tolist())
    seq = compute_loss("cpo", _ours_from_logits(logits, labels, B), {"beta": beta, "nll_reduction": "sequence"})
    assert abs(seq.loss.item() - trl_loss.item()) > 1e-3  # unequal lengths: the mean of means differs


def test_orpo_matches_trl():
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    logits, labels, B = _trl_logits_batch(seed=1)
    lam = 0.5
    trl_self = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    avg = ORPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True)
    trl_losses, trl_c, _, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, avg[:B], avg[B:])
    trl_loss = _trl_nll(logits, labels, B) - trl_losses.mean()  # ORPOTrainer: loss = nll − mean(λ·logσ(·))

    ours = compute_loss("orpo", _ours_from_logits(logits, labels, B), {"lam": lam})
    assert math.isclose(ours.loss.item(), trl_loss.item(), rel_tol=1e-6)
    close(ours.chosen_rewards, trl_c.tolist(), tol=1e-6)


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
# The ablations are rows of one table, not subclasses
# ==========================================================================================

# Every field's default as the ablation subclasses of AlphaDPOParams / SimPOParams gave them before
# they became rows (AlphaDPONoNormParams, ..., SimPOSumParams), listed by hand.
_ALPHA_BASE = dict(beta=2.5, gamma_beta_ratio=0.5, alpha=0.05, label_smoothing=0.0, normalization="ema",
                   stop_gradient=True, reference_variant="ratio", length_normalized=True, margin_source="sequence",
                   normalizer_momentum=0.9, sigma_floor=1e-3, eval_updates_stats=False)
_SIMPO_BASE = dict(beta=2.5, gamma_beta_ratio=0.55, sft_weight=0.0, label_smoothing=0.0, length_normalized=True,
                   nll_reduction="token")
OLD_SUBCLASS_DEFAULTS = {
    "alpha_dpo": _ALPHA_BASE,
    "alpha_dpo_no_norm": {**_ALPHA_BASE, "normalization": "none"},
    "alpha_dpo_batch_norm": {**_ALPHA_BASE, "normalization": "batch"},
    "alpha_dpo_official": {**_ALPHA_BASE, "normalization": "official", "eval_updates_stats": True},
    "alpha_dpo_no_sg": {**_ALPHA_BASE, "stop_gradient": False},
    "alpha_dpo_no_gamma": {**_ALPHA_BASE, "gamma_beta_ratio": 0.0},
    "alpha_dpo_policy_ref": {**_ALPHA_BASE, "reference_variant": "policy"},
    "alpha_dpo_ref_ref": {**_ALPHA_BASE, "reference_variant": "reference"},
    "alpha_dpo_inv_ref": {**_ALPHA_BASE, "reference_variant": "inverse_reference"},
    "alpha_dpo_sum": {**_ALPHA_BASE, "length_normalized": False},
    "alpha_dpo_token_kl": {**_ALPHA_BASE, "margin_source": "token_kl"},
    "simpo": _SIMPO_BASE,
    "simpo_sum": {**_SIMPO_BASE, "length_normalized": False},
}
# (needs_reference, length_normalized, needs_token_kl, uses_normalizer) of each row, as before.
OLD_ROW_FLAGS = {
    "alpha_dpo": (True, True, False, True), "alpha_dpo_no_norm": (True, True, False, False),
    "alpha_dpo_batch_norm": (True, True, False, True), "alpha_dpo_official": (True, True, False, True),
    "alpha_dpo_no_sg": (True, True, False, True), "alpha_dpo_no_gamma": (True, True, False, True),
    "alpha_dpo_policy_ref": (False, True, False, True), "alpha_dpo_ref_ref": (True, True, False, True),
    "alpha_dpo_inv_ref": (True, True, False, True), "alpha_dpo_sum": (True, False, False, True),
    "alpha_dpo_token_kl": (True, True, True, True), "simpo": (False, True, False, False),
    "simpo_sum": (False, False, False, False),
}


@pytest.mark.parametrize("name", sorted(OLD_SUBCLASS_DEFAULTS))
def test_ablation_rows_give_the_old_subclass_defaults(name):
    params = make_params(name)
    assert params.to_dict() == OLD_SUBCLASS_DEFAULTS[name]
    m = get_loss(name)
    assert (m.needs_reference, m.length_normalized, m.needs_token_kl, m.uses_normalizer) == OLD_ROW_FLAGS[name]
    assert type(params) is (SimPOParams if name.startswith("simpo") else AlphaDPOParams)
    # overrides still win over the row's defaults, and the params object is accepted back
    assert make_params(name, {"beta": 4.0}).to_dict() == {**OLD_SUBCLASS_DEFAULTS[name], "beta": 4.0}
    assert isinstance(params, m.params_cls)


def test_ablation_table_is_the_registry():
    from alphadpo_cli.losses.alpha_dpo import ABLATIONS

    alpha_rows = {n for n in LOSSES if n.startswith("alpha_dpo")}
    assert set(ABLATIONS) == alpha_rows
    for name, overrides in ABLATIONS.items():
        assert dict(get_loss(name).defaults) == overrides
    assert dict(get_loss("simpo_sum").defaults) == {"length_normalized": False}
    assert all(not m.defaults for n, m in LOSSES.items() if n not in ABLATIONS and n != "simpo_sum")


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


def test_normalizer_statistics_are_the_tensors_behind_mu_and_sigma():
    norm = MarginNormalizer("ema")
    norm(t([0.1, 0.4, -0.2]))
    mu, sigma = norm.statistics()
    assert mu.dtype == F64 and sigma.dtype == F64
    assert mu.item() == norm.mu and sigma.item() == norm.sigma
    assert math.isclose(norm.mu, statistics.fmean([0.1, 0.4, -0.2])) and math.isclose(norm.sigma, statistics.stdev([0.1, 0.4, -0.2]))


def test_importing_the_losses_stays_light():
    import subprocess
    import sys

    code = "import sys, alphadpo_cli.losses; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
