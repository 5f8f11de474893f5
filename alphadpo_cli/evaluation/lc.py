"""AlpacaEval 2's length-controlled (LC) win rate.

The official metric (alpaca_eval's `length_controlled_v1` GLM) fits, with L1-penalised logistic
regression on soft labels,

    P(model beats reference) = sigmoid(w1 * tanh(Δlen / std) + w2 * instruction_difficulty + w3 * not_gamed)

on this run's annotations *plus* the annotations of two deliberately length-gamed versions of
the reference (weight λ/2 = 0.1 each), with the penalty strength chosen by 5-fold grouped
cross-validation; the LC win rate is the mean prediction with the length term set to zero.
Its auxiliary data come from the AlpacaEval dataset repository:

* `df_gamed.csv` - the gamed baselines' annotations and each instruction's difficulty (needed
  for the official fit);
* `instruction_difficulty.csv` - the per-instruction difficulty alone.

Without `df_gamed.csv` the result is an *approximation*, labelled as such: the same GLM fitted on
this run's annotations only (`length_controlled_noreg` when the difficulties are known, else
`length_controlled_minimal`, which has no difficulty term).

With very few instances (a quick `--max-instances 10`) the cross-validated L1 penalty keeps no term
at all, and the "estimate" would be sigmoid(0) = 50.00 whatever the judge said: below
`MIN_INSTANCES` usable annotations such a fit is reported as too few instances judged, not as a
number.

When scikit-learn is installed (it comes with `alphadpo[eval]`) the fit is the official
`LogisticRegressionCV(penalty="l1", solver="liblinear")`; otherwise an exact proximal-Newton
solver of the same objective with the same folds and grid of C values is used.
"""

from __future__ import annotations

import contextlib
import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DataError
from .common import HubUnreachable, eval_cache_dir, hub_dataset_file

DATASET_REPO = "tatsu-lab/alpaca_eval"
GAMED_FILE = "df_gamed.csv"
DIFFICULTY_FILE = "instruction_difficulty.csv"
REG_LAMBDA = 0.2
N_SPLITS = 5
CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV's default grid (Cs=10)
# Below this many usable annotations, a fit that keeps no term (all weights 0, so exactly 50.00) is
# reported as "too few instances judged" rather than as a number.
MIN_INSTANCES = 100


@dataclass
class LCFiles:
    df_gamed: Path | None
    instruction_difficulty: Path | None
    note: str = ""


def locate_lc_files(lc_dir: str | Path | None = None, *, download: bool = True) -> LCFiles:
    """The two auxiliary files: from `lc_dir`, else the cache, else downloaded once into the cache."""
    if lc_dir is not None:
        d = Path(lc_dir)
        if not d.is_dir():
            raise DataError(f"--lc-dir {d}: not a directory (it should hold {GAMED_FILE} and/or {DIFFICULTY_FILE})")
        g, i = d / GAMED_FILE, d / DIFFICULTY_FILE
        if not g.is_file() and not i.is_file():
            raise DataError(f"--lc-dir {d}: neither {GAMED_FILE} nor {DIFFICULTY_FILE} is there")
        return LCFiles(g if g.is_file() else None, i if i.is_file() else None)
    cache = eval_cache_dir("alpaca_eval")
    found: dict[str, Path | None] = {}
    notes, offline = [], None
    for name in (GAMED_FILE, DIFFICULTY_FILE):
        path = cache / name
        if not path.is_file() and download and offline is None:
            try:
                hub_dataset_file(DATASET_REPO, name, path, what=name, hint="")
            except HubUnreachable as exc:  # said once, for both files
                offline = exc.reason
            except DataError as exc:
                notes.append(str(exc).rstrip(". "))
        found[name] = path if path.is_file() else None
    if offline is not None:
        missing = [n for n, p in found.items() if p is None]
        notes.append(f"the Hugging Face hub is out of reach ({offline}): {' and '.join(missing)} not downloaded; "
                     "pass --lc-dir DIR holding them for the official LC win rate")
    return LCFiles(found[GAMED_FILE], found[DIFFICULTY_FILE], "; ".join(notes))


def _floatish(v: str) -> float:
    v = (v or "").strip()
    if v.lower() in ("true", "false"):
        return 1.0 if v.lower() == "true" else 0.0
    return float(v) if v else float("nan")


