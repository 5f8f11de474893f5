"""`alphadpo margins`: α-DPO's adaptive margin, pair by pair.

Scoring (policy and reference log-probs of every pair) happens once; everything after it is a
pure function of those per-pair scores and goes through the loss library
(:func:`alphadpo_cli.losses.compute_loss` with the method's own params and a
:class:`~alphadpo_cli.losses.MarginNormalizer`), so the numbers shown here are the numbers the
trainer would compute for the same pairs, grouped the same way:

* ``g`` (the paper's M) is the library's margin with ``normalization="none", α=1, γ/β=0``;
* ``z`` is the library's margin with ``α=1, γ/β=0`` under the chosen normalisation;
* the margin ``m = γ/β + α·z``, the per-pair loss and the implicit rewards come from the
  method's params with α (and γ/β) replaced by each value asked for.

Normalisation (``norm``), i.e. which μ, σ turn g into z:

* ``dataset`` — μ, σ of g over all the pairs inspected (the paper's "over the dataset"): the
  library's ``batch`` normaliser applied to one group holding every pair;
* ``batch`` — each group of ``norm_batch`` pairs (file order) z-scored on its own;
* ``ema`` / ``official`` — the training normaliser replayed from a fresh state over groups of
  ``norm_batch`` pairs in file order (what the trainer does, minus the shuffling);
* ``run`` — frozen: the μ, σ a training run logged last (metrics.jsonl);
* ``none`` — z = g;
* ``auto`` — ``none`` for the w/o-normalisation ablation, else ``dataset``.

Public API: :func:`compute_series` (scores → one series), :func:`inspect_margins` (models + data →
:class:`MarginReport`), :func:`plot_distributions`, :func:`plot_run`, :func:`load_run`,
:func:`render_histogram`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import Config, ConfigError
from ..losses import AlphaDPOParams, MarginNormalizer, PreferenceLogps, compute_loss, get_loss, make_normalizer, make_params

__all__ = [
    "NORM_MODES",
    "RunInfo",
    "RunStats",
    "PolicySpec",
    "PolicyScores",
    "Series",
    "MarginReport",
    "compute_series",
    "inspect_margins",
    "load_run",
    "describe",
    "correlation",
    "render_histogram",
    "plot_distributions",
    "plot_run",
    "read_png_series",
]

NORM_MODES = ("auto", "dataset", "batch", "ema", "official", "none", "run")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PNG_SERIES_KEY = "alphadpo:series"


# ---------------------------------------------------------------------------------------------
# training runs


@dataclass
class RunStats:
    """The normaliser state a run logged last: what training would use for its next batch."""

    mu: float
    sigma: float
    step: int


@dataclass
class RunInfo:
    """A training output directory: its resolved config, metrics and what it saved."""

    path: Path
    config: Config | None
    metrics: list[dict]
    has_adapter: bool
    has_full_model: bool

    @property
    def normalizer_stats(self) -> RunStats | None:
        for row in reversed(self.metrics):
            mu, sigma = row.get("normalizer/mu"), row.get("normalizer/sigma")
            if mu is not None and sigma is not None:
                return RunStats(float(mu), float(sigma), int(row.get("step", 0)))
        return None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric over the logged training steps (eval rows skipped)."""
        xs, ys = [], []
        for row in self.metrics:
            v = row.get(key)
            if v is None or "step" not in row:
                continue
            xs.append(float(row["step"]))
            ys.append(float(v))
        return xs, ys


