"""Test helper, not a test module: `python tests/nonfinite_driver.py train ...` is `alphadpo train ...`
with NaN injected through the objective seam at chosen steps, and every optimiser step's effect on the
model recorded. With `--num-processes N` it launches itself (not `-m alphadpo_cli.cli`) under the same
`accelerate launch` command the CLI builds, so every rank runs the injection and the recording too.

Environment:
  NONFINITE_AT   comma-separated `step:kind:rank:micro` (rank -1: every rank). kind `value`: the
                 micro-batch's losses become NaN but their gradient stays finite (losses + NaN), what
                 no gradient check can see; kind `grad`: NaN losses and NaN gradients (losses × NaN).
  NONFINITE_LOG  JSON-lines file that rank 0 appends one row to per optimiser step (unset: nothing
                 is recorded): whether the step left the module weights, the fp32 master weights
                 (DeepSpeed's) and Adam's moments bit for bit as they were, whether everything is
                 finite, what the step reported (`finite`, `nonfinite_skipped`) and, under
                 DeepSpeed, what the engine says it did (`was_step_applied`, `skipped_steps`).

Weights are read with public API only: the policy's parameters (under ZeRO-3 inside
`deepspeed.zero.GatheredParameters`), `deepspeed.utils.safe_get_full_fp32_param` and
`safe_get_full_optimizer_state` under DeepSpeed, the optimiser's `state` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path


def injections(spec: str) -> dict[tuple[int, int], tuple[str, int]]:
    """{(step, micro): (kind, rank)} from `NONFINITE_AT`."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        step, kind, rank, micro = item.split(":")
        assert kind in ("value", "grad"), kind
        out[(int(step), int(micro))] = (kind, int(rank))
    return out


def _snapshot(parts, with_state: bool) -> dict[str, list]:
    """Full copies of the policy's trainable weights, their fp32 master weights and (`with_state`:
    once an update has run, so that every rank asks for the same) Adam moments."""
    import torch

    from alphadpo_cli.train.distributed import is_deepspeed

    named = [(n, p) for n, p in parts.models.policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    snap = {"weights": [], "master": [], "exp_avg": [], "exp_avg_sq": []}
    if is_deepspeed(parts.accelerator):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        with deepspeed.zero.GatheredParameters(params):
            snap["weights"] = [p.detach().clone() for p in params]
        snap["master"] = [safe_get_full_fp32_param(p).detach().clone() for p in params]
        for key in ("exp_avg", "exp_avg_sq") if with_state else ():
            snap[key] = [safe_get_full_optimizer_state(p, key).detach().clone() for p in params]
    else:
        snap["weights"] = [p.detach().clone() for p in params]
        state = parts.optimizer.optimizer.state
        for key in ("exp_avg", "exp_avg_sq") if with_state else ():
            snap[key] = [state[p][key].detach().clone() for p in params if key in state.get(p, {})]
    snap["finite"] = all(bool(torch.isfinite(t).all()) for v in snap.values() for t in v)
    return snap


def _same(a: list, b: list) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def install() -> None:
    """Wrap the trainer's loss (`compute_loss`, looked up when a run starts) and its `step`."""
    import torch

    from alphadpo_cli.train import trainer

    plan = injections(os.environ.get("NONFINITE_AT", ""))
    log = os.environ.get("NONFINITE_LOG")
    where = {"step": 0, "micro": 0, "in_step": False}
    real_loss, real_step = trainer.compute_loss, trainer.step

    def rank() -> int:
        return int(os.environ.get("RANK", "0"))

    def loss_fn(name, inputs, params, normalizer):
        out = real_loss(name, inputs, params, normalizer)
        if where["in_step"]:
            kind, who = plan.get((where["step"], where["micro"]), (None, None))
            where["micro"] += 1
            if kind is not None and who in (-1, rank()):
                nan = torch.tensor(float("nan"), dtype=out.losses.dtype, device=out.losses.device)
                losses = out.losses + nan if kind == "value" else out.losses * nan
                out = dataclasses.replace(out, losses=losses)
        return out

    def step(parts, objective, batches, state, **kw):
        where.update(step=state.step + 1, micro=0, in_step=True)
        before = _snapshot(parts, with_state=state.step > 0) if log else None
        try:
            out = real_step(parts, objective, batches, state, **kw)
        finally:
            where["in_step"] = False
        if not log:
            return out
        after = _snapshot(parts, with_state=True)
        if rank() == 0:
            row = {"step": state.step, "finite": bool(out.finite), "nonfinite_skipped": out.metrics["nonfinite_skipped"],
                   "all_finite": after["finite"], "pairs": out.pairs,
                   **{f"{k}_unchanged": _same(before[k], after[k]) for k in ("weights", "master", "exp_avg", "exp_avg_sq")}}
            if hasattr(parts.scorer, "was_step_applied"):  # DeepSpeed's own view of the step
                row["engine_step_applied"] = bool(parts.scorer.was_step_applied())
                row["engine_skipped_steps"] = int(parts.scorer.skipped_steps)
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        return out

    trainer.compute_loss = loss_fn
    trainer.step = step


def _launch_this_script() -> None:
    """In the launching process: the job's ranks run this file instead of `-m alphadpo_cli.cli`."""
    from alphadpo_cli.train import launch

    build = launch.build_launch_command

    def build_launch_command(plan, config_file, argv, python=None):
        cmd = build(plan, config_file, argv, python)
        i = cmd.index("-m", cmd.index("--main_process_port"))
        assert cmd[i + 1] == "alphadpo_cli.cli", cmd
        return [*cmd[:i], str(Path(__file__).resolve()), *cmd[i + 2:]]

    launch.build_launch_command = build_launch_command


if __name__ == "__main__":
    from alphadpo_cli.cli import main
    from alphadpo_cli.train.launch import inside_launched_process

    if inside_launched_process():
        install()
    elif "--num-processes" in sys.argv or "--num-gpus" in sys.argv:
        _launch_this_script()
    else:
        install()  # one process: trains right here
    main()