def read_gamed(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    need = {"index", "preference", "std_delta_len", "instruction_difficulty", "not_gamed_baseline"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{path}: expected columns {sorted(need)} (the AlpacaEval {GAMED_FILE})")
    out = {k: np.array([_floatish(r[k]) for r in rows], dtype=float) for k in need}
    out["index"] = out["index"].astype(int)
    return out


def read_difficulty(path: Path) -> dict[int, float]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    out = {}
    for r in rows[1:]:
        if len(r) >= 2 and r[0].strip():
            out[int(float(r[0]))] = float(r[-1])
    if not out:
        raise DataError(f"{path}: no rows (expected `index,instruction_difficulty`)")
    return out


# ---------------------------------------------------------------------------------------------
# the fit


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _objective(w, X, p, s, C):
    z = X @ w
    loss = p * np.logaddexp(0.0, -z) + (1 - p) * np.logaddexp(0.0, z)
    return C * float(np.sum(s * loss)) + float(np.abs(w).sum())


def l1_logistic(X: np.ndarray, p: np.ndarray, s: np.ndarray, C: float, *, iters: int = 200, tol: float = 1e-12) -> np.ndarray:
    """argmin_w ||w||_1 + C * sum_i s_i * [p_i log(1+e^-z_i) + (1-p_i) log(1+e^z_i)], z = X w
    (liblinear's L1 logistic regression on soft labels, no intercept), by proximal Newton."""
    d = X.shape[1]
    w = np.zeros(d)
    F = _objective(w, X, p, s, C)
    for _ in range(iters):
        q = _sigmoid(X @ w)
        grad = C * X.T @ (s * (q - p))
        H = C * (X.T * (s * q * (1 - q))) @ X + 1e-12 * np.eye(d)
        step = np.zeros(d)
        for _cd in range(500):  # coordinate descent on the penalised quadratic model
            biggest = 0.0
            for j in range(d):
                a = H[j, j]
                b = grad[j] + H[j] @ step - a * step[j]
                u = w[j] - b / a
                u = math.copysign(max(abs(u) - 1.0 / a, 0.0), u)
                new = u - w[j]
                biggest = max(biggest, abs(new - step[j]))
                step[j] = new
            if biggest < 1e-14:
                break
        decrease = grad @ step + np.abs(w + step).sum() - np.abs(w).sum()
        t = 1.0
        while True:
            cand = w + t * step
            Fc = _objective(cand, X, p, s, C)
            if Fc <= F + 0.01 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        w, F_old, F = cand, F, Fc
        if np.max(np.abs(t * step)) < tol or abs(F_old - F) <= tol * max(1.0, abs(F)):
            break
    return w


def _group_folds(n: int, n_splits: int) -> np.ndarray:
    """scikit-learn's GroupKFold assignment for n groups of two rows each (no shuffling)."""
    sizes = np.full(n, 2)
    order = np.argsort(sizes)[::-1]
    per_fold = np.zeros(n_splits)
    fold = np.zeros(n, dtype=int)
    for gi in order:
        f = int(np.argmin(per_fold))
        per_fold[f] += 2
        fold[gi] = f
    return fold


def _cv_loss(X, p, s, C, folds, weighted: bool) -> float:
    scores = []
    for f in range(folds.max() + 1):
        tr, te = folds != f, folds == f
        w = l1_logistic(X[tr], p[tr], s[tr], C)
        q = np.clip(_sigmoid(X[te] @ w), 1e-15, 1 - 1e-15)
        ll = p[te] * np.log(q) + (1 - p[te]) * np.log(1 - q)
        if weighted:
            ll = ll * s[te]
        scores.append(-np.mean(ll))
    return float(np.mean(scores))


def fit_glm_numpy(X, p, s, *, weighted_cv: bool, n_splits: int = N_SPLITS) -> tuple[np.ndarray, float]:
    if n_splits <= 0 or len(p) < 2 * n_splits:
        return l1_logistic(X, p, s, 100.0), 100.0
    folds = _group_folds(len(p), n_splits)
    losses = [_cv_loss(X, p, s, C, folds, weighted_cv) for C in CS]
    best = float(CS[int(np.argmin(losses))])
    return l1_logistic(X, p, s, best), best


@contextlib.contextmanager
def _quiet_sklearn_deprecations():
    """scikit-learn's notices about the official call's own shape (penalty="l1" deprecated, the
    l1_ratios default, LogisticRegressionCV's legacy attributes) are not the user's to act on:
    kept out of the results. Its other warnings (convergence, ...) still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"sklearn\.")
        warnings.filterwarnings("ignore", message=r"Inconsistent values: penalty=", category=UserWarning,
                                module=r"sklearn\.")
        yield


def fit_glm_sklearn(X, p, s, *, weighted_cv: bool, n_splits: int = N_SPLITS):  # pragma: no cover - optional
    """The official fit (alpaca_eval's fit_LogisticRegressionCV with continuous targets)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    n = len(p)
    Xd = np.concatenate([X, X])
    yd = np.concatenate([np.ones(n), np.zeros(n)])
    true_prob = np.concatenate([p, 1 - p])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    true_w = np.concatenate([s, s]) if weighted_cv else None
    weight = true_prob * (true_w if true_w is not None else 1.0)
    kw = dict(random_state=123, dual=False, penalty="l1", solver="liblinear", fit_intercept=False)
    if n_splits <= 0 or n < 2 * n_splits:
        with _quiet_sklearn_deprecations():
            model = LogisticRegression(C=100, **kw)
            model.fit(Xd, yd, sample_weight=weight)
        return model.coef_[0], 100.0

    def loss(y_true, y_pred, true_prob, true_sample_weight=None):
        y = np.where(y_true == 1, true_prob, 1 - true_prob)
        q = np.clip(y_pred, 1e-15, 1 - 1e-15)
        ll = y * np.log(q) + (1 - y) * np.log(1 - q)
        if true_sample_weight is not None:
            ll = ll * true_sample_weight
        return -np.mean(ll)

    with sklearn.config_context(enable_metadata_routing=True), _quiet_sklearn_deprecations():
        scorer = make_scorer(loss, response_method="predict_proba", greater_is_better=False)
        scorer = scorer.set_score_request(true_sample_weight=True, true_prob=True)
        model = LogisticRegressionCV(cv=GroupKFold(n_splits=n_splits), scoring=scorer, **kw)
        model.set_fit_request(sample_weight=True)
        model.fit(Xd, yd, sample_weight=weight, groups=groups, true_sample_weight=true_w, true_prob=true_prob)
    return model.coef_[0], float(np.atleast_1d(model.C_)[0])


def _fit(X, p, s, *, weighted_cv: bool, use_sklearn: bool):
    if use_sklearn:
        try:
            w, C = fit_glm_sklearn(X, p, s, weighted_cv=weighted_cv)
            return w, C, "scikit-learn"
        except Exception:  # not installed, or an API change: the exact numpy solver instead
            pass
    w, C = fit_glm_numpy(X, p, s, weighted_cv=weighted_cv)
    return w, C, "numpy"


# ---------------------------------------------------------------------------------------------
# public


def length_controlled(annotations: list[dict], files: LCFiles | None = None, *, use_sklearn: bool = True) -> dict:
    """LC win rate from annotations with keys `preference` (1..2, None/NaN for unusable),
    `output_1` (reference), `output_2` (model) and `index` (position in the 805-row set)."""
    files = files or LCFiles(None, None)
    out = _length_controlled(annotations, files, use_sklearn=use_sklearn)
    if files.note:
        out["lc_note"] = files.note
    return out


@dataclass
class _Design:
    """The GLM's fitting problem: features X, soft labels p, sample weights s, and the test rows
    (the length term set to zero) whose mean prediction is the LC win rate."""

    X: np.ndarray
    p: np.ndarray
    s: np.ndarray
    X_test: np.ndarray
    names: list[str]
    method: str
    official: bool
    weighted: bool  # the cross-validation loss weighted by s (the official fit)
    n_known: int  # annotations with a usable preference


NAMES_FULL = ["np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)"]


def _difficulty(idx: np.ndarray, gamed: dict | None, files: LCFiles) -> np.ndarray | None:
    """Each annotation's instruction difficulty (from df_gamed.csv, else instruction_difficulty.csv),
    or None when neither file is there."""
    difficulty = None
    if gamed is not None:
        difficulty = {}
        for i, dval in zip(gamed["index"], gamed["instruction_difficulty"]):
            difficulty.setdefault(int(i), float(dval))
    elif files.instruction_difficulty:
        difficulty = read_difficulty(files.instruction_difficulty)
    if difficulty is None:
        return None
    missing = [int(i) for i in idx if int(i) not in difficulty]
    if missing:
        raise DataError(f"instruction difficulty unknown for rows {missing[:5]}: the LC files do not match "
                        "this evaluation set (they describe the 805 AlpacaEval instructions)")
    return np.array([difficulty[int(i)] for i in idx])


def _design(annotations: list[dict], files: LCFiles) -> _Design:
    """The fit for what is known: the official one with df_gamed.csv, else an approximation."""
    pref = np.array([_pref01(a.get("preference")) for a in annotations], dtype=float)
    delta = np.array([len(a["output_1"]) - len(a["output_2"]) for a in annotations], dtype=float)
    sd = delta.std(ddof=1) if len(delta) > 1 else 0.0
    std_delta = delta / sd if sd > 0 else np.zeros_like(delta)
    gamed = read_gamed(files.df_gamed) if files.df_gamed else None
    diff = _difficulty(np.array([int(a["index"]) for a in annotations]), gamed, files)
    known = ~np.isnan(pref)
    n = int(known.sum())
    if gamed is not None:
        Xm = np.stack([np.tanh(std_delta), diff, np.ones_like(diff)], axis=1)
        Xg = np.stack([np.tanh(gamed["std_delta_len"]), gamed["instruction_difficulty"], gamed["not_gamed_baseline"]], axis=1)
        gk = ~np.isnan(gamed["preference"])
        return _Design(np.concatenate([Xg[gk], Xm[known]]), np.concatenate([gamed["preference"][gk], pref[known]]),
                       np.concatenate([np.full(gk.sum(), REG_LAMBDA / 2), np.ones(known.sum())]),
                       np.stack([np.zeros_like(diff), diff, np.ones_like(diff)], axis=1), NAMES_FULL,
                       "official (length_controlled_v1)", True, True, n)
    if diff is not None:
        return _Design(np.stack([np.tanh(std_delta), diff, np.ones_like(diff)], axis=1)[known], pref[known],
                       np.ones(known.sum()), np.stack([np.zeros_like(diff), diff, np.ones_like(diff)], axis=1),
                       NAMES_FULL, "APPROXIMATE (length_controlled_noreg: no gamed-baseline regularisation; "
                       "df_gamed.csv missing)", False, False, n)
    return _Design(np.stack([np.tanh(std_delta), np.ones_like(std_delta)], axis=1)[known], pref[known],
                   np.ones(known.sum()), np.stack([np.zeros_like(std_delta), np.ones_like(std_delta)], axis=1),
                   ["np.tanh(std_delta_len)", "not_gamed_baseline.astype(float)"],
                   "APPROXIMATE (length_controlled_minimal: length term + intercept only; "
                   "df_gamed.csv and instruction_difficulty.csv missing)", False, False, n)


def _length_controlled(annotations: list[dict], files: LCFiles, *, use_sklearn: bool) -> dict:
    if not annotations:
        return {"length_controlled_winrate": None, "lc_standard_error": None, "lc_method": "none (no annotations)",
                "lc_official": False}
    d = _design(annotations, files)
    method, official, n_known = d.method, d.official, d.n_known
    if n_known == 0:
        return {"length_controlled_winrate": None, "lc_standard_error": None, "lc_method": method + "; no usable preference",
                "lc_official": official}
    w, C, fitter = _fit(d.X, d.p, d.s, weighted_cv=d.weighted, use_sklearn=use_sklearn)
    if not np.any(np.abs(w) > 0) and n_known < MIN_INSTANCES:
        # The L1 penalty kept no term: the "estimate" would be sigmoid(0) = 50.00 whatever was judged.
        # (With many instances an all-zero fit is a real finding: no length or win-rate effect.)
        return {"length_controlled_winrate": None, "lc_standard_error": None, "lc_official": official,
                "lc_too_few": True, "lc_fitter": fitter, "lc_C": C, "lc_weights": {n: 0.0 for n in d.names},
                "lc_method": f"not computed: too few instances judged ({n_known} usable annotations) for a "
                             f"length-controlled estimate (the fit kept no term); {method}"}
    pred = _sigmoid(d.X_test @ w)
    if n_known < 2 * N_SPLITS:
        method += f"; only {n_known} annotations: C=100 without cross-validation"
    return {
        "length_controlled_winrate": float(pred.mean() * 100),
        "lc_standard_error": float(pred.std(ddof=1) / math.sqrt(len(pred)) * 100) if len(pred) > 1 else None,
        "lc_method": method,
        "lc_official": official,
        "lc_fitter": fitter,
        "lc_C": C,
        "lc_weights": {n: float(v) for n, v in zip(d.names, w)},
        "glm_preference": [float(x) for x in pred],
    }


def _pref01(v) -> float:
    if v is None:
        return float("nan")
    v = float(v)
    if math.isnan(v):
        return v
    if v == 0.0:
        v = 1.5
    return v - 1.0
