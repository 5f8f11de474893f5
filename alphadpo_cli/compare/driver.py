"""`run_compare`: every check before a model loads, then the training runs, the choice of each
method's setting on the validation slice, the test evaluation of the chosen settings, and the
report. Each finished piece of work is a record in `<out>/compare.log.jsonl` (an
`artefacts.WorkLog` whose identity is the comparison's settings): a rerun skips what is recorded,
resumes a run a kill interrupted (from its checkpoint), and refuses other settings, listing the
changes, unless `overwrite`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artefacts import WorkLog
from .carve import HeldOut, carve_validation, data_overrides, held_out_of
from .options import CompareOptions, GridAxis, check_options, seed_list
from .plan import Run, chosen_runs, plan_runs

LOG = "compare.log.jsonl"
FORMAT = 1
HINT = "pass --overwrite to start the comparison again (its runs are deleted), or choose another --output-dir"
OWNED = ("runs", "eval", "data", "compare.json", "compare.png", "grid.png")


@dataclass
class Comparison:
    """A comparison settled before any model loads, and its work log."""

    opts: CompareOptions
    axes: list[GridAxis]
    seeds: list[int]
    runs: list[Run]
    test: HeldOut
    base_cfg: object
    out: Path
    log: WorkLog | None = None
    carved: dict | None = None
    console: object = None
    chosen: dict = field(default_factory=dict)

    @property
    def tuning(self) -> bool:
        return bool(self.axes)

    def say(self, text: str) -> None:
        if self.console is not None and not self.opts.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)

    def done(self, kind: str, run: str) -> dict | None:
        for rec in self.log.records:
            if rec.get("kind") == kind and rec.get("run") == run:
                return rec
        return None

    def record(self, kind: str, run: str, **fields) -> dict:
        rec = {"kind": kind, "run": run, **fields}
        self.log.append(rec)
        return rec


def prepare(o: CompareOptions, console=None) -> Comparison:
    """The options checked, every run's config resolved, the reward tried: all before any model loads."""
    from ..config import resolve_config

    axes = check_options(o)
    base_cfg = resolve_config(preset=o.preset, config_file=o.config_file, overrides=list(o.overrides), loss=o.losses[0])
    test = held_out_of(base_cfg)
    out = Path(o.output_dir).expanduser()
    seeds = seed_list(o.seeds, int(base_cfg.training.seed))
    data_sets = data_overrides(out / "data") if axes else []
    runs = plan_runs(o, axes, seeds, out, data_sets)
    if o.reward:
        from ..rewards.identity import check_reward_early

        check_reward_early(o.reward)
    return Comparison(o, axes, seeds, runs, test, base_cfg, out, console=console)


def open_log(c: Comparison) -> None:
    """Claim the output directory for these settings (another comparison's is refused unless
    --overwrite, which deletes what a comparison writes there), then carve the validation slice."""
    o = c.opts
    c.out.mkdir(parents=True, exist_ok=True)
    identity = {"format": FORMAT, **o.identity()}
    if o.overwrite and (c.out / LOG).is_file():  # only a comparison's own directory is cleared
        for name in OWNED:
            p = c.out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    c.log = WorkLog(c.out / LOG, identity, kind="comparison", overwrite=o.overwrite, hint=HINT)
    if c.tuning:
        c.carved = carve_validation(c.base_cfg, c.out / "data", o.validation, c.test)
        v = c.carved
        c.say(f"validation: {v['validation_prompts']} of the {v['validation_prompts'] + v['training_prompts']} training "
              f"prompts carved off ({v['validation_pairs']} pairs; {v['train_pairs']} pairs left to train on), "
              f"in {c.out / 'data'}")


def train_all(c: Comparison) -> None:
    from rich.console import Console

    from .work import train_run

    console = Console(stderr=True, quiet=True) if c.opts.quiet else c.console
    for i, run in enumerate(c.runs, start=1):
        if c.done("train", run.id):
            continue
        c.say(f"[bold]run {i}/{len(c.runs)}: {run.id}[/]")
        c.record("train", run.id, **train_run(run.config, console=console))


def choose(c: Comparison) -> dict:
    """Per method: the grid point with the best mean validation accuracy over seeds (ties: the
    better log-ratio accuracy, then the first point); without a grid, the one point."""
    from .summary import validation_table

    chosen = {}
    for method in c.opts.losses:
        rows = validation_table(c, method)
        best = max(rows, key=lambda r: (r["score"], r["score_ref"], -r["order"])) if c.tuning else rows[0]
        chosen[method] = {"point": best["point"], "name": best["name"], "grid": rows}
    c.chosen = chosen
    return chosen


def evaluate_chosen(c: Comparison) -> None:
    """The test set, for the chosen settings only (and the base model): preference accuracy (when the
    runs evaluated on validation) and the reward judge."""
    from .work import test_accuracy

    o, cfg = c.opts, c.base_cfg
    if c.tuning and not c.done("test", "base"):
        c.record("test", "base", report=test_accuracy(cfg.model.name_or_path, cfg, c.test))
    base_answers = None
    if o.reward:
        base = c.done("reward", "base") or c.record("reward", "base", **_reward(c, cfg.model.name_or_path, "base", "none"))
        base_answers = base["summary"]["answers"]
    for method in o.losses:
        for run in chosen_runs(c.runs, method, c.chosen[method]["point"]):
            if c.tuning and not c.done("test", run.id):
                c.say(f"test pairs: {run.id}")
                c.record("test", run.id, report=test_accuracy(str(run.run_dir), run.config, c.test))
            if o.reward and not c.done("reward", run.id):
                c.record("reward", run.id, **_reward(c, str(run.run_dir), run.id.replace("/", "_"), base_answers))


def _reward(c: Comparison, model: str, name: str, baseline: str) -> dict:
    from .work import reward_eval

    o, cfg = c.opts, c.base_cfg
    preset = o.preset if name == "base" and not o.config_file else None
    c.say(f"reward judge: {name}")
    return reward_eval(model, c.out / "eval" / name, reward=o.reward, test=c.test, preset=preset,
                       max_new_tokens=o.max_new_tokens or int(cfg.generation.max_new_tokens),
                       batch_size=o.batch_size, baseline=baseline, console=c.console, quiet=o.quiet)


def run_compare(options: CompareOptions, *, console=None) -> dict:
    """The whole comparison (resumed where a previous one stopped); returns compare.json's content."""
    from .report import finish

    c = prepare(options, console)
    open_log(c)
    try:
        train_all(c)
        choose(c)
        evaluate_chosen(c)
    finally:
        c.log.close()
    return finish(c)
