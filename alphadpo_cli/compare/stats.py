"""The intervals of `alphadpo compare`, defined once.

Per method, over seeds (`interval`): each seed's run gives one number (its held-out accuracy, its
mean reward, ...); the interval is the mean of those S numbers, its standard error
SE = sd / sqrt(S) (sd with S − 1 in the denominator) and the 95% t-interval
mean ± t(0.975, S − 1) · SE. One seed: no SE and no interval.

Paired against a baseline method (`paired_difference`): the methods answer the same test prompts,
and seed s of one method is paired with seed s of the other. For prompt p and seed s,
d(p, s) = reward(method, s, p) − reward(baseline, s, p), over the N pairs (p, s) where both answers
were scored. Reported:

* `mean`: the mean of the N differences (with every prompt scored: the mean over seeds of each
  seed's mean per-prompt difference);
* `se_pairs`, `ci95_pairs`: sd(d) / sqrt(N) and mean ± t(0.975, N − 1) · SE, the N prompt×seed
  pairs taken as the units (what the table shows: prompt-to-prompt noise);
* `se_seeds`, `ci95_seeds`: the same over the S per-seed mean differences D_s, t with S − 1 degrees
  of freedom: the seed as the unit, wider when training noise dominates (the cautious reading).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..results import t_quantile


def interval(values: Sequence[float | None]) -> dict | None:
    """{n, mean, sd, se, ci95: [lo, hi]} of the values that are not None; None when there are none."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "se": None, "ci95": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(n - 1) * se
    return {"n": n, "mean": mean, "sd": sd, "se": se, "ci95": [mean - half, mean + half]}


def paired_difference(method: Mapping[str, Mapping[str, float | None]],
                      baseline: Mapping[str, Mapping[str, float | None]]) -> dict | None:
    """Per-prompt differences method − baseline. Both map a seed (as a string) to {prompt key: reward};
    seeds and prompts that either side lacks, or where a reward is None, are left out. None when no
    pair is left. See the module docstring for the definitions."""
    diffs: list[float] = []
    per_seed: list[float] = []
    prompts: set[str] = set()
    for seed in sorted(set(method) & set(baseline)):
        mine, theirs = method[seed], baseline[seed]
        d = [mine[k] - theirs[k] for k in sorted(set(mine) & set(theirs))
             if mine[k] is not None and theirs[k] is not None]
        if d:
            diffs.extend(d)
            per_seed.append(sum(d) / len(d))
            prompts.update(k for k in mine if k in theirs)
    if not diffs:
        return None
    pairs, seeds = interval(diffs), interval(per_seed)
    return {"mean": pairs["mean"], "n_pairs": len(diffs), "n_seeds": len(per_seed), "n_prompts": len(prompts),
            "se_pairs": pairs["se"], "ci95_pairs": pairs["ci95"],
            "per_seed": per_seed, "se_seeds": seeds["se"], "ci95_seeds": seeds["ci95"]}
