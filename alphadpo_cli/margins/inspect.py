"""Models and data to a :class:`~alphadpo_cli.margins.report.MarginReport`, in four steps:

1. resolve: the config (preset, else the run's config.yaml, else the defaults, then the options),
   the policies and each one's method, params and logged normaliser statistics;
2. tokenise the split as training did (so its fingerprint, and the reference cache key, match);
3. score: the reference once (the training cache when present, else one pass of the base model,
   through :meth:`~alphadpo_cli.logps.cache.ReferenceCache.get_or_compute`), then each policy
   with :func:`~alphadpo_cli.logps.scoring.score_with_reference`;
4. one :class:`~alphadpo_cli.margins.series.Series` per α (γ/β) value or per policy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import (Config, ConfigError, DataConfig, apply_loss_variant, apply_override, from_dict, resolve_config,
                      validate)
from ..data import MissingSplitError, TokenizedSplit, TokenizeSettings, tokenize_split
from ..logps.cache import ReferenceCache, cache_key
from ..logps.scoring import score_pairs, score_with_reference
from ..losses import PreferenceLogps, make_params
from ..models.adapters import reference_mode
from ..models.loading import load_for_inference, model_fingerprint, quiet_libraries, resolve_dtype
from .options import InspectOptions, PolicySpec
from .report import MarginReport, PolicyScores, RunInfo, load_run
from .series import RunStats, Series, compute_series

Progress = Callable[[str, int, int], None]


def inspect_margins(data: str | InspectOptions | None = None, *, progress: Progress | None = None,
                    log: Callable[[str], None] | None = None, **options: Any) -> MarginReport:
    """Score every pair of a split with each policy (and the reference, from the cache when
    training left one) and compute one :class:`Series` per α (γ/β) value or per policy.

    ``inspect_margins(InspectOptions(...))``, or the data and the fields of :class:`InspectOptions`
    as keywords: ``inspect_margins("prefs/", run_dir="outputs/tiny", alphas=[0, 0.1])``. With several
    policies, each one's method and params come from its own config.yaml when it has one.
    ``progress(what, done, total)`` follows each scoring pass; ``log`` gets one-line notices.
    """
    if isinstance(data, InspectOptions):
        if options:
            raise TypeError(f"inspect_margins: give an InspectOptions or keyword options, not both ({', '.join(options)})")
        opts = data
    else:
        opts = InspectOptions(data=data, **options)
    quiet_libraries()
    plan = _resolve(opts)
    loader = _Loader(plan.cfg, plan.model_known, opts.device)
    first_net, tokenizer = loader.load(plan.specs[0])
    try:
        split, tok_split = _tokenize(plan.cfg.data, opts.split, opts.max_samples, tokenizer, log)
        ref, ref_source = _reference(plan, opts, loader, first_net, tok_split, tokenizer.pad_token_id, progress)
        scored = _score_policies(plan, loader, first_net, tok_split, tokenizer.pad_token_id, ref, progress)
    finally:
        del first_net
    series = _series(scored, opts.alphas, opts.gammas, opts.norm, plan.norm_batch)
    notes = []
    if len(scored) == 1 and len(series) > 1:
        notes.append("one policy: the curves differ only through the margin, loss and reward definitions; "
                     "the policy's log-likelihoods are the same for every value")
    return MarginReport(pairs=_pairs(tok_split), policies=scored, series=series, dataset=plan.cfg.data.dataset,
                        split=split, reference=ref_source, norm=opts.norm, norm_batch=plan.norm_batch, notes=notes,
                        primary_index=_pick_primary(series, scored[0].params))


# ---------------------------------------------------------------------------------------------
# 1. resolve: config, policies, methods


@dataclass
class PolicyMethod:
    """How one policy's margins are computed: its method, params and the normaliser state its run logged."""

    method: str
    params: Any
    run_stats: RunStats | None = None


