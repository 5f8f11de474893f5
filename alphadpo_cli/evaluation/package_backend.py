"""The alpaca_eval package as AlpacaEval's annotator (`--annotator-backend alpaca_eval`).

`annotate_with_package` runs it as `python -m alphadpo_cli.evaluation.package_backend ARGS`: a
separate process because alpaca_eval reads OPENAI_API_BASE / OPENAI_API_KEY / concurrency at
import time. Its annotation cache and outputs go into the run's output directory (never into
site-packages), and its length-controlled metric (which downloads from the hub) is not used:
the caller computes LC itself from the annotations.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError
from .annotator import ANNOTATOR
from .common import package_dir, write_json_records


def annotate_with_package(outputs: list[dict], references: list[dict], out_dir: Path, *, name: str,
                          judge_model: str, base_url: str | None, api_key_env: str, concurrency: int) -> list[dict]:
    """Run alpaca_eval's own annotator in a subprocess; returns its annotations."""
    if package_dir("alpaca_eval") is None:
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


def annotate_outputs(outputs: list[dict], ref_of: dict, index_of: dict, out_dir: Path, *, label: str,
                     judge_model: str, base_url: str | None, api_key_env: str,
                     concurrency: int) -> tuple[list[dict], dict]:
    """Annotations by the alpaca_eval package itself, in `annotator`'s record format."""
    refs = [{k: ref_of[o["instruction"]][k] for k in ("instruction", "output", "generator", "dataset")} for o in outputs]
    raw = annotate_with_package(outputs, refs, out_dir, name=label, judge_model=judge_model, base_url=base_url,
                                api_key_env=api_key_env, concurrency=concurrency)
    annotations = []
    for a in raw:
        p = a.get("preference")
        usable = p is not None and not (isinstance(p, float) and math.isnan(p))
        annotations.append({"index": index_of.get(a.get("instruction"), -1), "instruction": a.get("instruction"),
                            "output_1": a.get("output_1", ""), "generator_1": a.get("generator_1"),
                            "output_2": a.get("output_2", ""), "generator_2": a.get("generator_2"),
                            "annotator": a.get("annotator", ANNOTATOR), "judge": judge_model,
                            "preference": float(p) if usable else None, "status": "ok" if usable else "malformed"})
    return annotations, {"backend": "alpaca_eval"}


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    work = Path(args["work"])
    import yaml
    from alpaca_eval import constants, evaluate

    cfg_dir = Path(constants.EVALUATORS_CONFIG_DIR)
    annotators_config = args["annotator"]
    if args["judge_model"] != "gpt-4-1106-preview":
        # Same annotator, another judge: a copy of its config with the model swapped.
        base = yaml.safe_load((cfg_dir / args["annotator"] / "configs.yaml").read_text())
        conf = base[args["annotator"]]
        conf["prompt_template"] = str(cfg_dir / conf["prompt_template"])
        conf["completions_kwargs"]["model_name"] = args["judge_model"]
        target = work / "annotator" / args["annotator"] / "configs.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump({args["annotator"]: conf}))
        annotators_config = str(target)
    leaderboard, annotations = evaluate(
        model_outputs=str(work / "model_outputs.json"),
        reference_outputs=str(work / "reference_outputs.json"),
        annotators_config=annotators_config,
        name=args["name"],
        output_path=str(work),
        precomputed_leaderboard=None,
        is_overwrite_leaderboard=True,
        is_return_instead_of_print=True,
        is_cache_leaderboard=False,
        fn_metric="get_winrate",
        sort_by="win_rate",
        caching_path=str(work / "annotations_cache.json"),
    )
    if not (work / "annotations.json").is_file():
        (work / "annotations.json").write_text(json.dumps(annotations.to_dict(orient="records"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
