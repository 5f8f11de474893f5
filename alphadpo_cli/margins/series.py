"""One series: per-pair scores → g, z, the margin m, the loss and the implicit rewards, every number
computed by the loss library (:func:`~alphadpo_cli.losses.compute_loss` with a
:class:`~alphadpo_cli.losses.MarginNormalizer`), and the statistics a series is summarised by.

The normalisation (``norm``) picks which μ, σ turn g into z: see :mod:`alphadpo_cli.margins`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..losses import AlphaDPOParams, MarginNormalizer, PreferenceLogps, compute_loss, make_normalizer, make_params, requirements
from .options import NORM_MODES

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class RunStats:
    """The normaliser state a run logged last: what training would use for its next batch."""

    mu: float
    sigma: float
    step: int



# ---------------------------------------------------------------------------------------------
# statistics


def describe(x: np.ndarray | None) -> dict[str, float | None]:
    """mean, unbiased std, min, 5/25/50/75/95 % quantiles and max of the finite values."""
    keys = ["mean", "std", "min"] + [f"q{int(q * 100):02d}" for q in QUANTILES] + ["max"]
    if x is None:
        return {k: None for k in keys}
    v = np.asarray(x, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {k: None for k in keys}
    qs = np.quantile(v, QUANTILES)
    out = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min())}
    out.update({f"q{int(q * 100):02d}": float(val) for q, val in zip(QUANTILES, qs)})
    out["max"] = float(v.max())
    return out


def correlation(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Pearson correlation over the pairs where both are finite; None when either is constant."""
    if a is None or b is None:
        return None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    # A margin that is constant up to rounding (α = 0, SimPO) has no meaningful correlation.
    if den == 0 or not math.isfinite(den) or np.abs(a).max() < 1e-12 or np.abs(b).max() < 1e-12:
        return None
    return float((a * b).sum() / den)



# ---------------------------------------------------------------------------------------------
# one series: scores -> g, z, margin, loss, rewards through the loss library


@dataclass
class Series:
    """Per-pair results of one method/params setting on one policy's scores ([N] arrays)."""

    label: str
    policy: str
    method: str
    params: Any
    norm: str
    delta_theta: np.ndarray
    delta_ref: np.ndarray | None
    g: np.ndarray | None
    z: np.ndarray | None
    margin: np.ndarray
    loss: np.ndarray
    reward_chosen: np.ndarray
    reward_rejected: np.ndarray
    mu: float | None = None
    sigma: float | None = None
    length_diff: np.ndarray | None = None

    @property
    def reward_diff(self) -> np.ndarray:
        return self.reward_chosen - self.reward_rejected

    @property
    def correct(self) -> np.ndarray:
        """Whether the method's implicit reward ranks the pair correctly (chosen above rejected)."""
        return self.reward_chosen > self.reward_rejected

    @property
    def alpha(self) -> float | None:
        return getattr(self.params, "alpha", None)

    @property
    def gamma_beta_ratio(self) -> float | None:
        return getattr(self.params, "gamma_beta_ratio", None)

    @property
    def beta(self) -> float | None:
        return getattr(self.params, "beta", None)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "policy": self.policy,
            "method": self.method,
            "params": dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else None,
            "norm": self.norm,
            "mu": self.mu,
            "sigma": self.sigma,
            "pairs": int(self.margin.shape[0]),
            "accuracy": float(self.correct.mean()) if self.margin.size else None,
            "loss_mean": float(np.nanmean(self.loss)) if self.margin.size else None,
            "margin": describe(self.margin),
            "z": describe(self.z),
            "g": describe(self.g),
            "delta_theta": describe(self.delta_theta),
            "delta_ref": describe(self.delta_ref),
            "reward_diff": describe(self.reward_diff),
            "loss": describe(self.loss),
            "corr_margin_length_diff": correlation(self.margin, self.length_diff),
            "corr_margin_delta_ref": correlation(self.margin, self.delta_ref),
            "corr_z_length_diff": correlation(self.z, self.length_diff),
            "corr_z_delta_ref": correlation(self.z, self.delta_ref),
        }


def _is_alpha_family(params: Any) -> bool:
    return isinstance(params, AlphaDPOParams)


def resolve_norm(norm: str, params: Any, run_stats: RunStats | None) -> str:
    """The normalisation actually used for a series ("n/a" for methods without one)."""
    if norm not in NORM_MODES:
        raise ConfigError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORM_MODES)}")
    if not _is_alpha_family(params):
        return "n/a"
    if norm == "auto":
        return "none" if params.normalization == "none" else "dataset"
    if norm == "run" and run_stats is None:
        raise ConfigError(
            "--norm run needs the normaliser statistics a training run logged: pass --from-run DIR "
            "(or an --adapter that is a training output directory with metrics.jsonl)"
        )
    return norm