@dataclass
class InspectPlan:
    """The options resolved against the config: what to score, with which method, in which batches."""

    cfg: Config
    specs: list[PolicySpec]
    methods: list[PolicyMethod]  # one per spec
    model_known: bool  # else an adapter names its own base in adapter_config.json
    norm_batch: int
    batch_size: int

    @property
    def several(self) -> bool:
        return len(self.specs) > 1


def _resolve(opts: InspectOptions) -> InspectPlan:
    run = load_run(opts.run_dir) if opts.run_dir else None
    specs = _policy_specs(opts.policies, run)
    runs = [_policy_dir_run(s) for s in specs]
    if run is not None and len(specs) == 1 and runs[0] is None:
        runs[0] = run
    base_run = run or next((r for r in runs if r is not None and r.config is not None), None)
    cfg = _with_overrides(_base_config(opts.preset, base_run), opts.loss, opts.overrides, opts.model, opts.data)
    if not specs:
        specs, runs = [PolicySpec(cfg.model.name_or_path, "base")], [None]
    methods = _policy_methods(cfg, runs, opts)
    _check_sweep_fields(opts, methods)
    model_known = bool(opts.model or opts.preset or (base_run is not None and base_run.config is not None))
    if not model_known:
        if any(s.kind == "full" for s in specs):
            raise ConfigError("--policy needs --model BASE: the reference model the policy was trained from")
        cfg.model.name_or_path = _adapter_base(specs[0]) or cfg.model.name_or_path  # for the reference cache key
    return InspectPlan(cfg, specs, methods, model_known,
                       # the trainer's groups: EMA statistics per optimiser step, the official ones per micro-batch
                       norm_batch=int(opts.norm_batch or (cfg.training.global_batch_size if opts.norm == "ema"
                                                          else cfg.training.per_device_batch_size)),
                       batch_size=int(opts.batch_size or cfg.training.eval_batch_size))


def _check_sweep_fields(opts: InspectOptions, methods: list[PolicyMethod]) -> None:
    for what, values, fieldname in (("--alpha", opts.alphas, "alpha"), ("--gamma", opts.gammas, "gamma_beta_ratio")):
        if not values:
            continue
        for m in methods:
            if not hasattr(m.params, fieldname):
                raise ConfigError(f"{what}: loss {m.method!r} has no {fieldname} parameter")


def _policy_specs(policies: Sequence[PolicySpec], run: RunInfo | None) -> list[PolicySpec]:
    """The policies asked for; else the run's own (its adapter or full model); else none (the base model)."""
    if policies or run is None:
        return list(policies)
    if run.has_adapter:
        return [PolicySpec(str(run.path), "adapter")]
    if run.has_full_model:
        return [PolicySpec(str(run.path), "full")]
    raise ConfigError(f"{run.path} holds no adapter (adapter_config.json) and no model (config.json) to score")


