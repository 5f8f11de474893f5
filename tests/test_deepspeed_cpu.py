"""DeepSpeed ZeRO-2/3 for real, on CPU processes: `alphadpo train --num-processes 2` with a DeepSpeed
`launch.accelerate_config` on a machine without GPUs runs DeepSpeed on the CPU (DS_ACCELERATOR=cpu,
gloo), through the same command a user types, and trains like one process with the same global batch.

One process, per-device 4, accumulation 2, and two processes, per-device 2, accumulation 2, see the
same pairs per micro-batch and per optimiser step (accelerate shards each micro-batch 2 + 2), so
their loss sequences must agree to float32 rounding (DeepSpeed reduces gradients in another order).
Full fine-tuning, float32 unless said, 3 steps of the tiny random model on tests/fixtures/prefs.

The DeepSpeed CPU ops (shared-memory collectives, CPU Adam for offload) are compiled the first time
on a machine (~1 and ~3 minutes on 2 cores, gcc + ninja, cached in ~/.cache/torch_extensions): the
`deepspeed_cpu_ops` fixture builds them once, before any launch, with a timeout of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from alphadpo_cli.config import resolve_config
from helpers import free_port, read_metrics

slow = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PREFS = ROOT / "tests" / "fixtures" / "prefs"
LAUNCH_PRESETS = ROOT / "presets" / "launch"
STEPS = 3
FULL = [
    "data.max_samples=32", f"training.max_steps={STEPS}", "training.warmup_ratio=0", "training.global_batch_size=8",
    "training.logging_steps=1", "model.mode=full", "model.dtype=fp32", "training.learning_rate=1e-4",
]
LORA = [s for s in FULL if not s.startswith(("model.mode", "training.learning_rate"))] + [
    "model.mode=lora", "training.precompute_ref=false"]
ZERO3 = "launch.accelerate_config=accelerate_zero3.yaml"
COMPARED = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "margin/mean", "normalizer/mu",
            "normalizer/sigma", "grad_norm", "learning_rate")
LAUNCH_TIMEOUT = 420


def _results(out: Path) -> dict:
    return json.loads((out / "train_results.json").read_text())


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ALPHADPO_LAUNCHED", "ACCELERATE_USE_DEEPSPEED")}
    env.update({"ALPHADPO_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
                "PYTHONPATH": str(ROOT)})
    return env


def _command(out: Path, sets, *options, program: list[str] | None = None) -> list[str]:
    """`alphadpo train ...`, the console script when installed (`program`: another entry point)."""
    script = Path(sys.executable).parent / "alphadpo"
    cmd = list(program or ([str(script)] if script.is_file() else [sys.executable, "-m", "alphadpo_cli.cli"]))
    cmd += ["train", "--preset", "tiny", "--dataset", str(PREFS), "-o", str(out), *options]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _train(out: Path, sets, *options, cache: Path | None = None, timeout=LAUNCH_TIMEOUT, program=None,
           env: dict | None = None) -> str:
    """Run `alphadpo train` (or `program`, with `env` added); its stderr (launch lines, logs) on success."""
    start = time.perf_counter()
    proc = subprocess.run(_command(out, sets, *options, program=program),
                          env={**_env(cache or out.parent / f"cache-{out.name}"), **(env or {})},
                          cwd=out.parent, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    print(f"\n{out.name}: {time.perf_counter() - start:.1f} s, losses {[m['loss'] for m in read_metrics(out)]}")
    return proc.stderr


def _two_processes(out: Path, sets, *options, **kw) -> str:
    log = _train(out, [*sets, f"launch.main_process_port={free_port()}"], "--num-processes", "2", *options, **kw)
    flat = " ".join(log.split())  # (rich wraps long lines)
    assert "accelerate.commands.launch" in flat and "--num_processes 2" in flat
    assert "DeepSpeed on the CPU (DS_ACCELERATOR=cpu)" in flat
    return flat


def _assert_same_steps(got: list[dict], want: list[dict], rel: float, keys=COMPARED, what=""):
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1)), what
    for a, b in zip(want, got):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (what, a["step"], key, a[key], b[key])


def _saved_model_report(out: Path, sets, dtype: torch.dtype) -> dict:
    """The saved model loaded with plain `from_pretrained` (and its saved tokenizer), scored on the
    held-out split: the report the trainer computed in memory after training (`eval_after`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphadpo_cli.data import load_splits
    from alphadpo_cli.logps.scoring import preference_report, score_with_reference

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    cfg = resolve_config(preset="tiny", overrides=[f"data.dataset={PREFS}", *sets])
    _, held_out = load_splits(cfg.data, tokenizer, use_cache=False)
    assert held_out is not None and len(held_out) == 8
    report = preference_report(score_with_reference(model, held_out, with_reference=False, pad_token_id=tokenizer.pad_token_id,
                                                    batch_size=8, device="cpu"))
    return {"model": model, "report": report}


# --- fixtures: the ops, the one-process baselines, the ZeRO-3 run the others compare with ---------


@pytest.fixture(scope="session")
def deepspeed_cpu_ops():
    """Compile DeepSpeed's CPU ops once per machine (a no-op when cached), before any launch, so
    that no launch times out on a first build and two ranks never compile at once."""
    code = ("import time; t = time.time()\n"
            "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder\n"
            "ShareMemCommBuilder().load(verbose=False); CPUAdamBuilder().load(verbose=False)\n"
            "print(f'DeepSpeed CPU ops ready in {time.time() - t:.0f} s')\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, "building DeepSpeed's CPU ops (needs gcc):\n" + proc.stdout[-3000:] + proc.stderr[-6000:]
    print("\n" + proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def single_full(work):
    out = work / "single-full"
    _train(out, [*FULL, "training.per_device_batch_size=4"])
    return read_metrics(out)


@pytest.fixture(scope="module")
def zero3_pre(work, deepspeed_cpu_ops):
    """ZeRO-3, full fine-tuning, reference precomputed (each rank half the pairs, gathered), a sharded
    DeepSpeed checkpoint at step 2, the gathered 16-bit save at the end."""
    out = work / "zero3-pre"
    sets = [*FULL, ZERO3, "training.per_device_batch_size=2", "training.precompute_ref=true", "training.save_steps=2"]
    log = _two_processes(out, sets)
    return SimpleNamespace(out=out, sets=sets, log=log, metrics=read_metrics(out), results=_results(out))


# --- ZeRO-3, full fine-tuning ----------------------------------------------------------------------


@slow
def test_zero3_full_precomputed_reference_trains_like_one_process(single_full, zero3_pre):
    assert "CPU processes (gloo), DeepSpeed, config accelerate_zero3.yaml, gradient accumulation 2" in zero3_pre.log
    _assert_same_steps(zero3_pre.metrics, single_full, rel=3e-4, what="zero3 precomputed vs one process")
    losses = [m["loss"] for m in zero3_pre.metrics]
    assert losses[-1] != pytest.approx(losses[0], abs=1e-3)  # it trained
    assert zero3_pre.results["reference_unchanged"] is None  # no reference network: precomputed
    ck = zero3_pre.out / "checkpoints" / "step-0000002"
    shards = sorted(p.name for p in (ck / "accelerate").rglob("zero_pp_rank_*"))
    assert len(shards) == 4 and any("rank_1" in s for s in shards), shards  # model + optimiser, per rank
    from alphadpo_cli.train.checkpoint import deepspeed_world_size

    assert deepspeed_world_size(ck) == 2


@slow
def test_zero3_final_save_loads_with_from_pretrained_and_scores_as_in_memory(zero3_pre):
    from safetensors.torch import load_file

    from alphadpo_cli.config import ModelConfig
    from alphadpo_cli.models.loading import build_tiny_model, build_tiny_tokenizer

    saved = load_file(str(zero3_pre.out / "model.safetensors"))
    fresh = build_tiny_model(ModelConfig(), vocab_size=len(build_tiny_tokenizer())).state_dict()
    wanted = {k for k in fresh if k != "lm_head.weight"}  # tied to the embedding, saved once
    assert set(saved) == wanted
    assert all(saved[k].shape == fresh[k].shape and saved[k].dtype == torch.float32 for k in wanted)
    loaded = _saved_model_report(zero3_pre.out, zero3_pre.sets, torch.float32)
    in_memory = zero3_pre.results["eval_after"]  # the two ZeRO-3 ranks' partitioned model, after training
    for key in ("logps_chosen", "logps_rejected", "reward_margin", "accuracy"):
        assert loaded["report"][key] == pytest.approx(in_memory[key], rel=1e-6, abs=1e-6), key
    # and it is the trained model, not the initial one
    assert any(not torch.equal(saved[k], fresh[k]) for k in wanted)


@slow
def test_zero3_online_reference_partitioned_by_its_own_engine(work, single_full, zero3_pre):
    out = work / "zero3-online"
    _two_processes(out, [*FULL, ZERO3, "training.per_device_batch_size=2", "training.precompute_ref=false"])
    got = read_metrics(out)
    _assert_same_steps(got, single_full, rel=3e-4, what="zero3 online reference vs one process")
    # the online reference scores every batch as the initial model the precomputed run used ...
    _assert_same_steps(got, zero3_pre.metrics, rel=1e-5, keys=("logps/ref_chosen", "logps/ref_rejected", "loss"),
                       what="online vs precomputed reference")
    res = _results(out)
    # ... its weights (each rank's ZeRO-3 partition) are bit for bit the ones it started with ...
    assert res["reference_unchanged"] is True
    # ... and after training it still does (held-out reference-relative margin, cache vs network)
    assert res["eval_after"]["ref_reward_margin"] == pytest.approx(
        zero3_pre.results["eval_after"]["ref_reward_margin"], rel=1e-5)


@slow
def test_zero3_checkpoint_kill_resume_continues_the_uninterrupted_run(work, zero3_pre):
    """Killed (SIGKILL, every process of the job) once its first checkpoint is complete, then the same
    command with --resume: the losses are those of the run that was never interrupted."""
    import psutil

    from alphadpo_cli.train.checkpoint import latest_checkpoint

    out = work / "zero3-killed"
    sets = [s for s in zero3_pre.sets if not s.startswith("training.save_steps")] + [
        "training.save_steps=1", f"launch.main_process_port={free_port()}"]
    cache = work / "cache-zero3-killed"
    log_file = work / "zero3-killed.log"
    with open(log_file, "w") as log_out:  # (a pipe nobody reads could fill up and stall the job)
        proc = subprocess.Popen(_command(out, sets, "--num-processes", "2"), env=_env(cache), cwd=work,
                                stdout=log_out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        job = [psutil.Process(proc.pid)]
        try:
            job += job[0].children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for p in job:  # freeze the whole job first, so that it cannot move on while it is being killed
            try:
                p.suspend()
            except psutil.NoSuchProcess:
                pass
        killed_at = latest_checkpoint(out)
        finished = (out / "train_results.json").exists()
        for p in job:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, log_file.read_text()[-6000:]
    assert not finished, "the job ended before the kill"
    print(f"\nkilled after {killed_at.name}; metrics rows at the kill: {len(read_metrics(out))}")

    log = " ".join(_train(out, sets, "--num-processes", "2", "--resume", cache=cache).split())
    resumed_from = int(log.split("at step ")[1].split()[0]) if "resumed from" in log else None
    assert resumed_from in (1, 2), log[-3000:]
    _assert_same_steps(read_metrics(out), zero3_pre.metrics, rel=1e-6, what="resumed vs uninterrupted")
    assert (out / "model.safetensors").is_file()


# --- ZeRO-2; ZeRO-3 with CPU offload; LoRA under ZeRO-3 ----------------------------------------------


@slow
def test_zero2(work, single_full, deepspeed_cpu_ops):
    out = work / "zero2"
    log = _two_processes(out, [*FULL, "launch.accelerate_config=accelerate_zero2.yaml",
                               "training.per_device_batch_size=2"])
    assert "config accelerate_zero2.yaml" in log
    _assert_same_steps(read_metrics(out), single_full, rel=3e-4, what="zero2 vs one process")
    assert (out / "model.safetensors").is_file()


@slow
def test_zero3_cpu_offload_bf16_gathers_a_16_bit_model(work, single_full, deepspeed_cpu_ops):
    """Optimiser state and weights offloaded (DeepSpeedCPUAdam), bf16 as in the paper: the final save
    gathers bf16 weights, which load with from_pretrained and score as the in-memory model did."""
    out = work / "zero3-offload-bf16"
    sets = [*[s for s in FULL if s != "model.dtype=fp32"], "model.dtype=bf16",
            "launch.accelerate_config=accelerate_zero3_offload.yaml", "training.per_device_batch_size=2"]
    _two_processes(out, sets)
    got = read_metrics(out)
    # bf16 weights, fp32 master weights in DeepSpeed: close to the float32 run, not equal
    _assert_same_steps(got, single_full, rel=5e-2, keys=("loss", "logps/chosen", "learning_rate"), what="bf16 offload")
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(v.dtype == torch.bfloat16 and v.numel() > 0 for v in saved.values())
    loaded = _saved_model_report(out, sets, torch.bfloat16)
    in_memory = _results(out)["eval_after"]
    for key in ("logps_chosen", "logps_rejected"):  # per-token means of 8 pairs, bf16 forward (seen: 5e-6)
        assert loaded["report"][key] == pytest.approx(in_memory[key], rel=1e-4), key


@slow
def test_lora_under_zero3(work, deepspeed_cpu_ops):
    """LoRA adapters trained under ZeRO-3, the reference being the partitioned policy with its adapters
    disabled (online): the same losses and adapters as one process."""
    single = work / "single-lora"
    _train(single, [*LORA, "training.per_device_batch_size=4"])
    out = work / "zero3-lora"
    _two_processes(out, [*LORA, ZERO3, "training.per_device_batch_size=2"])
    _assert_same_steps(read_metrics(out), read_metrics(single), rel=3e-4, what="LoRA zero3 vs one process")
    from safetensors.torch import load_file

    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(single / "adapter_model.safetensors"))
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# --- non-finite steps: skipped bit for bit, decided by the trainer, not assumed of DeepSpeed ---------

# NaN through the objective seam (tests/nonfinite_driver.py), on rank 1 only: step 2's first micro-batch
# gets NaN losses whose gradient stays finite (DeepSpeed's own inf/NaN check cannot see it: the old
# trainer let that update through while logging it as skipped), step 4's last micro-batch NaN losses
# and NaN gradients. Every step's effect is recorded by rank 0 from the gathered weights.
NONFINITE_AT = "2:value:1:0,4:grad:1:1"
NONFINITE_STEPS = 5
SKIPPED = {2, 4}
DRIVER = [sys.executable, str(ROOT / "tests" / "nonfinite_driver.py")]


def _nonfinite_sets(dtype: str) -> list[str]:
    return [*[s for s in FULL if not s.startswith(("training.max_steps", "model.dtype"))],
            f"training.max_steps={NONFINITE_STEPS}", f"model.dtype={dtype}"]


def _nonfinite_run(out: Path, sets, *options, at: str = NONFINITE_AT) -> tuple[list[dict], list[dict]]:
    """(one row per step from the driver, metrics.jsonl) of a run with NaN injected `at`."""
    env = {"NONFINITE_AT": at, "NONFINITE_LOG": str(out.parent / f"{out.name}-steps.jsonl")}
    if options:
        _two_processes(out, sets, *options, program=DRIVER, env=env)
    else:
        _train(out, sets, program=DRIVER, env=env)
    rows = [json.loads(line) for line in Path(env["NONFINITE_LOG"]).read_text().splitlines()]
    return rows, read_metrics(out)


def _assert_skipped_bit_for_bit(rows: list[dict], metrics: list[dict], deepspeed: bool = True) -> None:
    """Steps in SKIPPED left the weights (and DeepSpeed's fp32 master weights) and Adam's moments
    exactly as they were and reported themselves skipped; every other step updated them; everything
    stayed finite; the log counts the skips."""
    steps = list(range(1, NONFINITE_STEPS + 1))
    assert [r["step"] for r in rows] == [m["step"] for m in metrics] == steps
    for r in rows:
        assert r["all_finite"], r
        kept = [r["weights_unchanged"], r["master_unchanged"], r["exp_avg_unchanged"], r["exp_avg_sq_unchanged"]]
        if r["step"] in SKIPPED:
            assert all(kept) and not r["finite"], r
        else:  # the next step trains normally
            assert r["finite"] and not r["weights_unchanged"] and not r["exp_avg_unchanged"], r
            assert not (deepspeed and r["master_unchanged"]), r
    assert [m["nonfinite_skipped"] for m in metrics] == [sum(s in SKIPPED for s in steps[:i]) for i in steps]
    assert [m["loss"] is None for m in metrics] == [s in SKIPPED for s in steps]  # NaN: logged as null


@pytest.fixture(scope="module")
def nonfinite_single(work):
    """One process, per-device 4 (each micro-batch holds both ranks' pairs), the same steps skipped."""
    out = work / "nonfinite-single"
    return _nonfinite_run(out, [*_nonfinite_sets("fp32"), "training.per_device_batch_size=4"],
                          at=NONFINITE_AT.replace(":1:", ":-1:"))


@slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero3_nonfinite_steps_leave_the_weights_bit_for_bit(work, deepspeed_cpu_ops, nonfinite_single, dtype):
    out = work / f"zero3-nonfinite-{dtype}"
    rows, metrics = _nonfinite_run(out, [*_nonfinite_sets(dtype), ZERO3, "training.per_device_batch_size=2"],
                                   "--num-processes", "2")
    _assert_skipped_bit_for_bit(rows, metrics)
    assert rows[1]["engine_step_applied"]  # DeepSpeed would have applied step 2: the trainer withheld it
    assert _results(out)["skipped_nonfinite"] == len(SKIPPED)
    single_rows, single = nonfinite_single
    _assert_skipped_bit_for_bit(single_rows, single, deepspeed=False)
    if dtype == "fp32":  # and the steps after a skip are those of one process skipping the same steps
        trained = [m for m in metrics if m["step"] not in SKIPPED]
        for a, b in zip([m for m in single if m["step"] not in SKIPPED], trained):
            for key in ("loss", "logps/chosen", "margin/mean", "grad_norm", "learning_rate"):
                assert b[key] == pytest.approx(a[key], rel=3e-4, abs=1e-6), (a["step"], key, a[key], b[key])


@slow
def test_zero2_bf16_nan_gradient_skipped_without_deepspeeds_own_check(work, deepspeed_cpu_ops):
    """DeepSpeed's ZeRO-2 skips a bf16 step with an inf/NaN gradient norm by itself only while its
    `bf16.check_grad_overflow` is on (DeepSpeed 0.19.8's default). Off, the old trainer saved NaN
    weights from step 4 on; the trainer's own check must not depend on it."""
    acc_cfg = yaml.safe_load((LAUNCH_PRESETS / "accelerate_zero2.yaml").read_text())
    ds_cfg = json.loads((LAUNCH_PRESETS / "deepspeed_zero2.json").read_text())
    ds_cfg["bf16"] = {"enabled": "auto", "check_grad_overflow": False}
    (work / "zero2-nocheck.json").write_text(json.dumps(ds_cfg))
    acc_cfg["deepspeed_config"]["deepspeed_config_file"] = str(work / "zero2-nocheck.json")
    (work / "zero2-nocheck.yaml").write_text(yaml.safe_dump(acc_cfg))
    out = work / "zero2-nonfinite-nocheck"
    rows, metrics = _nonfinite_run(out, [*_nonfinite_sets("bf16"), f"launch.accelerate_config={work / 'zero2-nocheck.yaml'}",
                                         "training.per_device_batch_size=2"], "--num-processes", "2")
    _assert_skipped_bit_for_bit(rows, metrics)
    assert rows[1]["engine_step_applied"] and rows[3]["engine_step_applied"]  # DeepSpeed saw nothing wrong


# --- several machines, on loopback -----------------------------------------------------------------


@slow
def test_two_machines_on_loopback_train_like_one_two_process_job(work, zero3_pre):
    """Two launches, one process each, `--num-machines 2 --machine-rank 0|1 --main-process-ip 127.0.0.1`,
    one shared output directory, a cache per "machine". Every connection of the job, sampled while it
    runs, is between loopback addresses (torch's c10d store listens on the wildcard address, as always)."""
    import ipaddress

    import psutil

    out = work / "two-machines"
    port = free_port()
    sets = [s for s in zero3_pre.sets if not s.startswith("training.save_steps")] + [f"launch.main_process_port={port}"]
    procs, logs = [], []
    for rank in (0, 1):
        cmd = _command(out, sets, "--num-processes", "1", "--num-machines", "2", "--machine-rank", str(rank),
                       "--main-process-ip", "127.0.0.1")
        # one thread each: the two "machines" share this machine's cores (torchrun sets it only for
        # several processes per machine; two processes of 2 threads on 2 cores run 2.5x slower)
        env = dict(_env(work / f"cache-machine-{rank}"), OMP_NUM_THREADS="1")
        logs.append(work / f"machine-{rank}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, cwd=work, stdout=f, stderr=subprocess.STDOUT))
    connections = set()
    deadline = time.time() + LAUNCH_TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            for p in procs:
                try:
                    job = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for q in job:
                    try:
                        connections.update((c.status, c.laddr.ip, c.raddr.ip if c.raddr else None)
                                           for c in q.net_connections(kind="inet"))
                    except psutil.Error:
                        pass
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        text = log.read_text()
        assert p.returncode == 0, text[-6000:]
        flat = " ".join(text.split())
        assert f"2 processes on 2 machines (this is rank {rank})" in flat
        assert f"--num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port}" in flat

    def loopback(ip):
        return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback

    established = {c for c in connections if c[2] is not None}
    assert established, connections  # (the sampling saw the job talk)
    assert all(loopback(local) and loopback(remote) for _, local, remote in established), connections
    assert all(loopback(local) or local in ("0.0.0.0", "::") for _, local, _ in connections), connections
    print(f"\nconnections seen: {sorted(connections, key=str)}")
    _assert_same_steps(read_metrics(out), zero3_pre.metrics, rel=1e-6, what="two machines vs one two-process job")
    assert (out / "model.safetensors").is_file()


# --- the reference check itself ------------------------------------------------------------------------


def test_reference_digest_sees_any_change():
    from alphadpo_cli.train.reference import check_reference_unchanged, weights_digest

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = weights_digest(net)
    assert torch.equal(weights_digest(net), before)
    accelerator = SimpleNamespace(num_processes=1)
    assert check_reference_unchanged(accelerator, net, before) is True
    with torch.no_grad():
        net[1].bias[0] += 1e-7
    with pytest.raises(RuntimeError, match="reference model's weights changed"):
        check_reference_unchanged(accelerator, net, before)
    assert check_reference_unchanged(accelerator, None, None) is None


def test_a_deepspeed_checkpoint_resumes_only_on_as_many_processes(tmp_path):
    """ZeRO cannot re-partition its optimiser shards: a clear error, not DeepSpeed's traceback after
    the models have loaded (seen: `ZeRORuntimeException: ... DP world size of 2 but ... 1`)."""
    from alphadpo_cli.train.checkpoint import deepspeed_world_size, load_checkpoint
    from alphadpo_cli.config import ConfigError
    from alphadpo_cli.integrity import seal_dir

    def seal(where, step):  # the loop position and the manifest, as save_checkpoint writes them
        (where / "trainer_state.json").write_text(json.dumps({"step": step}))
        seal_dir(where)

    ck = tmp_path / "step-0000002"
    shards = ck / "accelerate" / "pytorch_model"
    shards.mkdir(parents=True)
    for r in (0, 1):
        for kind in ("model_states", "optim_states"):
            (shards / f"zero_pp_rank_{r}_mp_rank_00_{kind}.pt").write_bytes(b"x")
    seal(ck, 2)
    assert deepspeed_world_size(ck) == 2

    def acc(kind, n):
        return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=n)

    with pytest.raises(ConfigError, match="written by 2 DeepSpeed processes, resumed on 1"):
        load_checkpoint(ck, acc("DEEPSPEED", 1))
    with pytest.raises(ConfigError, match="a DeepSpeed checkpoint"):
        load_checkpoint(ck, acc("MULTI_CPU", 2))
    plain = tmp_path / "plain"
    (plain / "accelerate").mkdir(parents=True)  # accelerate's state without DeepSpeed: one weights file
    (plain / "accelerate" / "model.safetensors").write_bytes(b"x")
    seal(plain, 1)
    with pytest.raises(ConfigError, match="written without DeepSpeed"):
        load_checkpoint(plain, acc("DEEPSPEED", 2))
