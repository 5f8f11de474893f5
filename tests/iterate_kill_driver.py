"""Test helper, not a test module: `python tests/iterate_kill_driver.py OUT_DIR MODE REFERENCE
PROMPTS REWARD [KILL_AT]` runs the small two-round `alphadpo iterate` experiment that
tests/test_iterate_rounds.py runs (`options()`), and with KILL_AT SIGKILLs itself in round 2:

  sample  once the first of round 2's two sampling batches is in its answers work log;
  train   once round 2's checkpoint of step 1 (of 2) is saved;
  judge   once the first of round 2's held-out answers is written (one prompt per batch).

The kill points are public functions wrapped here (`artefacts.WorkLog.extend`,
`train.checkpoint.save_checkpoint`, `evaluation.common.write_json_records`): the package has no
test hook of its own.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

OVERRIDES = ("training.max_steps=2", "training.per_device_batch_size=2", "training.global_batch_size=2",
             "training.save_steps=1", "training.learning_rate=1e-2", "data.max_length=128",
             "data.max_prompt_length=64")


def options(out, mode: str, reference: str, prompts, reward, **kw):
    from alphadpo_cli.evaluation.options import DecodingOptions
    from alphadpo_cli.iterate import IterateOptions

    base = dict(prompts=str(prompts), reward=str(reward), output_dir=str(out), preset="tiny", heldout_size=2,
                rounds=2, prompts_per_round=4, num_samples=2, chosen_must_finish=False,
                sampling=DecodingOptions(max_new_tokens=8, batch_size=2), judge_batch_size=1, reference=reference,
                overrides=OVERRIDES + (f"model.mode={mode}",), quiet=True)
    return IterateOptions(**{**base, **kw})


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill_at: str) -> None:
    import alphadpo_cli.artefacts as artefacts
    import alphadpo_cli.evaluation.common as common
    import alphadpo_cli.train.checkpoint as checkpoint

    if kill_at == "sample":
        extend = artefacts.WorkLog.extend

        def killing_extend(self, records):
            extend(self, records)
            if "round-2" in str(self.path) and self.path.name.startswith("answers"):
                _die()

        artefacts.WorkLog.extend = killing_extend
    elif kill_at == "train":
        save = checkpoint.save_checkpoint

        def killing_save(output_dir, *args, **kwargs):
            path = save(output_dir, *args, **kwargs)
            if "round-2" in str(output_dir):
                _die()
            return path

        checkpoint.save_checkpoint = killing_save
    elif kill_at == "judge":
        write = common.write_json_records

        def killing_write(path, records, *args, **kwargs):
            write(path, records, *args, **kwargs)
            if "round-2" in str(path) and Path(path).name == "answers.json":
                _die()

        common.write_json_records = killing_write


if __name__ == "__main__":
    out, mode, reference, prompts, reward = sys.argv[1:6]
    if len(sys.argv) > 6:
        _arm(sys.argv[6])
    from alphadpo_cli.iterate import run_iterate

    run_iterate(options(out, mode, reference, prompts, reward))
