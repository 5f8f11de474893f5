"""The experiment from end to end: every check before a model loads, then round after round
(sample → train → judge), each phase skipped when `progress.jsonl` records it done, then the
offline round (`compare_offline`), with `rounds.json`, the table and the plot kept current."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artefacts import WorkLog, claim_identity, save_identity
from ..config import ConfigError
from ..integrity import json_sha256
from . import phases
from .layout import OFFLINE, Layout, Models
from .options import IterateOptions, check_options
from .prompts import PromptPlan, plan_prompts, write_prompt_file
from .report import plot_rounds, rounds_table, write_rounds_json

FORMAT = 1
HINT = "pass --overwrite to start the experiment again, or choose another --output-dir"


@dataclass
class Experiment:
    """An experiment settled before any model loads, and what it has done so far."""

    opts: IterateOptions
    layout: Layout
    models: Models
    prompts: PromptPlan
    identity: dict
    progress: WorkLog
    console: object = None
    record: dict = field(default_factory=dict)

    def say(self, text: str) -> None:
        if self.console is not None and not self.opts.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)

    def done(self, k, name: str) -> dict | None:
        for rec in self.progress.records:
            if rec.get("round") == k and rec.get("phase") == name:
                return rec
        return None


def _mode(cfg) -> str:
    """model.mode as the training runs will use it (auto: by the number of processes)."""
    from ..config.rates import resolve_mode
    from ..train.launch import plan_launch

    plan = plan_launch(cfg)
    return resolve_mode(cfg.model.mode, plan.num_processes if plan else 1)


def _claim(layout: Layout, identity: dict, overwrite: bool) -> None:
    """Refuse another experiment's directory (listing the changed settings) unless --overwrite,
    which removes everything an experiment writes there."""
    out = layout.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory")
    if overwrite:
        for p in layout.ours():
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()) and not layout.identity.is_file():
        raise ConfigError(f"{out} exists and holds files no `alphadpo iterate` wrote; {HINT}")
    claim_identity(layout.identity, identity, kind="iterate experiment", hint=HINT)
    save_identity(layout.identity, identity)


def prepare(opts: IterateOptions, console=None) -> Experiment:
    """Options, config, reward, prompts and the output directory, checked in that order: every bad
    input is one ConfigError (or DataError) here, before any model loads."""
    from ..rewards.identity import check_reward_early, reward_identity

    check_options(opts)
    cfg = phases.training_config(opts, [])
    initial = opts.model or cfg.model.name_or_path
    r = opts.reward
    check_reward_early(r.reward)
    plan = plan_prompts(opts)
    layout = Layout(Path(opts.output_dir).expanduser())
    models = Models(layout, initial, _mode(cfg), opts.reference)
    base = cfg.to_dict()
    base["training"].pop("output_dir", None)
    identity = {"format": FORMAT, "settings": opts.settings(), "initial": initial, "mode": models.mode,
                "config": base, "prompts": plan.fingerprint(),
                "reward": reward_identity(r.reward, dtype=r.dtype, max_length=r.max_length,
                                          trust_remote_code=r.trust_remote_code)}
    _claim(layout, identity, opts.overwrite)
    progress = WorkLog(layout.progress, {"iterate": json_sha256(identity)}, kind="iterate progress", hint=HINT)
    write_prompt_file(layout.heldout, plan.heldout)
    exp = Experiment(opts, layout, models, plan, identity, progress, console)
    exp.record = {"output_dir": str(layout.out), "initial_model": initial, "mode": models.mode,
                  "reference": opts.reference, "settings": opts.settings(), "heldout_prompts": len(plan.heldout),
                  "prompts_per_round": [len(s) for s in plan.slices], "initial": None, "rounds": [],
                  "offline": None, "kl_to_initial": "not measured (needs π0's log-probs of π_k's samples)"}
    return exp


def phase(exp: Experiment, k, name: str, run) -> dict:
    """`run()` unless progress.jsonl records (k, name) done; its summary and seconds recorded."""
    found = exp.done(k, name)
    if found is not None:
        exp.say(f"round {k}: {name} done earlier ({found['seconds']:.0f} s), skipped")
        return found["result"]
    exp.say(f"[bold]round {k}: {name}[/]")
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    exp.progress.append({"round": k, "phase": name, "result": result, "seconds": seconds})
    exp.say(f"round {k}: {name} finished in {seconds:.0f} s")
    return result


def _row(exp: Experiment, k) -> dict:
    row = {"round": k}
    for name in ("sample", "train", "judge"):
        rec = exp.done(k, name)
        row[name] = rec["result"] if rec else None
        row.setdefault("seconds", {})[name] = rec["seconds"] if rec else None
    row["model"] = exp.models.policy(k) if row["train"] else None
    return row


def save(exp: Experiment) -> None:
    """rounds.json and rounds.png from what progress.jsonl records."""
    rec = exp.record
    initial = exp.done(0, "judge")
    rec["initial"] = initial["result"] if initial else None
    rec["rounds"] = [_row(exp, k) for k in range(1, exp.opts.rounds + 1) if exp.done(k, "sample")]
    rec["offline"] = _row(exp, OFFLINE) if exp.done(OFFLINE, "sample") else None
    last = rec["rounds"][-1] if rec["rounds"] else None
    rec["final_model"] = last["model"] if last and len(rec["rounds"]) == exp.opts.rounds else None
    write_rounds_json(exp.layout.rounds_json, rec)
    plot_rounds(rec, exp.layout.plot)


def judge_initial(exp: Experiment) -> None:
    lay = exp.layout
    phase(exp, 0, "judge", lambda: phases.judge_initial(exp.opts, lay.heldout, exp.models.initial, lay.eval(0),
                                                         exp.console))
    save(exp)


def run_round(exp: Experiment, k: int) -> None:
    """Round k: sample from π_{k-1}, train π_k, judge π_k against π_0 and π_{k-1}."""
    o, lay, m = exp.opts, exp.layout, exp.models
    phase(exp, k, "sample", lambda: phases.sample(o, exp.prompts.slices[k - 1], lay.prompts(k), lay.data(k),
                                                  m.policy(k - 1), k - 1, exp.console))
    save(exp)
    phase(exp, k, "train", lambda: phases.train(o, m.train_overrides(k), exp.console))
    save(exp)
    phase(exp, k, "judge", lambda: phases.judge(o, lay.heldout, m.policy(k), lay.eval(k), lay.eval(0) / "answers.json",
                                                lay.eval(k - 1) / "answers.json", f"round-{k}",
                                                exp.console))
    save(exp)
    if exp.console is not None and not o.quiet:
        exp.console.print(rounds_table(exp.record))


def run_offline(exp: Experiment) -> None:
    """One round from π_0 on every round's prompts, trained for the online rounds' total steps on
    (at most) their total pairs, judged like them."""
    o, lay, m = exp.opts, exp.layout, exp.models
    done = [exp.done(k, "train")["result"] for k in range(1, o.rounds + 1)]
    steps = sum(d["steps"] for d in done)
    pairs = sum(exp.done(k, "sample")["result"]["pairs"] for k in range(1, o.rounds + 1))
    phase(exp, OFFLINE, "sample", lambda: phases.sample(o, exp.prompts.all_training, lay.prompts(OFFLINE),
                                                        lay.data(OFFLINE), m.initial, 0, exp.console))
    save(exp)
    phase(exp, OFFLINE, "train", lambda: phases.train(o, m.offline_overrides(steps, pairs), exp.console))
    save(exp)
    phase(exp, OFFLINE, "judge", lambda: phases.judge(o, lay.heldout, m.policy(OFFLINE), lay.eval(OFFLINE),
                                                      lay.eval(0) / "answers.json", None, "offline", exp.console))
    save(exp)


def run_iterate(opts: IterateOptions, *, console=None) -> dict:
    """Run (or resume) the experiment; returns what rounds.json holds."""
    exp = prepare(opts, console)
    try:
        judge_initial(exp)
        for k in range(1, opts.rounds + 1):
            run_round(exp, k)
        if opts.compare_offline:
            run_offline(exp)
        save(exp)
    finally:
        exp.progress.close()
    return exp.record
