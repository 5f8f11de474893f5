"""Run the alpaca_eval package's annotator (`python -m alphadpo_cli.evaluation.package_backend ARGS`).

A separate process because alpaca_eval reads OPENAI_API_BASE / OPENAI_API_KEY / concurrency at
import time. Its annotation cache and outputs go into the run's output directory (never into
site-packages), and its length-controlled metric (which downloads from the hub) is not used:
the caller computes LC itself from the annotations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