def _groups(n: int, size: int) -> list[slice]:
    size = max(1, int(size))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _inputs(scores: PreferenceLogps, sl: slice, dtype: torch.dtype) -> PreferenceLogps:
    def t(x):
        return None if x is None else x[sl].detach().to(dtype)

    return PreferenceLogps(
        policy_chosen_logps=t(scores.policy_chosen_logps),
        policy_rejected_logps=t(scores.policy_rejected_logps),
        chosen_lengths=t(scores.chosen_lengths),
        rejected_lengths=t(scores.rejected_lengths),
        ref_chosen_logps=t(scores.ref_chosen_logps),
        ref_rejected_logps=t(scores.ref_rejected_logps),
    )


def _frozen_normalizer(stats: RunStats, eps: float = 1e-3) -> MarginNormalizer:
    """A normaliser that applies exactly z = (g − μ)/σ with a run's last μ, σ and never updates.

    It is the library's "official" normaliser (no bias correction) with its state set to (μ, σ);
    σ is floored at eps (the params' sigma_floor) like the trainer's EMA normaliser."""
    n = MarginNormalizer(mode="official")
    n.load_state_dict({
        "mode": "official", "momentum": n.momentum, "eps": eps, "steps": 1,
        "mu_acc": stats.mu, "sigma_acc": max(stats.sigma, eps), "batch_mu": 0.0, "batch_sigma": 1.0,
    })
    return n.eval()


class _Runner:
    """Calls the library over the groups of one normalisation, with one normaliser per stream."""

    def __init__(self, method: str, norm: str, n: int, norm_batch: int, run_stats: RunStats | None):
        self.method = method
        self.norm = norm
        self.run_stats = run_stats
        if norm in ("dataset", "none", "run"):
            self.groups = [slice(0, n)]
        else:  # batch, ema, official, and methods without a normaliser (KTO's batch KL needs groups)
            self.groups = _groups(n, norm_batch)

    def library_mode(self) -> str | None:
        return {"dataset": "batch", "run": "official", "n/a": None}.get(self.norm, self.norm)

    def params_for(self, params: Any, **changes: Any) -> Any:
        mode = self.library_mode()
        if mode is not None:
            changes["normalization"] = mode
        return dataclasses.replace(params, **changes) if changes else params

    def normalizer_for(self, params: Any) -> MarginNormalizer | None:
        if self.norm == "run":
            return _frozen_normalizer(self.run_stats, getattr(params, "sigma_floor", 1e-3))  # type: ignore[arg-type]
        if self.norm in ("ema", "official", "batch", "dataset"):
            # What the trainer builds (fresh): the params' momentum and σ floor.
            return make_normalizer(self.method, params)
        return None  # none / n.a.: identity

    def run(self, scores: PreferenceLogps, params: Any, dtype: torch.dtype):
        normalizer = self.normalizer_for(params)
        stepwise = normalizer is not None and self.norm == "ema"  # each group one optimiser step, as the trainer
        outs = []
        for sl in self.groups:
            if stepwise:
                normalizer.begin_step()
            outs.append(compute_loss(self.method, _inputs(scores, sl, dtype), params, normalizer))
            if stepwise:
                normalizer.end_step()
        cat = lambda name: torch.cat([getattr(o, name).detach().reshape(-1).to(torch.float64) for o in outs]).numpy()  # noqa: E731
        last = outs[-1].metrics if outs else {}
        if normalizer is not None:  # the state after the last group: what training would use next
            last = {"normalizer/mu": normalizer.mu, "normalizer/sigma": normalizer.sigma}
        return {
            "margin": cat("margins"),
            "loss": cat("losses"),
            "reward_chosen": cat("chosen_rewards"),
            "reward_rejected": cat("rejected_rewards"),
            "mu": last.get("normalizer/mu"),
            "sigma": last.get("normalizer/sigma"),
        }