def load_run(path: str | Path) -> RunInfo:
    """Read a training output directory (config.yaml, metrics.jsonl, adapter or model files)."""
    from ..config import load_config_file
    from ..train.logging import read_metrics

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"run directory not found: {p}")
    cfg = load_config_file(p / "config.yaml") if (p / "config.yaml").is_file() else None
    metrics = [r for r in read_metrics(p / "metrics.jsonl") if isinstance(r, dict)]
    if cfg is None and not metrics:
        raise ConfigError(f"{p} does not look like a training output directory (no config.yaml, no metrics.jsonl)")
    return RunInfo(
        path=p,
        config=cfg,
        metrics=metrics,
        has_adapter=(p / "adapter_config.json").is_file(),
        has_full_model=(p / "config.json").is_file(),
    )


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
        outs = []
        for sl in self.groups:
            outs.append(compute_loss(self.method, _inputs(scores, sl, dtype), params, normalizer))
        cat = lambda name: torch.cat([getattr(o, name).detach().reshape(-1).to(torch.float64) for o in outs]).numpy()  # noqa: E731
        last = outs[-1].metrics if outs else {}
        return {
            "margin": cat("margins"),
            "loss": cat("losses"),
            "reward_chosen": cat("chosen_rewards"),
            "reward_rejected": cat("rejected_rewards"),
            "mu": last.get("normalizer/mu"),
            "sigma": last.get("normalizer/sigma"),
        }


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
    m = get_loss(method)
    if params is None or isinstance(params, dict):
        params = make_params(method, params)
    if overrides:
        params = dataclasses.replace(params, **overrides)
    if getattr(params, "margin_source", "sequence") != "sequence":
        raise ConfigError(
            f"loss {method!r} takes its margin from token-level KLs (TDPO δ), which per-pair scores "
            "do not carry; inspect it as alpha_dpo instead"
        )
    n = int(scores.policy_chosen_logps.shape[0])
    if n == 0:
        raise ConfigError("no pairs to inspect")
    needs_ref = m.needs_reference or (_is_alpha_family(params) and params.reference_variant != "policy")
    if needs_ref and scores.ref_chosen_logps is None:
        raise ConfigError(f"loss {method!r} needs reference log-probs and none were computed")
    resolved = resolve_norm(norm, params, run_stats)
    runner = _Runner(method, resolved, n, norm_batch, run_stats)

    length_normalized = getattr(params, "length_normalized", m.length_normalized)
    full = _inputs(scores, slice(0, n), torch.float64)
    pc, pr, rc, rr = full.reduced(length_normalized)
    delta_theta = (pc - pr).numpy()
    delta_ref = None if rc is None else (rc - rr).numpy()

    g = z = None
    if _is_alpha_family(params):
        # g: the margin with no normalisation, α = 1, γ/β = 0  →  m = g.
        g_runner = _Runner(method, "none", n, norm_batch, None)
        g = g_runner.run(scores, g_runner.params_for(params, alpha=1.0, gamma_beta_ratio=0.0), dtype)["margin"]
        # z: the margin with this normalisation, α = 1, γ/β = 0  →  m = z.
        z = runner.run(scores, runner.params_for(params, alpha=1.0, gamma_beta_ratio=0.0), dtype)["margin"]
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
        "ema": f"training EMA normaliser replayed over groups of {norm_batch} pairs, file order (final {mu_sigma})",
        "official": f"authors' EMA replayed over groups of {norm_batch} pairs, file order (final {mu_sigma})",
        "run": f"frozen at the run's last logged normaliser ({mu_sigma})",
        "none": "none: z = g",
        "n/a": "not used by this method",
    }.get(series.norm, series.norm)


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class PolicyScores:
    """One policy's per-pair scores and the method/params its margins are computed with."""

    label: str
    source: str
    scores: PreferenceLogps
    method: str
    params: Any
    run_stats: RunStats | None = None


