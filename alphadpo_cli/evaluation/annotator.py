"""AlpacaEval 2's annotator, `weighted_alpaca_eval_gpt4_turbo`, for any OpenAI-compatible judge.

Faithful to alpaca_eval 0.6.x: the same prompt (read from the installed alpaca_eval package when
there is one), the same seeded random swap of the two outputs (seed string "is_switched_outputs"
+ instruction + "0"), one token at temperature 1 with `top_logprobs=5`, and the preference
`2 - p(m) / (p(m) + p(M))` (1 = reference wins, 2 = model wins), un-swapped with `3 - x`.
Identical outputs are a draw (1.5) without a judge call.

Each result is appended to the judge log (`annotations.jsonl`, an `artefacts.WorkLog`) as it
arrives; a rerun asks only for what is not there. Its records are keyed by what was judged (judge
model, instruction, both outputs), so a log written before logs had headers is adopted as it is.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from ..artefacts import WorkLog
from ..console import progress_bar
from .common import package_dir
from .judge import JudgeClient, JudgeSettings, run_concurrently

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
SWITCH_SEED = "is_switched_outputs"
ANNOTATOR_SEED = "0"
JUDGE_LOG_KIND = "AlpacaEval judge log"
#: what the judge log's records depend on beyond their keys: the annotator protocol
JUDGE_LOG_IDENTITY = {"annotator": ANNOTATOR}

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


def annotator_template() -> str:
    root = package_dir("alpaca_eval")
    if root is not None:
        f = root / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
        if f.is_file():
            return f.read_text(encoding="utf-8")
    return CLF_TEMPLATE


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


def _usable(records: list[dict], rejudge_malformed: bool) -> dict[str, dict]:
    """{key: record} of the logged results a rerun keeps (the last one of a key wins)."""
    keep = ("ok", "same_output") if rejudge_malformed else ("ok", "same_output", "malformed")
    return {r["key"]: r for r in records if r.get("status") in keep}


def annotate(jobs: list[dict], settings: JudgeSettings, log_path: Path, *, rejudge_malformed: bool = False,
             console=None, quiet: bool = False) -> tuple[dict[str, dict], dict]:
    """Annotate `jobs` (dicts with key, instruction, output_1, output_2, ...) and append each
    result to the log. Returns ({key: record} of usable results, stats)."""
    with WorkLog(log_path, JUDGE_LOG_IDENTITY, kind=JUDGE_LOG_KIND, adopt_headerless=True) as log:
        done = _usable(log.records, rejudge_malformed)
        todo = [j for j in jobs if j["key"] not in done]
        resumed = len(jobs) - len(todo)
        for j in [j for j in todo if j["output_1"] == j["output_2"]]:  # alpaca_eval: a draw, no judge call
            rec = {**j, "is_switched_outputs": False, "preference": 1.5, "raw_completion": None,
                   "status": "same_output", "error": None}
            log.append(rec)
            done[j["key"]] = rec
            todo.remove(j)
        client = JudgeClient(settings)
        template = annotator_template()
        failed: dict[str, str] = {}

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
    stats = {**client.stats, "failed": len(failed), "resumed": resumed}
    if failed:
        stats["first_failure"] = next(iter(failed.values()))
    return done, stats


def annotate_outputs(outputs: list[dict], ref_of: dict, index_of: dict, log_path: Path, settings: JudgeSettings, *,
                     label: str, rejudge_malformed: bool, console, quiet: bool) -> tuple[list[dict], dict]:
    """Annotations of the model's outputs by the judge: the reference answer is output_1, the
    model's output_2. Returns (annotations in the outputs' order, stats)."""
    jobs = []
    for o in outputs:
        ref = ref_of[o["instruction"]]
        jobs.append({"key": annotation_key(settings.model, o["instruction"], ref["output"], o["output"]),
                     "index": index_of[o["instruction"]], "instruction": o["instruction"], "dataset": ref["dataset"],
                     "output_1": ref["output"], "generator_1": ref["generator"],
                     "output_2": o["output"], "generator_2": label, "annotator": ANNOTATOR, "judge": settings.model})
    done, stats = annotate(jobs, settings, log_path, rejudge_malformed=rejudge_malformed, console=console, quiet=quiet)
    stats["failed"] = sum(1 for j in jobs if j["key"] not in done)
    return [done[j["key"]] for j in jobs if j["key"] in done], stats
