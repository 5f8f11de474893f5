"""compare.json from the work log's records: per method (at its chosen setting) the mean ± SE and the
95% t-interval over seeds of every metric, the grid as validation saw it, the base model's numbers,
and the paired per-prompt reward differences against the baseline method (`stats`)."""

from __future__ import annotations

from .. import results as shared
from .plan import chosen_runs, point_name, points_for
from .stats import interval, paired_difference

#: What the comparison chooses a grid's setting by (on the validation pairs, never on the test set).
SELECTION = ("the mean over seeds of the held-out preference accuracy on the validation pairs (the implicit "
             "reward, the length-normalised log-likelihood; ties: the log-ratio accuracy, then the first setting)")
REWARD_METRICS = ("mean_reward", "win_rate", "constraints_satisfied", "all_constraints_satisfied", "length_tokens")


def _train(c, run_id: str) -> dict:
    return c.done("train", run_id) or {}


def validation_table(c, method: str) -> list[dict]:
    """Per grid point of `method`, in grid order: the held-out accuracy of its runs' own evaluation
    (the validation pairs when a grid is given) over seeds."""
    rows = []
    for order, point in enumerate(points_for(method, c.axes)):
        runs = [r for r in c.runs if r.method == method and r.point == point]
        after = [(_train(c, r.id).get("eval_after") or {}) for r in runs]
        acc, ref = interval([a.get("accuracy") for a in after]), interval([a.get("accuracy_ref") for a in after])
        rows.append({"point": point, "name": point_name(point) or "(preset)", "order": order,
                     "accuracy": acc, "accuracy_ref": ref, "seeds": [r.seed for r in runs],
                     "score": acc["mean"] if acc else float("-inf"),
                     "score_ref": ref["mean"] if ref else float("-inf")})
    return rows


def _run_metrics(c, run) -> dict:
    """One run's numbers: test accuracy, validation accuracy (with a grid), the reward judge's."""
    after = _train(c, run.id).get("eval_after") or {}
    test = (c.done("test", run.id) or {}).get("report") if c.tuning else after
    out = {"accuracy": (test or {}).get("accuracy"), "accuracy_ref": (test or {}).get("accuracy_ref"),
           "train_seconds": _train(c, run.id).get("seconds")}
    if c.tuning:
        out["validation_accuracy"] = after.get("accuracy")
    reward = (c.done("reward", run.id) or {}).get("summary") or {}
    out.update({k: reward.get(k) for k in REWARD_METRICS if k in reward})
    return out


def method_summary(c, method: str) -> dict:
    runs = chosen_runs(c.runs, method, c.chosen[method]["point"])
    per_run = {r.id: _run_metrics(c, r) for r in runs}
    names = list(dict.fromkeys(k for m in per_run.values() for k in m))
    chosen = c.chosen[method]
    grid = [{k: v for k, v in row.items() if k not in ("score", "score_ref", "order")} for row in chosen["grid"]]
    return {"method": method, "setting": chosen["name"], "point": chosen["point"], "seeds": [r.seed for r in runs],
            "runs": {r.id: str(r.run_dir) for r in runs}, "per_run": per_run,
            "metrics": {k: interval([m.get(k) for m in per_run.values()]) for k in names},
            "grid": grid if c.tuning else None}


def base_summary(c) -> dict:
    """The base model's numbers (no seeds: one model): test accuracy and the reward judge's."""
    if c.tuning:
        test = (c.done("test", "base") or {}).get("report") or {}
    else:
        test = next((_train(c, r.id).get("eval_before") for r in c.runs if _train(c, r.id).get("eval_before")), {})
    reward = (c.done("reward", "base") or {}).get("summary") or {}
    return {"accuracy": (test or {}).get("accuracy"), **{k: reward.get(k) for k in REWARD_METRICS if k in reward},
            **({"reward_se": reward["reward_se"], "n_prompts": reward.get("n_prompts")} if "reward_se" in reward else {})}


def pairs_to_compare(losses, baseline: str | None) -> list[tuple[str, str]]:
    """(method, baseline) pairs: each method against --baseline-method, or the first method against
    each of the others."""
    if baseline is not None:
        return [(m, baseline) for m in losses if m != baseline]
    return [(losses[0], m) for m in losses[1:]]


def _scores_by_seed(c, method: str) -> dict[str, dict]:
    runs = chosen_runs(c.runs, method, c.chosen[method]["point"])
    return {str(r.seed): (c.done("reward", r.id) or {}).get("scores") or {} for r in runs}


def paired(c) -> list[dict]:
    if not c.opts.reward:
        return []
    out = []
    for method, baseline in pairs_to_compare(list(c.opts.losses), c.opts.baseline_method):
        diff = paired_difference(_scores_by_seed(c, method), _scores_by_seed(c, baseline))
        if diff is not None:
            out.append({"method": method, "baseline": baseline, "metric": "reward", **diff})
    return out


def results_section(methods: list[dict], base: dict, paired_rows: list[dict], base_model: str | None) -> dict:
    """compare.json's `results` (the format iterate's rounds.json shares, `alphadpo_cli.results`): the base
    model (one model: the reward's SE over the test prompts), then each method at its chosen setting
    (every metric over its seeds)."""
    base_metrics = {k: shared.estimate(base.get(k)) for k in ("accuracy", *REWARD_METRICS)}
    base_metrics["mean_reward"] = shared.estimate(base.get("mean_reward"), base.get("reward_se"), base.get("n_prompts"),
                                                  unit="prompts")
    rows = [shared.row("base model", "base", base_metrics, model=base_model)]
    for m in methods:
        rows.append(shared.row(m["method"], "method", {k: shared.with_unit(iv, "seeds") for k, iv in m["metrics"].items()
                                                       if k != "train_seconds"},
                               setting=m["setting"], model=list(m["runs"].values())))
    paired_rows = [{**d, "metric": "mean_reward" if d.get("metric") == "reward" else d.get("metric")}
                   for d in paired_rows]
    return shared.section(rows, baseline="base model", paired=paired_rows)


def summarise(c) -> dict:
    o = c.opts
    methods, base, pairs = [method_summary(c, m) for m in o.losses], base_summary(c), paired(c)
    return {"format": 1, "preset": o.preset, "config_file": o.config_file, "overrides": list(o.overrides),
            "losses": list(o.losses), "seeds": c.seeds, "reward": o.reward, "baseline_method": o.baseline_method,
            "grid": [{"key": a.key, "values": list(a.values), "method": a.method} for a in c.axes],
            "test": {"data": c.test.data, "split": c.test.split, "max_samples": c.test.max_samples},
            "validation": c.carved, "selection": SELECTION if c.tuning else None,
            "methods": methods, "base": base, "paired": pairs,
            "results": results_section(methods, base, pairs, getattr(getattr(c.base_cfg, "model", None), "name_or_path", None)),
            "output_dir": str(c.out)}