@dataclass
class MarginReport:
    pairs: list[dict]  # per pair: index, row, prompt, chosen, rejected
    policies: list[PolicyScores]
    series: list[Series]
    dataset: str = ""
    split: str = ""
    reference: str = ""
    norm: str = "auto"
    norm_batch: int = 8
    notes: list[str] = field(default_factory=list)
    primary_index: int = 0

    @property
    def primary(self) -> Series:
        """The series the tables, histogram and top/bottom pairs are about."""
        return self.series[self.primary_index]

    def policy(self, label: str) -> PolicyScores:
        return next(p for p in self.policies if p.label == label)

    def records(self) -> list[dict[str, Any]]:
        """Long format: one record per (series, pair)."""
        def arr(x):
            return None if x is None else np.asarray(x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                                                      dtype=np.float64)

        rows = []
        for s in self.series:
            sc = self.policy(s.policy).scores
            pc, pr, cl, rl = arr(sc.policy_chosen_logps), arr(sc.policy_rejected_logps), arr(sc.chosen_lengths), arr(sc.rejected_lengths)
            rc, rr = arr(sc.ref_chosen_logps), arr(sc.ref_rejected_logps)
            cols = {
                "policy_chosen_sum": pc, "policy_rejected_sum": pr,
                "policy_chosen_avg": pc / cl, "policy_rejected_avg": pr / rl,
                "ref_chosen_sum": rc, "ref_rejected_sum": rr,
                "ref_chosen_avg": None if rc is None else rc / cl, "ref_rejected_avg": None if rr is None else rr / rl,
                "chosen_len": cl, "rejected_len": rl, "length_diff": cl - rl,
                "delta_theta": s.delta_theta, "delta_ref": s.delta_ref, "g": s.g, "z": s.z,
                "margin": s.margin, "loss": s.loss, "reward_chosen": s.reward_chosen,
                "reward_rejected": s.reward_rejected, "reward_diff": s.reward_diff,
            }
            lists = {k: (None if v is None else v.tolist()) for k, v in cols.items()}
            correct = s.correct.tolist()
            head = {"series": s.label, "policy": s.policy, "method": s.method, "alpha": s.alpha,
                    "gamma_beta_ratio": s.gamma_beta_ratio, "beta": s.beta, "norm": s.norm}
            for i, pair in enumerate(self.pairs):
                rec = dict(head, index=pair["index"], row=pair["row"])
                for k, v in lists.items():
                    x = None if v is None else v[i]
                    if k in ("chosen_len", "rejected_len", "length_diff") and x is not None:
                        x = int(x)
                    elif x is not None and not math.isfinite(x):
                        x = None
                    rec[k] = x
                rec["correct"] = bool(correct[i])
                rec.update(prompt=pair["prompt"], chosen=pair["chosen"], rejected=pair["rejected"])
                rows.append(rec)
        return rows

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "pairs": len(self.pairs),
            "reference": self.reference,
            "norm": self.norm,
            "norm_batch": self.norm_batch,
            "notes": self.notes,
            "series": [s.summary() for s in self.series],
        }

    def write_pairs(self, path: str | Path) -> Path:
        """Every (series, pair) record as JSON Lines (.jsonl) or CSV (.csv)."""
        from ..io import atomic_path

        path = Path(path)
        records = self.records()
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                if path.suffix.lower() == ".csv":
                    writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else [])
                    writer.writeheader()
                    writer.writerows(records)
                else:
                    for r in records:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path

    def write_summary(self, path: str | Path) -> Path:
        from ..io import atomic_write_text

        atomic_write_text(path, json.dumps(_finite(self.summary()), indent=2, ensure_ascii=False, default=str))
        return Path(path)

    def extremes(self, k: int, series: Series | None = None) -> tuple[list[int], list[int]]:
        """Positions of the k pairs with the largest and the k with the smallest margin
        (z when the margin is constant, reward difference for methods without z)."""
        s = series or self.primary
        key = s.margin
        if np.ptp(key) < 1e-12:
            key = s.z if s.z is not None and np.ptp(s.z) > 0 else s.reward_diff
        order = np.argsort(key, kind="stable")
        k = max(0, min(k, key.size))
        return [int(i) for i in order[::-1][:k]], [int(i) for i in order[:k]]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# scoring models on data


@dataclass
class PolicySpec:
    """A policy to inspect: a LoRA adapter directory or a full model (directory or hub id)."""

    path: str
    kind: str = "adapter"  # adapter | full | base
    label: str | None = None


def parse_labelled(value: str) -> tuple[str | None, str]:
    """"LABEL=PATH" or "PATH" (a PATH that exists is never split)."""
    if "=" in value and not Path(value).expanduser().exists():
        label, _, path = value.partition("=")
        if label and path:
            return label, path
    return None, value


def _with_overrides(cfg: Config, loss: str | None, overrides: Sequence[str], model: str | None,
                    data: str | None) -> Config:
    from ..config import apply_loss_variant, apply_override, from_dict, validate

    d = cfg.to_dict()
    if loss:
        d = apply_loss_variant(d, loss)
    for item in overrides:
        d = apply_override(d, item)
    if model:
        d["model"]["name_or_path"] = model
    if data:
        d["data"]["dataset"] = data
    out = from_dict(d, source="margins config")
    validate(out)
    return out


