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
  ``norm_batch`` pairs in file order (what the trainer does, minus the shuffling): for ``ema`` each
  group is one optimiser step (normalised with the statistics of the groups before it, the first
  with z = 0; give it the global batch), for ``official`` one micro-batch (updated, then normalised);
* ``run`` — frozen: the μ, σ a training run logged last (metrics.jsonl);
* ``none`` — z = g;
* ``auto`` — ``none`` for the w/o-normalisation ablation, else ``dataset``.

Modules, one concern each:

* :mod:`.options` — :data:`NORM_MODES`, :class:`PolicySpec`, :class:`InspectOptions` (no torch: the
  command line imports it);
* :mod:`.series` — :func:`compute_series` (scores → one :class:`Series`), the normalisation
  runner, :func:`describe` and :func:`correlation`;
* :mod:`.inspect` — :func:`inspect_margins` (models + data → :class:`MarginReport`);
* :mod:`.report` — :class:`MarginReport` (records, summary, files), :class:`RunInfo` / :func:`load_run`;
* :mod:`.plots` — :func:`plot_distributions`, :func:`plot_run`, :func:`read_png_series`;
* :mod:`.terminal` — :func:`print_report`, :func:`render_histogram` and the other rich tables.

The names below are re-exported lazily, so that importing :mod:`.options` stays light.
"""

from __future__ import annotations

import importlib

# public name -> the module of this package that defines it
_EXPORTS = {
    "NORM_MODES": "options",
    "PolicySpec": "options",
    "InspectOptions": "options",
    "parse_labelled": "options",
    "RunStats": "series",
    "Series": "series",
    "compute_series": "series",
    "resolve_norm": "series",
    "norm_description": "series",
    "describe": "series",
    "correlation": "series",
    "inspect_margins": "inspect",
    "RunInfo": "report",
    "PolicyScores": "report",
    "MarginReport": "report",
    "load_run": "report",
    "plot_distributions": "plots",
    "plot_run": "plots",
    "read_png_series": "plots",
    "render_histogram": "terminal",
    "print_report": "terminal",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