def _policy_dir_run(spec: PolicySpec) -> RunInfo | None:
    p = Path(spec.path).expanduser()
    if p.is_dir() and ((p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file()):
        try:
            return load_run(p)
        except ConfigError:
            return None
    return None


def _base_config(preset: str | None, base_run: RunInfo | None) -> Config:
    if preset:
        return resolve_config(preset=preset)
    if base_run is not None and base_run.config is not None:
        return base_run.config
    return resolve_config()


def _with_overrides(cfg: Config, loss: str | None, overrides: Sequence[str], model: str | None,
                    data: str | None) -> Config:
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


def _policy_methods(cfg: Config, runs: list[RunInfo | None], opts: InspectOptions) -> list[PolicyMethod]:
    """The config's method and params for every policy; with several policies, each run's own config's
    (the options' --set applied) unless a preset or a loss is forced."""
    global_params = make_params(cfg.loss.name, cfg.loss.params)
    several = len(runs) > 1
    out = []
    for r in runs:
        method, params = cfg.loss.name, global_params
        if several and r is not None and r.config is not None and not (opts.preset or opts.loss):
            rc = _with_overrides(r.config, None, opts.overrides, None, None)
            method, params = rc.loss.name, make_params(rc.loss.name, rc.loss.params)
        out.append(PolicyMethod(method, params, r.normalizer_stats if r is not None else None))
    return out


def _adapter_base(spec: PolicySpec) -> str | None:
    """The base model an adapter directory names (adapter_config.json), if any."""
    if spec.kind != "adapter":
        return None
    adapter_cfg = Path(spec.path).expanduser() / "adapter_config.json"
    return json.loads(adapter_cfg.read_text()).get("base_model_name_or_path") if adapter_cfg.is_file() else None


@dataclass
class _Loader:
    """Loads a policy, or the base model, for scoring as the resolved config says."""

    cfg: Config
    model_known: bool
    device: Any = None

    def load(self, spec: PolicySpec):
        """(network, tokenizer) of a policy: an adapter on the base, or a full model."""
        if spec.kind == "adapter":
            return self._load(self.cfg.model.name_or_path if self.model_known else None, spec.path)
        return self._load(spec.path, None)

    def load_base(self) -> torch.nn.Module:
        return self._load(self.cfg.model.name_or_path, None)[0]

    def _load(self, model: str | None, adapter: str | None):
        with warnings.catch_warnings():  # peft's deprecation chatter would bury the report
            warnings.simplefilter("ignore", FutureWarning)
            return load_for_inference(model, adapter, dtype=self.cfg.model.dtype, device=self.device,
                                      chat_template=self.cfg.model.chat_template)


# ---------------------------------------------------------------------------------------------
# 2. tokenise


def _samples_for(dcfg: DataConfig, split: str, max_samples: int | None) -> int | None:
    """The pairs to keep of a split: the option, else the config's limit for that split."""
    if max_samples is not None:
        return max_samples
    if split == dcfg.train_split:
        return dcfg.max_samples
    return dcfg.max_eval_samples if split == dcfg.eval_split else None


def _tokenize(dcfg: DataConfig, split: str | None, max_samples: int | None, tokenizer,
              log: Callable[[str], None] | None) -> tuple[str, TokenizedSplit]:
    """(split name, tokenised split) as training tokenises it. No split asked for: the eval split,
    else the train split, and the train split when the data have no eval split."""
    settings = TokenizeSettings(dcfg.max_length, dcfg.max_prompt_length, dcfg.truncation, dcfg.pipeline)
    name = split or dcfg.eval_split or dcfg.train_split
    try:
        return name, tokenize_split(dcfg.dataset, name, tokenizer, settings, _samples_for(dcfg, name, max_samples))
    except MissingSplitError:
        if split is not None or name == dcfg.train_split:
            raise
    if log is not None:
        log(f"no '{name}' split in {dcfg.dataset}: using '{dcfg.train_split}'")
    name = dcfg.train_split
    return name, tokenize_split(dcfg.dataset, name, tokenizer, settings, _samples_for(dcfg, name, max_samples))


def _pairs(split: TokenizedSplit) -> list[dict]:
    cols = split.dataset.select_columns(["index", "row", "prompt", "chosen", "rejected"]).to_dict()
    return [{k: cols[k][i] for k in cols} for i in range(len(split))]


# ---------------------------------------------------------------------------------------------
# 3. score


def _hook(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    return None if progress is None else functools.partial(progress, what)


def _never(_hit: bool) -> bool:
    return False  # --no-cache: take the compute branch whatever is on disk


def _reference(plan: InspectPlan, opts: InspectOptions, loader: _Loader, first_net: torch.nn.Module,
               split: TokenizedSplit, pad_token_id: int, progress: Progress | None) -> tuple[PreferenceLogps, str]:
    """(reference scores, where they came from): the training cache's, else one pass of the base model."""
    cfg, spec = plan.cfg, plan.specs[0]
    dtype = resolve_dtype(cfg.model.dtype)
    key = cache_key(model_fingerprint(cfg.model, dtype), split, dtype)
    compute = functools.partial(_score_reference, first_net, spec, loader, split, pad_token_id=pad_token_id,
                                batch_size=plan.batch_size, progress=_hook(progress, "reference"))
    ref, hit = ReferenceCache().get_or_compute(
        key, len(split), compute, meta={"model": cfg.model.name_or_path, "split": split.source, "rows": len(split)},
        agree=None if opts.use_reference_cache else _never, save=opts.save_reference_cache)
    if hit:
        return ref, f"cache hit ({key})"
    source = {"adapter": "computed (base model, adapter disabled)", "base": "computed (base model)"}.get(
        spec.kind, f"computed (base model {cfg.model.name_or_path})")
    return ref, source + (f", cached as {key}" if opts.save_reference_cache else "")


def _score_reference(first_net: torch.nn.Module, spec: PolicySpec, loader: _Loader, split: TokenizedSplit, *,
                     pad_token_id: int, batch_size: int, progress) -> PreferenceLogps:
    """The reference's scores: the first policy with its adapter disabled, the base model itself, or,
    next to a full policy, the base model loaded for this one pass."""
    reference = loader.load_base() if spec.kind == "full" else first_net if spec.kind == "base" else None
    with reference_mode(first_net, reference) as net:
        return score_pairs(net, split, pad_token_id=pad_token_id, batch_size=batch_size, longest_first=True,
                           progress=progress)


def _score_policies(plan: InspectPlan, loader: _Loader, first_net: torch.nn.Module, split: TokenizedSplit,
                    pad_token_id: int, ref: PreferenceLogps, progress: Progress | None) -> list[PolicyScores]:
    """Each policy's scores with the reference terms, one policy loaded at a time (the first is loaded already)."""
    auto_labels = _labels_from_params([m.params for m in plan.methods]) if plan.several else None
    scored: list[PolicyScores] = []
    for i, (spec, m) in enumerate(zip(plan.specs, plan.methods)):
        net = first_net if i == 0 else loader.load(spec)[0]
        label = _unique(spec.label or (auto_labels[i] if auto_labels else _default_policy_label(spec, plan.several)),
                        {p.label for p in scored})
        scores = score_with_reference(net, split, reference_scores=ref, pad_token_id=pad_token_id,
                                      batch_size=plan.batch_size, progress=_hook(progress, f"policy {label}"))
        scored.append(PolicyScores(label, spec.path, scores, m.method, m.params, m.run_stats))
        del net
    return scored


def _default_policy_label(spec: PolicySpec, several: bool) -> str:
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


def _unique(label: str, taken: set[str]) -> str:
    """`label`, or "label (2)", "label (3)"...: the same directory twice, or two runs with the same name."""
    if label not in taken:
        return label
    return next(f"{label} ({k})" for k in range(2, len(taken) + 3) if f"{label} ({k})" not in taken)


# ---------------------------------------------------------------------------------------------
# 4. series


def _series(scored: list[PolicyScores], alphas: Sequence[float] | None, gammas: Sequence[float] | None,
            norm: str, norm_batch: int) -> list[Series]:
    """One series per α / γ/β value (one policy), else one per policy."""
    vary_alpha, vary_gamma = bool(alphas and len(alphas) > 1), bool(gammas and len(gammas) > 1)
    series: list[Series] = []
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
                series.append(compute_series(ps.scores, ps.method, params, norm=norm, norm_batch=norm_batch,
                                             run_stats=ps.run_stats, label=label, policy=ps.label))
    return series


def _series_label(params: Any, vary_alpha: bool, vary_gamma: bool) -> str:
    parts = []
    if vary_alpha:
        parts.append(f"α={params.alpha:g}")
    if vary_gamma:
        parts.append(f"γ/β={params.gamma_beta_ratio:g}")
    return ", ".join(parts)


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