def _policy_dir_run(spec: PolicySpec) -> RunInfo | None:
    p = Path(spec.path).expanduser()
    if p.is_dir() and ((p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file()):
        try:
            return load_run(p)
        except ConfigError:
            return None
    return None


def _series_label(params: Any, vary_alpha: bool, vary_gamma: bool) -> str:
    parts = []
    if vary_alpha:
        parts.append(f"α={params.alpha:g}")
    if vary_gamma:
        parts.append(f"γ/β={params.gamma_beta_ratio:g}")
    return ", ".join(parts)


def _default_policy_label(params: Any, spec: PolicySpec, several: bool) -> str:
    if spec.label:
        return spec.label
    if spec.kind == "base":
        return "base model"
    if several:
        return Path(spec.path).name or spec.path
    return "policy"


def _labels_from_params(params: list[Any]) -> list[str] | None:
    """"α=…" (or "γ/β=…") per policy when that is what tells the runs apart, else None."""
    for fieldname, sym in (("alpha", "α"), ("gamma_beta_ratio", "γ/β")):
        values = [getattr(p, fieldname, None) for p in params]
        if None not in values and len(set(values)) == len(values):
            return [f"{sym}={v:g}" for v in values]
    return None


def inspect_margins(
    data: str | None = None,
    *,
    model: str | None = None,
    policies: Sequence[PolicySpec] = (),
    run_dir: str | Path | None = None,
    preset: str | None = None,
    loss: str | None = None,
    overrides: Sequence[str] = (),
    split: str | None = None,
    max_samples: int | None = None,
    alphas: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    norm: str = "auto",
    norm_batch: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    use_reference_cache: bool = True,
    save_reference_cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> MarginReport:
    """Score every pair of a split with each policy (and the reference, from the cache when
    training left one) and compute one :class:`Series` per α (γ/β) value or per policy.

    Config: ``preset`` if given, else the run's config.yaml (``run_dir``, or the first policy if it
    is a training output directory), else the defaults; then ``loss``, ``overrides``
    (``--set KEY=VALUE``), ``model`` and ``data``. With several policies, each one's method and
    params come from its own config.yaml when it has one. Tokenisation follows ``cfg.data``
    (max_length, max_prompt_length, truncation; max_samples / max_eval_samples of the split), so
    the split's fingerprint — and the reference cache key — match training's.
    """
    from ..config import resolve_config
    from ..data import DataError, TokenizeSettings, tokenize_split
    from ..models.loading import model_fingerprint, quiet_libraries, resolve_dtype
    from ..models.adapters import reference_mode
    from ..logps.cache import ReferenceCache, cache_key
    from ..models.loading import load_for_inference as _load_for_inference
    from ..logps.scoring import score_pairs, score_with_reference

    quiet_libraries()
    say = log or (lambda _msg: None)
    if not data:
        raise ConfigError("give --data: the preference pairs to score")
    run = load_run(run_dir) if run_dir else None
    specs = list(policies)
    if not specs and run is not None:
        if run.has_adapter:
            specs = [PolicySpec(str(run.path), "adapter")]
        elif run.has_full_model:
            specs = [PolicySpec(str(run.path), "full")]
        else:
            raise ConfigError(f"{run.path} holds no adapter (adapter_config.json) and no model (config.json) to score")
    runs = {i: _policy_dir_run(s) for i, s in enumerate(specs)}
    if run is not None and len(specs) == 1 and runs[0] is None:
        runs[0] = run
    base_run = run or next((r for r in runs.values() if r is not None and r.config is not None), None)

    if preset:
        cfg = resolve_config(preset=preset)
    elif base_run is not None and base_run.config is not None:
        cfg = base_run.config
    else:
        cfg = resolve_config()
    cfg = _with_overrides(cfg, loss, overrides, model, data)
    if not specs:
        specs = [PolicySpec(cfg.model.name_or_path, "base")]
        runs = {0: None}
    several = len(specs) > 1

    # Method and params per policy.
    global_params = make_params(cfg.loss.name, cfg.loss.params)
    per_policy: list[tuple[str, Any, RunStats | None]] = []
    for i, spec in enumerate(specs):
        r = runs.get(i)
        method, params = cfg.loss.name, global_params
        if several and r is not None and r.config is not None and not (preset or loss):
            rc = _with_overrides(r.config, None, overrides, None, None)
            method, params = rc.loss.name, make_params(rc.loss.name, rc.loss.params)
        per_policy.append((method, params, r.normalizer_stats if r is not None else None))

    alphas = list(alphas) if alphas else None
    gammas = list(gammas) if gammas else None
    if several and ((alphas and len(alphas) > 1) or (gammas and len(gammas) > 1)):
        raise ConfigError(
            "with several policies each one is a curve: give at most one --alpha / --gamma value "
            "(or one policy and a list of values)"
        )
    for what, values, fieldname in (("--alpha", alphas, "alpha"), ("--gamma", gammas, "gamma_beta_ratio")):
        if values:
            for method, params, _ in per_policy:
                if not hasattr(params, fieldname):
                    raise ConfigError(f"{what}: loss {method!r} has no {fieldname} parameter")

    # Data.
    dcfg = cfg.data
    explicit_split = split is not None
    split = split or dcfg.eval_split or dcfg.train_split
    settings = TokenizeSettings(dcfg.max_length, dcfg.max_prompt_length, dcfg.truncation, dcfg.pipeline)

    def samples_for(name: str) -> int | None:
        if max_samples is not None:
            return max_samples
        if name == dcfg.train_split:
            return dcfg.max_samples
        return dcfg.max_eval_samples if name == dcfg.eval_split else None

    dtype = resolve_dtype(cfg.model.dtype)
    norm_batch = int(norm_batch or cfg.training.per_device_batch_size)
    batch_size = int(batch_size or cfg.training.eval_batch_size)

    # Whether the base model is known (else an adapter names its own base in adapter_config.json).
    model_known = bool(model or preset or (base_run is not None and base_run.config is not None))
    if not model_known and any(s.kind == "full" for s in specs):
        raise ConfigError("--policy needs --model BASE: the reference model the policy was trained from")
    if not model_known and specs[0].kind == "adapter":
        adapter_cfg = Path(specs[0].path).expanduser() / "adapter_config.json"
        base_name = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path") if adapter_cfg.is_file() else None
        if base_name:  # for the reference cache key
            cfg.model.name_or_path = base_name

    def load_for_inference(*args, **kwargs):
        with warnings.catch_warnings():  # peft's deprecation chatter would bury the report
            warnings.simplefilter("ignore", FutureWarning)
            return _load_for_inference(*args, **kwargs)

    def load(spec: PolicySpec):
        if spec.kind == "adapter":
            return load_for_inference(cfg.model.name_or_path if model_known else None, spec.path,
                                      dtype=cfg.model.dtype, device=device, chat_template=cfg.model.chat_template)
        return load_for_inference(spec.path, None, dtype=cfg.model.dtype, device=device,
                                  chat_template=cfg.model.chat_template)

    first_net, tokenizer = load(specs[0])
    try:
        tok_split = tokenize_split(dcfg.dataset, split, tokenizer, settings, samples_for(split))
    except DataError as exc:
        if explicit_split or ("no file for split" not in str(exc) and "no split" not in str(exc)) \
                or split == dcfg.train_split:
            raise
        say(f"no '{split}' split in {dcfg.dataset}: using '{dcfg.train_split}'")
        split = dcfg.train_split
        tok_split = tokenize_split(dcfg.dataset, split, tokenizer, settings, samples_for(split))
    n = len(tok_split)
    cols = tok_split.dataset.select_columns(["index", "row", "prompt", "chosen", "rejected"]).to_dict()
    pairs = [{k: cols[k][i] for k in cols} for i in range(n)]

    def prog(what: str):
        if progress is None:
            return None
        return lambda done, total: progress(what, done, total)

    # Reference log-probs: the training cache when present, else one pass of the base model.
    ref: PreferenceLogps | None = None
    key = cache_key(model_fingerprint(cfg.model, dtype), tok_split, dtype)
    ref_source = ""
    cache = ReferenceCache()
    if use_reference_cache:
        ref = cache.load(key, n)
        if ref is not None:
            ref_source = f"cache hit ({key})"
    scored: list[PolicyScores] = []
    try:
        if ref is None:
            if specs[0].kind == "adapter":
                with reference_mode(first_net) as net:
                    ref = score_pairs(net, tok_split, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, longest_first=True,
                                            progress=prog("reference"))
                ref_source = "computed (base model, adapter disabled)"
            elif specs[0].kind == "base":
                ref = score_pairs(first_net, tok_split, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, longest_first=True,
                                        progress=prog("reference"))
                ref_source = "computed (base model)"
            else:
                base_net, _ = load_for_inference(cfg.model.name_or_path, None, dtype=cfg.model.dtype, device=device,
                                                 chat_template=cfg.model.chat_template)
                ref = score_pairs(base_net, tok_split, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size, longest_first=True,
                                        progress=prog("reference"))
                del base_net
                ref_source = f"computed (base model {cfg.model.name_or_path})"
            if save_reference_cache:
                cache.save(key, ref, {"model": cfg.model.name_or_path, "split": tok_split.source, "rows": n})
                ref_source += f", cached as {key}"

        auto_labels = _labels_from_params([p for _, p, _ in per_policy]) if several else None
        for i, spec in enumerate(specs):
            net = first_net if i == 0 else load(spec)[0]
            method, params, run_stats = per_policy[i]
            label = spec.label or (auto_labels[i] if auto_labels else _default_policy_label(params, spec, several))
            taken = {p.label for p in scored}
            if label in taken:  # the same directory twice, or two runs with the same name
                label = next(f"{label} ({k})" for k in range(2, len(specs) + 2) if f"{label} ({k})" not in taken)
            scores = score_with_reference(net, tok_split, reference_scores=ref, pad_token_id=tokenizer.pad_token_id,
                                          batch_size=batch_size, progress=prog(f"policy {label}"))
            scored.append(PolicyScores(label, spec.path, scores, method, params, run_stats))
            if net is not first_net:
                del net
    finally:
        del first_net

    # Series: one per α/γ value (one policy) or one per policy.
    series: list[Series] = []
    vary_alpha, vary_gamma = bool(alphas and len(alphas) > 1), bool(gammas and len(gammas) > 1)
    for ps in scored:
        for a in (alphas or [None]):
            for gm in (gammas or [None]):
                changes = {}
                if a is not None:
                    changes["alpha"] = float(a)
                if gm is not None:
                    changes["gamma_beta_ratio"] = float(gm)
                params = dataclasses.replace(ps.params, **changes) if changes else ps.params
                label = _series_label(params, vary_alpha, vary_gamma) if (vary_alpha or vary_gamma) else ps.label
                series.append(compute_series(
                    ps.scores, ps.method, params, norm=norm, norm_batch=norm_batch, run_stats=ps.run_stats,
                    label=label, policy=ps.label,
                ))
    notes = []
    if len(scored) == 1 and len(series) > 1:
        notes.append("one policy: the curves differ only through the margin, loss and reward definitions; "
                     "the policy's log-likelihoods are the same for every value")
    return MarginReport(pairs=pairs, policies=scored, series=series, dataset=dcfg.dataset, split=split,
                        reference=ref_source, norm=norm, norm_batch=norm_batch, notes=notes,
                        primary_index=_pick_primary(series, scored[0].params))


def _pick_primary(series: list[Series], configured: Any) -> int:
    """The series with the configured α and γ/β, else the first whose margin varies, else the first."""
    for i, s in enumerate(series):
        if s.policy == series[0].policy and s.alpha == getattr(configured, "alpha", None) \
                and s.gamma_beta_ratio == getattr(configured, "gamma_beta_ratio", None):
            return i
    for i, s in enumerate(series):
        if np.ptp(s.margin) > 1e-12:
            return i
    return 0


# ---------------------------------------------------------------------------------------------
# terminal


_PARTIAL = " ▏▎▍▌▋▊▉"


def render_histogram(values: np.ndarray, *, bins: int = 20, width: int = 40, title: str = ""):
    """A rich table: one row per bin, a bar of unicode blocks proportional to its count."""
    from rich.table import Table
    from rich.text import Text

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    table = Table(title=title, show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("from", justify="right")
    table.add_column("to", justify="right")
    table.add_column("", justify="left", no_wrap=True)
    table.add_column("pairs", justify="right")
    if v.size == 0:
        table.add_row("-", "-", Text("no finite values"), "0")
        return table
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        counts, edges = np.array([v.size]), np.array([lo, hi])
    else:
        counts, edges = np.histogram(v, bins=max(1, int(bins)), range=(lo, hi))
    peak = max(1, int(counts.max()))
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        cells = c / peak * width
        full = int(cells)
        part = int(round((cells - full) * 8))
        if part == 8:
            full, part = full + 1, 0
        bar = "█" * full + (_PARTIAL[part] if part else "")
        table.add_row(f"{a:.4g}", f"{b:.4g}", Text(bar, style="cyan"), str(int(c)))
    return table


# ---------------------------------------------------------------------------------------------
# plots


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian kernel density (Silverman's bandwidth); None when the values are (nearly) constant."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return None
    std = float(x.std(ddof=1))
    iqr = float(np.subtract(*np.percentile(x, [75, 25])))
    spread = min(std, iqr / 1.349) if iqr > 0 else std
    scale = max(1.0, float(np.abs(x).max()))
    if spread <= 1e-9 * scale:
        return None
    bw = 0.9 * spread * x.size ** (-0.2)
    dens = np.zeros_like(grid)
    for start in range(0, x.size, 2048):  # bounded memory on large splits
        d = (grid[:, None] - x[None, start:start + 2048]) / bw
        dens += np.exp(-0.5 * d * d).sum(axis=1)
    return dens / (x.size * bw * math.sqrt(2 * math.pi))


def _grid(arrays: list[np.ndarray]) -> np.ndarray:
    allv = np.concatenate([np.asarray(a, dtype=np.float64)[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(1)
    if allv.size == 0:
        allv = np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    pad = (hi - lo) * 0.15 or max(abs(lo), 1.0) * 0.05
    return np.linspace(lo - pad, hi + pad, 512)


def _colors(n: int):
    plt = _mpl()
    cmap = plt.get_cmap("viridis")
    return [cmap(0.1 + 0.75 * i / max(1, n - 1)) for i in range(n)]


def _style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.grid(alpha=0.3, linestyle=":")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _density_plot(ax, named: list[tuple[str, np.ndarray]], colors, *, dashed: set[str] = frozenset()) -> list[str]:
    grid = _grid([v for _, v in named])
    drawn = []
    for (label, values), color in zip(named, colors):
        dens = _kde(values, grid)
        style = "--" if label in dashed else "-"
        if dens is None:  # a constant (e.g. SimPO's margin): a spike
            finite = np.asarray(values, dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            ax.axvline(float(finite.mean()) if finite.size else 0.0, color=color, linestyle=style, lw=2,
                       label=f"{label} (constant)")
        else:
            ax.plot(grid, dens, color=color, lw=2, linestyle=style, label=label)
            if label not in dashed:
                ax.fill_between(grid, dens, color=color, alpha=0.18)
        drawn.append(label)
    ax.legend(frameon=False, fontsize=9)
    return drawn


def _save(fig, path: Path, series: list[str], title: str) -> Path:
    from ..io import atomic_path

    plt = _mpl()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight",
                    metadata={"Title": title, "Software": "alphadpo margins", PNG_SERIES_KEY: json.dumps(series)})
    plt.close(fig)
    return path


def read_png_series(path: str | Path) -> list[str]:
    """The series labels a plot written here records in its PNG text chunk."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return json.loads(im.text.get(PNG_SERIES_KEY, "[]"))


def plot_distributions(report: MarginReport, out_dir: str | Path, prefix: str = "margins") -> dict[str, Path]:
    """Figures 4(b,c) / 6 of the paper, one PNG each, plus the margin's own distribution:

    * ``<prefix>-reward.png`` — density of the reward difference r(x,y_w) − r(x,y_l), one curve per series
      (per α, per γ/β, or per policy);
    * ``<prefix>-loglik.png`` — density of the chosen response's mean log-likelihood
      log πθ(y_w|x)/|y_w|, one curve per policy (it does not depend on α) and the reference, dashed;
    * ``<prefix>-margin.png`` — density of the adaptive margin m = γ/β + α·z, one curve per series.
    """
    plt = _mpl()
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    colors = _colors(len(report.series))
    data_note = f"{report.dataset} [{report.split}], {len(report.pairs)} pairs"

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    labels = _density_plot(ax, [(s.label, s.reward_diff) for s in report.series], colors)
    ax.axvline(0.0, color="grey", lw=0.8, alpha=0.6)
    _style(ax, "Reward difference distribution", "r(x, y_w) − r(x, y_l)")
    fig.text(0.01, -0.02, data_note, fontsize=7, color="grey")
    written["reward"] = _save(fig, out_dir / f"{prefix}-reward.png", labels, "reward difference distribution")

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    named = [(p.label, (p.scores.policy_chosen_logps / p.scores.chosen_lengths).double().numpy()) for p in report.policies]
    dashed = set()
    ref_scores = report.policies[0].scores
    if ref_scores.ref_chosen_logps is not None:
        named.append(("reference", (ref_scores.ref_chosen_logps / ref_scores.chosen_lengths).double().numpy()))
        dashed.add("reference")
    pol_colors = _colors(len(report.policies)) + ["0.35"]
    labels = _density_plot(ax, named, pol_colors, dashed=dashed)
    _style(ax, "Log-likelihood of chosen responses", "log πθ(y_w | x) / |y_w|")
    fig.text(0.01, -0.02, data_note, fontsize=7, color="grey")
    written["loglik"] = _save(fig, out_dir / f"{prefix}-loglik.png", labels, "chosen log-likelihood distribution")

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    labels = _density_plot(ax, [(s.label, s.margin) for s in report.series], colors)
    _style(ax, "Adaptive margin m = γ/β + α·z", "margin m (ratio units)")
    fig.text(0.01, -0.02, data_note + f", normalisation: {report.primary.norm}", fontsize=7, color="grey")
    written["margin"] = _save(fig, out_dir / f"{prefix}-margin.png", labels, "margin distribution")
    return written


RUN_MARGIN_KEYS = ("margin/mean", "margin/std", "margin/min", "margin/max")
RUN_NORM_KEYS = ("normalizer/mu", "normalizer/sigma")


def plot_run(run: RunInfo | str | Path, path: str | Path) -> Path:
    """Training curves of the margin statistics and of the normaliser's μ and σ (metrics.jsonl)."""
    plt = _mpl()
    info = run if isinstance(run, RunInfo) else load_run(run)
    available = [k for k in RUN_MARGIN_KEYS + RUN_NORM_KEYS if info.series(k)[0]]
    if not available:
        raise ConfigError(
            f"{info.path / 'metrics.jsonl'} has no margin or normaliser statistics to plot "
            "(was the run an α-DPO method, and did it log at least one step?)"
        )
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    drawn: list[str] = []
    ax = axes[0]
    xs, mean = info.series("margin/mean")
    if xs:
        ax.plot(xs, mean, color="C0", lw=2, marker="o" if len(xs) < 30 else None, ms=3, label="mean")
        drawn.append("margin/mean")
        sx, std = info.series("margin/std")
        if sx and len(sx) == len(xs):
            m, s = np.asarray(mean), np.asarray(std)
            ax.fill_between(xs, m - s, m + s, color="C0", alpha=0.2, label="± std")
            drawn.append("margin/std")
    for key, style in (("margin/min", ":"), ("margin/max", "--")):
        kx, kv = info.series(key)
        if kx:
            ax.plot(kx, kv, color="C0", lw=1, linestyle=style, label=key.split("/")[1],
                    marker="." if len(kx) < 30 else None, ms=4)
            drawn.append(key)
    ax.set_title("adaptive margin m (per logged step)", fontsize=11)
    for a, key, color, title in ((axes[1], "normalizer/mu", "C1", "normaliser μ"),
                                 (axes[2], "normalizer/sigma", "C2", "normaliser σ")):
        kx, kv = info.series(key)
        if kx:
            a.plot(kx, kv, color=color, lw=2, marker="o" if len(kx) < 30 else None, ms=3, label=key.split("/")[1])
            drawn.append(key)
            if key.endswith("sigma") and min(kv) > 0 and max(kv) / min(kv) > 50:
                a.set_yscale("log")
        a.set_title(title, fontsize=11)
    for a in axes:
        a.set_xlabel("optimiser step")
        a.grid(alpha=0.3, linestyle=":")
        for side in ("top", "right"):
            a.spines[side].set_visible(False)
        if a.get_legend_handles_labels()[0]:
            a.legend(frameon=False, fontsize=8)
    fig.suptitle(f"training run {info.path.name}", fontsize=11)
    fig.tight_layout()
    return _save(fig, Path(path), drawn, "training margin statistics")
