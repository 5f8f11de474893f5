"""Test helper, not a test module: `python tests/compare_kill_driver.py OUT_DIR RUN` runs the small
comparison of tests/test_compare_run.py (its OPTIONS, with a checkpoint every step) and SIGKILLs
itself once the run RUN (e.g. alpha_dpo/beta=1.0/seed-42) has saved its checkpoint of step 1 (of 2).

The kill point is a public function wrapped here (`train.checkpoint.save_checkpoint`): the package
has no test hook of its own."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(out: str, run: str) -> None:
    from alphadpo_cli.compare import run_compare
    from alphadpo_cli.train import checkpoint
    from test_compare_run import killable_options

    save = checkpoint.save_checkpoint

    def save_then_die(output_dir, *args, **kwargs):
        path = save(output_dir, *args, **kwargs)
        if Path(output_dir).as_posix().endswith(run):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.save_checkpoint = save_then_die
    run_compare(killable_options(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