def _checked_params(scores: PreferenceLogps, method: str, params: Any, overrides: dict[str, Any] | None) -> Any:
    """The method's params (a dataclass, `overrides` applied), checked against what the scores carry."""
    if params is None or isinstance(params, dict):
        params = make_params(method, params)
    if overrides:
        params = dataclasses.replace(params, **overrides)
    if requirements(method, params).needs_token_kl:
        raise ConfigError(
            f"loss {method!r} takes its margin from token-level KLs (TDPO δ), which per-pair scores "
            "do not carry; inspect it as alpha_dpo instead"
        )
    if int(scores.policy_chosen_logps.shape[0]) == 0:
        raise ConfigError("no pairs to inspect")
    if requirements(method, params).needs_reference and scores.ref_chosen_logps is None:
        raise ConfigError(f"loss {method!r} needs reference log-probs and none were computed")
    return params


def _g_and_z(scores: PreferenceLogps, method: str, params: Any, runner: _Runner, norm_batch: int,
             dtype: torch.dtype) -> tuple[np.ndarray | None, np.ndarray | None]:
    """g and z per pair, as the library's margins with α = 1, γ/β = 0 (then m = g without
    normalisation, m = z with the series' own); (None, None) outside the α-DPO family."""
    if not _is_alpha_family(params):
        return None, None
    n = int(scores.policy_chosen_logps.shape[0])
    g_runner = _Runner(method, "none", n, norm_batch, None)
    g = g_runner.run(scores, g_runner.params_for(params, alpha=1.0, gamma_beta_ratio=0.0), dtype)["margin"]
    z = runner.run(scores, runner.params_for(params, alpha=1.0, gamma_beta_ratio=0.0), dtype)["margin"]
    return g, z


def compute_series(
    scores: PreferenceLogps,
    method: str,
    params: Any = None,
    *,
    norm: str = "auto",
    norm_batch: int = 8,
    run_stats: RunStats | None = None,
    dtype: torch.dtype = torch.float64,
    label: str | None = None,
    policy: str = "policy",
    overrides: dict[str, Any] | None = None,
) -> Series:
    """One series from per-pair scores, every number computed by the loss library.

    ``params``: the method's params (dataclass or dict; None: defaults); ``overrides`` replace
    fields (e.g. ``{"alpha": 0.2}``). ``norm``/``norm_batch``/``run_stats``: see the module
    docstring. ``dtype``: the precision the library computes in (the trainer uses the policy's,
    float32 on CPU; float64 by default here).
    """
    params = _checked_params(scores, method, params, overrides)
    n = int(scores.policy_chosen_logps.shape[0])
    resolved = resolve_norm(norm, params, run_stats)
    runner = _Runner(method, resolved, n, norm_batch, run_stats)

    length_normalized = requirements(method, params).length_normalized
    full = _inputs(scores, slice(0, n), torch.float64)
    pc, pr, rc, rr = full.reduced(length_normalized)
    delta_theta = (pc - pr).numpy()
    delta_ref = None if rc is None else (rc - rr).numpy()

    g, z = _g_and_z(scores, method, params, runner, norm_batch, dtype)
    out = runner.run(scores, runner.params_for(params), dtype)
    used = runner.params_for(params)
    if _is_alpha_family(params) and resolved != "n/a":
        used = dataclasses.replace(used, normalization=params.normalization)  # report the run's own setting
    mu, sigma = out["mu"], out["sigma"]
    if resolved in ("batch", "none", "n/a"):
        mu = sigma = None  # last group's statistics would mislead
    return Series(
        label=label or policy,
        policy=policy,
        method=method,
        params=used,
        norm=resolved,
        delta_theta=delta_theta,
        delta_ref=delta_ref,
        g=g,
        z=z,
        margin=out["margin"],
        loss=out["loss"],
        reward_chosen=out["reward_chosen"],
        reward_rejected=out["reward_rejected"],
        mu=None if mu is None else float(mu),
        sigma=None if sigma is None else float(sigma),
        length_diff=(scores.chosen_lengths - scores.rejected_lengths).double().numpy(),
    )


def norm_description(series: Series, norm_batch: int) -> str:
    n = series.margin.shape[0]
    mu_sigma = f"μ={series.mu:.4g}, σ={series.sigma:.4g}" if series.mu is not None else ""
    return {
        "dataset": f"z-scored over the {n} pairs inspected ({mu_sigma})",
        "batch": f"z-scored within each group of {norm_batch} pairs, file order",
        "ema": (f"training EMA normaliser replayed over groups of {norm_batch} pairs, file order, one optimiser "
                f"step each: a group uses the statistics of the groups before it, the first z = 0 (final {mu_sigma})"),
        "official": f"authors' EMA replayed over groups of {norm_batch} pairs, file order (final {mu_sigma})",
        "run": f"frozen at the run's last logged normaliser ({mu_sigma})",
        "none": "none: z = g",
        "n/a": "not used by this method",
    }.get(series.norm, series.norm)
