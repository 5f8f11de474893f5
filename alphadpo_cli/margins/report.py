"""What `alphadpo margins` hands back and writes: :class:`MarginReport` (the pairs, each policy's
scores, the series), its per-pair records (JSON Lines or CSV) and summary.json; and
:class:`RunInfo`, a training output directory read back (config, metrics, saved model).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, load_config_file
from ..io import atomic_path, atomic_write_text, read_metrics
from ..losses import PreferenceLogps
from .series import RunStats, Series


# ---------------------------------------------------------------------------------------------
# training runs


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
    """What :func:`~alphadpo_cli.margins.inspect_margins` returns: the pairs, each policy's scores and
    one :class:`Series` per α (γ/β) value or per policy; ``primary`` is the one the terminal shows."""

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
        rows = []
        for s in self.series:
            sc = self.policy(s.policy).scores
            pc, pr = _array(sc.policy_chosen_logps), _array(sc.policy_rejected_logps)
            cl, rl = _array(sc.chosen_lengths), _array(sc.rejected_lengths)
            rc, rr = _array(sc.ref_chosen_logps), _array(sc.ref_rejected_logps)
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


def _array(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                                              dtype=np.float64)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

