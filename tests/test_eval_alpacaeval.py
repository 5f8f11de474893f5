"""AlpacaEval 2 end to end on the tiny model with a real HTTP judge on 127.0.0.1, the annotator
protocol, resuming (partial outputs file; a killed run), and the LC win rate."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from alphadpo_cli.artefacts import WorkLog
from alphadpo_cli.data import DataError
from alphadpo_cli.evaluation import evaluate
from alphadpo_cli.evaluation import alpacaeval as ae
from alphadpo_cli.evaluation import lc

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "eval"
EVAL_SET = FIX / "alpaca_eval_small.json"

_spec = importlib.util.spec_from_file_location("eval_judge_server", FIX / "judge_server.py")
judge_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(judge_server)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAST = dict(model="tiny-random", eval_set=str(EVAL_SET), max_new_tokens=8, temperature=1.0, judge_model="stub",
            judge_backoff=0.01, quiet=True)


def judge_log(out: Path) -> list[dict]:
    """The records of the AlpacaEval judge log (annotations.jsonl), its identity header left out."""
    return WorkLog.read(out / "annotations.jsonl", ae.JUDGE_LOG_IDENTITY, kind=ae.JUDGE_LOG_KIND)


def expected_preference(ann: dict) -> float:
    """What the stub judge implies for (reference, model), whatever the display order was."""
    p_model = judge_server.alpaca_p_m(len(ann["output_2"]), len(ann["output_1"]))
    return 1.0 + p_model


# --------------------------------------------------------------------------------------------
# protocol


def test_template_is_filled_like_alpaca_eval_and_parsed_to_chat_messages():
    prompt = ae.fill_template(ae.annotator_template(), {"instruction": "say hi", "output_1": "A", "output_2": "B"})
    msgs = ae.chatml_messages(prompt)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert '"instruction": """say hi""",' in msgs[1]["content"]
    assert '"output": """A"""' in msgs[1]["content"] and '"output": """B"""' in msgs[1]["content"]
    assert msgs[1]["content"].endswith("## Best Model Identifier")
    # alpaca_eval replaces the first occurrence of each placeholder in turn (not str.format), quirks included
    quirk = ae.fill_template("{instruction}|{output_1}", {"instruction": "x {output_1}", "output_1": "A"})
    assert quirk == "x A|{output_1}"


def test_switch_is_seeded_on_the_instruction_as_alpaca_eval():
    flags = [ae.is_switched(r["instruction"]) for r in json.loads(EVAL_SET.read_text())]
    assert flags == [False, True, False, False, True, True]  # checked against alpaca_eval 0.6.6's processor


def test_logprob_parser():
    resp = {"choices": [{"logprobs": {"content": [{"top_logprobs": [
        {"token": "m", "logprob": math.log(0.3)}, {"token": "M", "logprob": math.log(0.6)}, {"token": "x", "logprob": -1}]}]}}]}
    pref, err, _ = ae.preference_from_logprobs(resp)
    assert err is None and pref == pytest.approx(2 - 0.3 / 0.9)
    only_m = {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "m", "logprob": -0.1}]}]}}]}
    assert ae.preference_from_logprobs(only_m)[0] == pytest.approx(1.0)
    pref, err, _ = ae.preference_from_logprobs({"choices": [{"message": {"content": "m"}, "logprobs": None}]})
    assert pref is None and "no top_logprobs" in err
    pref, err, _ = ae.preference_from_logprobs(
        {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "A", "logprob": -0.1}]}]}}]})
    assert pref is None and "neither 'm' nor 'M'" in err


def test_win_rate_metrics_match_alpaca_eval_definitions():
    m = ae.winrate_metrics([1.0, 2.0, 1.5, 1.8, None, float("nan")])
    assert m["n_total"] == 4 and m["n_wins"] == 2 and m["n_wins_base"] == 1 and m["n_draws"] == 1
    assert m["win_rate"] == pytest.approx(np.mean([0, 1, 0.5, 0.8]) * 100)
    assert m["standard_error"] == pytest.approx(np.std([0, 1, 0.5, 0.8], ddof=1) / 2 * 100)
    assert m["discrete_win_rate"] == pytest.approx((2 + 0.5) / 4 * 100)


def test_max_instances_uses_alpaca_eval_shuffle():
    assert ae.select_instances(805, None) == list(range(805))
    sub = ae.select_instances(805, 5)
    assert sub == [int(i) for i in np.random.RandomState(123).permutation(805)[:5]]


def test_eval_set_errors_are_clear(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(DataError, match="missing 'output'"):
        ae.load_eval_set(bad)
    monkeypatch.setattr(ae, "bundled_eval_set", lambda: None)
    with pytest.raises(DataError, match="--eval-set PATH"):
        ae.load_eval_set(None)  # offline (HF_HUB_OFFLINE=1), nothing cached, no bundled copy


# --------------------------------------------------------------------------------------------
# end to end


def test_end_to_end_with_http_judge_retries_and_malformed(tmp_path):
    out = tmp_path / "ae"
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(429, {"Retry-After": "0.1"}), (500, {}), (429, {"Retry-After": "0"})])
        res = evaluate("alpacaeval", output_dir=str(out), judge_base_url=srv.url, judge_concurrency=3, **FAST)
        judged = srv.answered
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert len(outputs) == 6 and {o["generator"] for o in outputs} == {"tiny-random"}
    assert set(outputs[0]) >= {"instruction", "output", "generator", "dataset"}
    assert judged == 6
    anns = json.loads((out / "annotations.json").read_text())
    assert len(anns) == 6
    malformed = [a for a in anns if a["status"] == "malformed"]
    assert len(malformed) == 1 and "MALFORMED" in malformed[0]["instruction"] and malformed[0]["preference"] is None
    ok = [a for a in anns if a["status"] == "ok"]
    assert {a["is_switched_outputs"] for a in ok} == {True, False}
    for a in ok:  # un-swapping is right whichever order the judge saw
        assert a["preference"] == pytest.approx(expected_preference(a), abs=1e-9)
    wr = np.mean([a["preference"] - 1 for a in ok]) * 100
    assert res["win_rate"] == pytest.approx(wr)
    assert res["n_total"] == 5 and res["n_malformed"] == 1 and res["n_failed"] == 0
    assert res["judge_stats"]["rate_limited"] == 2 and res["judge_stats"]["server_errors"] == 1
    assert res["avg_length"] == int(np.mean([len(o["output"]) for o in outputs]))
    assert "APPROXIMATE" in res["lc_method"] and res["lc"]["lc_official"] is False
    with open(out / "leaderboard.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["win_rate"]) == pytest.approx(wr) and row["name"] == "tiny-random"
    for col in ("length_controlled_winrate", "standard_error", "avg_length", "lc_method"):
        assert col in row

    # A second run with everything in place asks the judge nothing and generates nothing.
    with judge_server.JudgeServer() as srv:
        res2 = evaluate("alpacaeval", output_dir=str(out), judge_base_url=srv.url, **FAST)
        assert srv.requests == []
    assert res2["win_rate"] == pytest.approx(res["win_rate"]) and res2["judge_stats"]["resumed"] == 6

    # --rejudge-malformed asks again only for the malformed one.
    with judge_server.JudgeServer() as srv:
        evaluate("alpacaeval", output_dir=str(out), judge_base_url=srv.url, rejudge_malformed=True, **FAST)
        assert len(srv.requests) == 1


def test_failed_requests_are_recorded_and_retried_by_the_next_run(tmp_path):
    out = tmp_path / "ae"
    with judge_server.JudgeServer() as srv:
        srv.fail_plan.extend([(500, {})] * 2)
        res = evaluate("alpacaeval", output_dir=str(out), judge_base_url=srv.url, judge_concurrency=1,
                       judge_max_retries=1, max_instances=3, **FAST)
    assert res["n_failed"] == 1 and res["n_total"] + res["n_malformed"] == 2
    log = judge_log(out)
    assert len(log) == 3 and sum(r["status"] == "failed" for r in log) == 1
    with judge_server.JudgeServer() as srv:
        res = evaluate("alpacaeval", output_dir=str(out), judge_base_url=srv.url, max_instances=3, **FAST)
        assert len(srv.requests) == 1
    assert res["n_failed"] == 0


def test_generation_resumes_from_a_partial_outputs_file(tmp_path):
    out = tmp_path / "ae"
    out.mkdir()
    rows = json.loads(EVAL_SET.read_text())
    partial = [{"instruction": rows[i]["instruction"], "output": f"SENTINEL {i}", "generator": "tiny-random",
                "dataset": rows[i]["dataset"]} for i in (0, 3)]
    (out / "model_outputs.json").write_text(json.dumps(partial))
    res = evaluate("alpacaeval", output_dir=str(out), judge=False, **FAST)
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]
    assert outputs[0]["output"] == "SENTINEL 0" and outputs[3]["output"] == "SENTINEL 3"
    assert all(not o["output"].startswith("SENTINEL") for i, o in enumerate(outputs) if i not in (0, 3))
    assert "win_rate" not in res
    # Other decoding settings do not silently mix with these answers.
    from alphadpo_cli.config import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        evaluate("alpacaeval", output_dir=str(out), judge=False, **{**FAST, "max_new_tokens": 9})


def test_resume_after_a_killed_run(tmp_path):
    """Kill the CLI (SIGKILL) while it is judging; the rerun judges only what is missing."""
    out = tmp_path / "ae"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with judge_server.JudgeServer(delay=0.4) as srv:
        cmd = [sys.executable, "-m", "alphadpo_cli.cli", "eval", "alpacaeval", "--model", "tiny-random",
               "--eval-set", str(EVAL_SET), "--max-new-tokens", "8", "--temperature", "1", "-o", str(out),
               "--judge-base-url", srv.url, "--judge-model", "stub", "--judge-concurrency", "1"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = out / "annotations.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.is_file() and len(log.read_text().splitlines()) >= 3:  # the header and two results
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = len(judge_log(out))
        assert 2 <= done_before < 6
        first_run_requests = len(srv.requests)
        outputs_before = (out / "model_outputs.json").read_text()

        srv.delay = 0
        res = evaluate("alpacaeval", output_dir=str(out), judge_base_url=srv.url, **FAST)
        second = len(srv.requests) - first_run_requests
    assert second == 6 - done_before  # nothing judged twice, nothing regenerated
    assert (out / "model_outputs.json").read_text() == outputs_before
    assert res["n_total"] + res["n_malformed"] == 6 and res["judge_stats"]["resumed"] == done_before


def test_cli_missing_key_exits_2_without_traceback(monkeypatch, tmp_path):
    from alphadpo_cli.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    r = CliRunner().invoke(main, ["eval", "alpacaeval", "--model", "tiny-random", "--eval-set", str(EVAL_SET),
                                  "-o", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert "OPENAI_API_KEY" in r.output and "Traceback" not in r.output


def test_cli_prints_the_table(tmp_path):
    from alphadpo_cli.cli import main

    with judge_server.JudgeServer() as srv:
        r = CliRunner().invoke(main, ["eval", "alpacaeval", "--model", "tiny-random", "--eval-set", str(EVAL_SET),
                                      "--max-instances", "2", "--max-new-tokens", "4", "-o", str(tmp_path / "x"),
                                      "--judge-base-url", srv.url, "--judge-model", "stub"])
    assert r.exit_code == 0, r.output
    assert "LC win rate (APPROXIMATE)" in r.output and "win rate" in r.output and "average length" in r.output


# --------------------------------------------------------------------------------------------
# length control


def _synthetic(n=200, seed=0, bias=1.5):
    rng = np.random.default_rng(seed)
    anns = []
    for i in range(n):
        l1 = int(rng.integers(50, 400))
        l2 = int(rng.integers(50, 400))
        z = 0.2 + bias * np.tanh((l2 - l1) / 150)  # longer model outputs win more often
        p = 1 / (1 + np.exp(-z))
        anns.append({"index": i, "output_1": "x" * l1, "output_2": "y" * l2, "preference": 1 + p})
    return anns


def test_lc_approximation_removes_a_length_effect_and_is_labelled():
    anns = _synthetic()
    res = lc.length_controlled(anns, use_sklearn=False)
    wr = ae.winrate_metrics([a["preference"] for a in anns])["win_rate"]
    assert res["lc_official"] is False and res["lc_method"].startswith("APPROXIMATE")
    assert res["lc_weights"]["np.tanh(std_delta_len)"] < 0  # Δlen = reference - model
    assert abs(res["length_controlled_winrate"] - 100 / (1 + math.exp(-0.2))) < abs(wr - 100 / (1 + math.exp(-0.2))) + 1.0


def test_lc_official_with_the_auxiliary_files(tmp_path):
    anns = _synthetic(n=60)
    rng = np.random.default_rng(1)
    with open(tmp_path / "df_gamed.csv", "w") as fh:
        fh.write("model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\n")
        for model in ("gpt4_gamed_verbose", "gpt4_gamed_concise"):
            for i in range(60):
                fh.write(f"{model},{i},{rng.uniform(0.2, 0.8):.4f},{rng.normal():.4f},{0.5 + 0.01 * i:.4f},False\n")
    with open(tmp_path / "instruction_difficulty.csv", "w") as fh:
        fh.write(",instruction_difficulty\n" + "".join(f"{i},{0.5 + 0.01 * i}\n" for i in range(60)))
    files = lc.locate_lc_files(tmp_path)
    res = lc.length_controlled(anns, files, use_sklearn=False)
    assert res["lc_official"] is True and res["lc_method"] == "official (length_controlled_v1)"
    assert set(res["lc_weights"]) == {"np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)"}
    noreg = lc.length_controlled(anns, lc.LCFiles(None, files.instruction_difficulty), use_sklearn=False)
    assert noreg["lc_method"].startswith("APPROXIMATE (length_controlled_noreg")
    with pytest.raises(DataError, match="do not match"):
        lc.length_controlled([{**anns[0], "index": 999}], files, use_sklearn=False)


def test_l1_solver_is_optimal():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 3))
    p = 1 / (1 + np.exp(-(X @ np.array([1.0, -0.5, 0.0]) + rng.normal(scale=0.3, size=80))))
    s = np.ones(80)
    for C in (0.01, 1.0, 100.0):
        w = lc.l1_logistic(X, p, s, C)
        f0 = lc._objective(w, X, p, s, C)
        for _ in range(50):  # no nearby point is better
            assert lc._objective(w + rng.normal(scale=1e-3, size=3), X, p, s, C) >= f0 - 1e-9


def test_numpy_fit_agrees_with_scikit_learn():
    pytest.importorskip("sklearn")
    anns = _synthetic(n=120)
    a = lc.length_controlled(anns, use_sklearn=False)
    b = lc.length_controlled(anns, use_sklearn=True)
    assert b["lc_fitter"] == "scikit-learn"
    assert a["length_controlled_winrate"] == pytest.approx(b["length_controlled_winrate"], abs=0.2)


def test_alpaca_eval_package_backend_agrees_with_builtin(tmp_path):
    """Only where the optional extra (alphadpo[eval]) is installed."""
    if ae.package_dir("alpaca_eval") is None:
        pytest.skip("alpaca_eval is not installed")
    rows, _ = ae.load_eval_set(EVAL_SET)
    outs = [{"instruction": r["instruction"], "output": "short answer " * (i + 1) if i != 2 else r["output"],
             "generator": "mine", "dataset": r["dataset"]} for i, r in enumerate(rows)]
    with judge_server.JudgeServer() as srv:
        pkg = ae.annotate_with_package(outs, rows, tmp_path, name="mine", judge_model="stub", base_url=srv.url,
                                       api_key_env="OPENAI_API_KEY", concurrency=2)
        jobs = [{"key": str(i), "index": i, "instruction": o["instruction"], "output_1": r["output"], "output_2": o["output"]}
                for i, (o, r) in enumerate(zip(outs, rows))]
        done, _ = ae.annotate(jobs, ae.JudgeSettings(model="stub", base_url=srv.url), tmp_path / "a.jsonl", quiet=True)
    ours = {r["instruction"]: r["preference"] for r in done.values()}
    for a in pkg:
        if a.get("preference") is None:
            assert ours[a["instruction"]] is None
        else:
            assert a["preference"] == pytest.approx(ours[a["instruction"]], abs=1e-8)
    assert not list(ae.package_dir("alpaca_eval").rglob("annotations_seed*"))  # no cache in site-packages
    assert (tmp_path / "alpaca_eval" / "annotations_cache.json").is_file()


# --------------------------------------------------------------------------------------------
# a newcomer's quick run: few instances, no network, no library chatter


def _no_signal(n):
    """n draws of different lengths: nothing a fit could keep, so every weight is 0 (exactly 50.00)."""
    rng = np.random.default_rng(7)
    return [{"index": i, "output_1": "x" * int(rng.integers(50, 400)), "output_2": "y" * int(rng.integers(50, 400)),
             "preference": 1.5} for i in range(n)]


@pytest.mark.parametrize("use_sklearn", [False, True])
def test_too_few_instances_give_no_lc_number(use_sklearn):
    if use_sklearn:
        pytest.importorskip("sklearn")
    res = lc.length_controlled(_no_signal(10), use_sklearn=use_sklearn)
    assert res["length_controlled_winrate"] is None and res["lc_too_few"] is True
    assert set(res["lc_weights"].values()) == {0.0}
    assert res["lc_method"].startswith("not computed: too few instances judged (10 usable annotations)")
    # with enough instances a fit is reported as before, an all-zero one too (there it is a finding)
    assert lc.length_controlled(_synthetic(n=200), use_sklearn=use_sklearn)["length_controlled_winrate"] is not None
    assert lc.length_controlled(_no_signal(lc.MIN_INSTANCES), use_sklearn=use_sklearn)["length_controlled_winrate"] == 50.0


def test_too_few_instances_are_said_in_the_table():
    from io import StringIO

    from rich.console import Console

    lc_res = lc.length_controlled(_no_signal(10), use_sklearn=False)
    result = {"name": "m", "n_instances": 10, "win_rate": 50.0, "standard_error": 3.0, "n_wins": 5, "n_wins_base": 5,
              "n_draws": 0, "n_total": 10, "avg_length": 100, "length_controlled_winrate": None, "lc": lc_res,
              "lc_method": lc_res["lc_method"], "judge": "stub", "annotator": ae.ANNOTATOR, "output_dir": "x"}
    buf = StringIO()
    ae.print_result(result, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "too few instances judged" in text
    lc_row = next(line for line in text.splitlines() if "LC win rate" in line)
    assert "50.00" not in lc_row and "too few instances judged" in lc_row
    assert "approximation, not the official" not in text


def test_sklearn_deprecation_notices_are_filtered_but_real_warnings_kept():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with lc._quiet_sklearn_deprecations():
            warnings.warn_explicit("'penalty' was deprecated", FutureWarning, "_logistic.py", 1,
                                   module="sklearn.linear_model._logistic")
            warnings.warn_explicit("Inconsistent values: penalty=l1 with l1_ratio=0.0.", UserWarning, "_logistic.py",
                                   2, module="sklearn.linear_model._logistic")
            warnings.warn_explicit("lbfgs failed to converge", UserWarning, "_logistic.py", 3,
                                   module="sklearn.linear_model._logistic")
            warnings.warn_explicit("something else changes", FutureWarning, "x.py", 4, module="numpy.core")
    assert [str(w.message) for w in seen] == ["lbfgs failed to converge", "something else changes"]
    if importlib.util.find_spec("sklearn") is not None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            lc.length_controlled(_synthetic(n=60), use_sklearn=True)
            lc.length_controlled(_synthetic(n=6), use_sklearn=True)  # the no-CV path
        assert not [w for w in seen if "sklearn" in (w.filename or "")], [str(w.message) for w in seen]


def test_quick_offline_run_prints_results_without_warnings_retries_or_a_fake_lc(tmp_path):
    """`eval alpacaeval` on 12 instructions with the hub out of reach: one line about the LC files,
    no scikit-learn FutureWarnings, and "too few instances" instead of 50.00."""
    rows = [{"instruction": f"Instruction number {i}", "output": "r" * 40, "generator": "gpt4_turbo",
             "dataset": "helpful_base"} for i in range(12)]
    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps(rows))
    outputs = tmp_path / "mine.json"
    outputs.write_text(json.dumps([{"instruction": r["instruction"], "output": "m" * 40} for r in rows]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONWARNINGS"):
        env.pop(var, None)
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"  # a closed port: nothing leaves this machine
    s.close()
    with judge_server.JudgeServer() as srv:
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "alphadpo_cli.cli", "eval", "alpacaeval", "--model-outputs",
                            str(outputs), "--eval-set", str(eval_set), "-o", str(tmp_path / "o"),
                            "--judge-base-url", srv.url, "--judge-model", "stub"],
                           env=env, capture_output=True, text=True, timeout=240)
        took = time.monotonic() - start
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Warning" not in out and "Traceback" not in out and "Retrying" not in out, out
    assert "too few instances judged" in out
    joined = " ".join(out.split())
    assert joined.count("out of reach") == 1 and "--lc-dir DIR" in joined
    assert took < 60


# --------------------------------------------------------------------------------------------
# the options object, and judge logs from before logs had headers


def _outputs_file(tmp_path: Path) -> Path:
    rows = json.loads(EVAL_SET.read_text())
    f = tmp_path / "mine.json"
    f.write_text(json.dumps([{"instruction": r["instruction"], "output": "m" * (20 + 30 * i)} for i, r in enumerate(rows)]))
    return f


def test_options_object_and_flat_keywords_are_the_same_run(tmp_path):
    from alphadpo_cli.evaluation.options import JudgeOptions, OutputOptions

    mine = _outputs_file(tmp_path)
    with judge_server.JudgeServer() as srv:
        opts = ae.AlpacaEvalOptions(model_outputs=str(mine), eval_set=str(EVAL_SET),
                                    judge=JudgeOptions(base_url=srv.url, model="stub", backoff=0.01),
                                    output=OutputOptions(output_dir=str(tmp_path / "a"), quiet=True))
        a = ae.run_alpacaeval(opts)
        b = evaluate("alpacaeval", model_outputs=str(mine), eval_set=str(EVAL_SET), judge_base_url=srv.url,
                     judge_model="stub", judge_backoff=0.01, output_dir=str(tmp_path / "b"), quiet=True)
    assert a["win_rate"] == pytest.approx(b["win_rate"]) and a["n_total"] == b["n_total"] == 5
    assert ae.options_from_kwargs(ae.AlpacaEvalOptions, {"judge": False, "seed": 3, "max_instances": 2}) == \
        ae.AlpacaEvalOptions(judge=JudgeOptions(enabled=False), decoding=ae.DecodingOptions(seed=3), max_instances=2)
    with pytest.raises(TypeError, match="unknown option 'judge_modle'"):
        evaluate("alpacaeval", judge_modle="x")
    with pytest.raises(TypeError, match="together"):
        ae.run_alpacaeval(opts, quiet=True)


def test_a_judge_log_without_a_header_is_adopted(tmp_path):
    """A log written before logs had identity headers: its records are reused, and it gets one."""
    mine, out = _outputs_file(tmp_path), tmp_path / "o"
    kw = dict(model_outputs=str(mine), eval_set=str(EVAL_SET), judge_model="stub", output_dir=str(out), quiet=True)
    with judge_server.JudgeServer() as srv:
        first = evaluate("alpacaeval", judge_base_url=srv.url, **kw)
    log = out / "annotations.jsonl"
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["identity"] == ae.JUDGE_LOG_IDENTITY
    log.write_text("\n".join(lines[1:]) + "\n")  # as an older version wrote it
    with judge_server.JudgeServer() as srv:
        again = evaluate("alpacaeval", judge_base_url=srv.url, **kw)
        assert srv.requests == []
    assert again["win_rate"] == pytest.approx(first["win_rate"]) and again["judge_stats"]["resumed"] == 6
    assert log.read_text().splitlines() == lines
