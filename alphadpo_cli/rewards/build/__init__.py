"""On-policy preference data (`alphadpo data build`): sample answers from a model, score them
with a reward, binarise them into chosen/rejected pairs, and write a dataset that
`alphadpo train --dataset` reads as it is.

    from alphadpo_cli.rewards.build import BuildOptions, build_dataset
    summary = build_dataset(BuildOptions(dataset="prompts.jsonl", output_dir="data/onpolicy",
                                         model="tiny-random", reward="examples/verifiable_reward.py:reward"))

The pipeline of the paper's Llama3-Instruct v0.2 setting (SimPO's `on_policy_data_gen`): N answers
per prompt at temperature 0.8, top-p 0.95 (5 by default), the longest allowed by the preset,
scored by a reward (ArmoRM there); the best answer is chosen and the worst rejected.

The parts, in reading order:

* `pairing`: the pairing rule as pure functions (`binarise`: strategies best-worst, all-pairs,
  best-random; `min_gap`, `chosen_must_finish`; `pair_row`: a pair as a dataset row, with
  `score_decimals`). Start here.
* `options`: `BuildOptions` (one field per CLI flag), its checks, the decoding and reward it
  resolves to.
* `prompts`: the prompt splits, read by `alphadpo_cli.prompts.read_prompts` (the reader `alphadpo
  eval reward` uses): a preference row's prompt as training sees it, else its `prompt`, else its
  `messages` conversation without the last answer (or the column named by `prompt_field`). Every
  other field of the row (e.g. a verifiable row's `constraints`) is handed to the reward and copied
  into the output rows. Bad rows are reported (file, row, field) before any model loads. The test
  prompts are a split of their own, or held out of the training prompts; the prompts are cut into
  batches, the unit of resuming and sharding.
* `work`: the work directory `<output>/.work`: `identity.json` and every process's work logs
  (`artefacts.WorkLog`): each finished batch is one fsynced JSONL line of
  `answers.<rank>-of-<world>.jsonl`, then of `scores.<rank>-of-<world>.jsonl`, so a killed build
  reruns only the batches it had not finished. A rerun with other settings is refused
  (`overwrite` starts again, `rescore` keeps the answers and scores them again with a new reward).
  Shards: with RANK/WORLD_SIZE (torchrun, accelerate) or `shard=(k, n)`, a process takes every
  n-th batch and appends to its own logs; on a GPU machine each process is pinned to GPU LOCAL_RANK.
* `phases`: generation (`evaluation.generate.ChatGenerator.sample`: vLLM on a GPU, batched
  transformers otherwise, the code `alphadpo eval` uses), then scoring. A function reward that
  returns NaN, an infinity or anything but a number stops the build with the function, the row
  and the prompt named. A reward model's answer that it could not score (a NaN or infinite output)
  takes no part in any pair, and is counted (`unscored_answers`); an answer whose reward-model
  input was longer than the model's max length was cut from the left (the end of the answer kept)
  and is counted (`reward_input_cut`).
* `merge`: whichever process finds every batch done (or `merge_only`) writes `train.jsonl` (and
  `test.jsonl` with a test split), UltraFeedback-binarized rows (prompt, chosen and rejected
  message lists, score_chosen, score_rejected, the row's other fields), and `build.json`: the
  settings, counts, dropped pairs by reason, score gaps, lengths, throughput, versions.
* `report`: those statistics and the summary table; `pipeline`: `build_dataset` end to end.
"""

from __future__ import annotations

from ...prompts import PromptRow, extract_prompt
from .options import (DEFAULT_BATCH, NUM_SAMPLES, TEMPERATURE, TOP_P, WORK_FORMAT, BuildOptions, BuildSummary,
                      check_options, resolve_decoding)
from .pairing import DROP_REASONS, STRATEGIES, Candidate, binarise, candidates, pair_row
from .pipeline import build_dataset, load_scored
from .prompts import Batch, load_prompt_splits, make_batches
from .report import describe, print_summary
from .work import WorkStore, gpu_for_shard, shard_from_env

__all__ = ["BuildOptions", "BuildSummary", "Candidate", "PromptRow", "STRATEGIES", "DROP_REASONS", "binarise",
           "build_dataset", "extract_prompt", "load_prompt_splits", "load_scored", "print_summary", "shard_from_env",
           "gpu_for_shard", "resolve_decoding", "check_options", "candidates", "pair_row", "describe", "Batch",
           "make_batches", "WorkStore", "DEFAULT_BATCH", "NUM_SAMPLES", "TEMPERATURE", "TOP_P", "WORK_FORMAT"]
