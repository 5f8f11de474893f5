"""α-DPO's ablations and the registry: each ablation name computes its defining formula (hand-worked
values, worked out on plain floats as in test_losses.py), and what the registry says a row needs is
what its loss reads. Moved out of test_losses.py unchanged.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from alphadpo_cli.losses import (LOSSES, AlphaDPOParams, MarginNormalizer, PreferenceLogps, UnknownLossError,
                                 compute_loss, get_loss, make_params, sequence_kl)
from test_losses import (AVG_L, AVG_W, F64, LL, LW, PC, PR, RAVG_L, RAVG_W, RC, RR, _random_batch, batch, close,
                         logsig, t, zscore)


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
# Each ablation name computes its defining formula (hand-worked), and overrides win over it
# ==========================================================================================

KL_W, KL_L = [0.8, 2.0, 0.1], [3.5, 0.7, 1.4]  # chosen_seq_kl / rejected_seq_kl of the fixed batch
SUM_W, SUM_L = [PC[i] - RC[i] for i in range(3)], [PR[i] - RR[i] for i in range(3)]


def _official_z(gs: list[float]) -> list[float]:
    # a fresh authors' EMA, first update from 0: μ = 0.1·mean, σ = 0.1·std (no bias correction)
    mu, sd = 0.1 * statistics.fmean(gs), 0.1 * statistics.stdev(gs)
    return [(g - mu) / sd for g in gs]


# name -> (Δθ per pair, the g the row z-scores, how it z-scores, γ/β): the formula each name stands
# for in the paper (eq. 9-12, App. B.2, B.4, Table 5), with the row's defaults β = 2.5, α = 0.05.
_RATIO_G = [(AVG_W[i] - RAVG_W[i]) - (AVG_L[i] - RAVG_L[i]) for i in range(3)]
_DTHETA = [AVG_W[i] - AVG_L[i] for i in range(3)]
ROW_FORMULAS = {
    "alpha_dpo": (_DTHETA, _RATIO_G, zscore, 0.5),
    "alpha_dpo_no_norm": (_DTHETA, _RATIO_G, lambda gs: gs, 0.5),  # z = g raw
    "alpha_dpo_batch_norm": (_DTHETA, _RATIO_G, zscore, 0.5),
    "alpha_dpo_official": (_DTHETA, _RATIO_G, _official_z, 0.5),
    "alpha_dpo_no_sg": (_DTHETA, _RATIO_G, zscore, 0.5),  # same value, other gradient (tested above)
    "alpha_dpo_no_gamma": (_DTHETA, _RATIO_G, zscore, 0.0),
    "alpha_dpo_policy_ref": (_DTHETA, _DTHETA, zscore, 0.5),  # M = Δθ
    "alpha_dpo_ref_ref": (_DTHETA, [RAVG_W[i] - RAVG_L[i] for i in range(3)], zscore, 0.5),  # M = Δref
    "alpha_dpo_inv_ref": (_DTHETA, [RAVG_L[i] - RAVG_W[i] for i in range(3)], zscore, 0.5),  # M = −Δref
    "alpha_dpo_sum": ([PC[i] - PR[i] for i in range(3)], [SUM_W[i] - SUM_L[i] for i in range(3)], zscore, 0.5),
    "alpha_dpo_token_kl": (_DTHETA, [KL_L[i] / LL[i] - KL_W[i] / LW[i] for i in range(3)], zscore, 0.5),
    "simpo": (_DTHETA, None, None, 0.55),
    "simpo_sum": ([PC[i] - PR[i] for i in range(3)], None, None, 0.55),
}


@pytest.mark.filterwarnings("ignore:.*fewer than 8")
@pytest.mark.parametrize("beta", [None, 4.0])
@pytest.mark.parametrize("name", sorted(ROW_FORMULAS))
def test_each_row_computes_its_defining_formula(name, beta):
    """A row's defaults give its formula by hand; an override (β here) changes only what it names."""
    dtheta, g, norm, gbr = ROW_FORMULAS[name]
    b = 2.5 if beta is None else beta
    out = compute_loss(name, batch(chosen_seq_kl=t(KL_W), rejected_seq_kl=t(KL_L)),
                       None if beta is None else {"beta": beta})
    margins = [gbr] * 3 if g is None else [gbr + 0.05 * z for z in norm(g)]
    close(out.margins, margins)
    close(out.losses, [-logsig(b * (dtheta[i] - margins[i])) for i in range(3)])
    assert {n for n in LOSSES if n.startswith(("alpha_dpo", "simpo"))} == set(ROW_FORMULAS)  # every row has one


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_row_reads_the_reference_iff_it_needs_it(name):
    """What the registry says a row needs is what its loss reads: without reference log-probs a row
    that needs them refuses with a clear error, one that does not computes the same numbers."""
    kl = dict(chosen_seq_kl=t(KL_W), rejected_seq_kl=t(KL_L))
    if get_loss(name).needs_reference:
        with pytest.raises(ValueError, match="ref_chosen_logps"):
            compute_loss(name, batch(rc=None, rr=None, **kl))
    else:
        torch.testing.assert_close(compute_loss(name, batch(rc=None, rr=None, **kl)).losses,
                                   compute_loss(name, batch(**kl)).losses)
    if get_loss(name).needs_token_kl:
        with pytest.raises(ValueError, match="seq_kl"):
            compute_loss(name, batch())
