"""The multi-GPU launcher: when it relaunches, the exact `accelerate launch` command, the resolved
accelerate config, and the shipped DeepSpeed configs parsed by DeepSpeed's own config class."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner

from alphadpo_cli.train import launch
from alphadpo_cli.config import ConfigError, resolve_config

PRESETS = Path(__file__).resolve().parent.parent / "presets" / "launch"
DS_JSONS = ["deepspeed_zero3.json", "deepspeed_zero2.json", "deepspeed_zero3_offload.json"]
ACC_YAMLS = ["accelerate_zero3.yaml", "accelerate_zero2.yaml", "accelerate_zero3_offload.yaml", "accelerate_ddp.yaml"]


def paper(*sets):
    return resolve_config(preset="llama3-v0.2", overrides=list(sets))


# --- when to relaunch ------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "0"}, {"WORLD_SIZE": "8"}, {"RANK": "3"},
                                 {"ALPHADPO_LAUNCHED": "1"}, {"ACCELERATE_DYNAMO_BACKEND": "no"}])
def test_no_relaunch_inside_a_launched_process(env):
    assert launch.inside_launched_process(env)
    assert launch.plan_launch(paper(), gpus=8, env=env) is None


def test_one_gpu_or_a_cpu_machine_trains_in_process():
    assert not launch.inside_launched_process({"ACCELERATE_LOG_LEVEL": "info", "PATH": "/bin"})
    assert launch.plan_launch(paper(), gpus=1, env={}) is None
    assert launch.plan_launch(paper(), gpus=0, env={}) is None
    assert launch.plan_launch(paper("launch.num_gpus=1", "launch.accelerate_config=accelerate_ddp.yaml"),
                              gpus=8, env={}) is None


def test_paper_preset_on_8_gpus_plans_zero3_with_accumulation_8():
    plan = launch.plan_launch(paper(), gpus=8, env={})
    assert plan is not None and plan.deepspeed and not plan.cpu
    assert (plan.num_processes, plan.num_machines, plan.grad_accum) == (8, 1, 8)  # 8 x 2 x 8 = 128
    assert plan.accelerate_config == "accelerate_zero3.yaml"
    four = launch.plan_launch(paper("launch.num_gpus=4"), gpus=8, env={})
    assert (four.num_processes, four.grad_accum) == (4, 16)  # the authors' 4 x 2 x 16


def test_one_gpu_explicitly_with_deepspeed_still_launches():
    # e.g. ZeRO-3 with CPU offload on a single GPU
    plan = launch.plan_launch(paper("launch.num_gpus=1", "launch.accelerate_config=accelerate_zero3_offload.yaml"),
                              gpus=1, env={})
    assert plan is not None and plan.num_processes == 1 and plan.grad_accum == 64


def test_bad_launch_options_fail_early():
    with pytest.raises(ConfigError, match="only 8 GPUs"):
        launch.plan_launch(paper("launch.num_gpus=16"), gpus=8, env={})
    with pytest.raises(ConfigError, match="main-process-ip"):
        launch.plan_launch(paper("launch.num_machines=2"), gpus=8, env={})
    with pytest.raises(ConfigError, match="machine-rank"):
        launch.plan_launch(paper("launch.num_machines=2", "launch.machine_rank=2", "launch.main_process_ip=10.0.0.1"),
                           gpus=8, env={})
    with pytest.raises(ConfigError, match="not divisible"):
        launch.plan_launch(paper("launch.num_gpus=3"), gpus=8, env={})
    with pytest.raises(ConfigError, match="not found"):
        launch.plan_launch(paper("launch.accelerate_config=nope.yaml"), gpus=8, env={})


# --- the command -------------------------------------------------------------------------------


def test_launch_command_single_machine(tmp_path):
    plan = launch.plan_launch(paper(), gpus=8, env={})
    argv = ["/venv/bin/alphadpo", "train", "--preset", "llama3-v0.2", "--overwrite"]
    cmd = launch.build_launch_command(plan, tmp_path / "acc.yaml", argv, python="/venv/bin/python")
    assert cmd == [
        "/venv/bin/python", "-m", "accelerate.commands.launch",
        "--config_file", str(tmp_path / "acc.yaml"),
        "--num_processes", "8", "--num_machines", "1", "--machine_rank", "0",
        "--main_process_port", "29500",
        "-m", "alphadpo_cli.cli", "train", "--preset", "llama3-v0.2", "--overwrite",
    ]


def test_launch_command_two_machines(tmp_path):
    cfg = paper("launch.num_machines=2", "launch.machine_rank=1", "launch.main_process_ip=10.0.0.1",
                "launch.main_process_port=29600")
    plan = launch.plan_launch(cfg, gpus=8, env={})
    assert (plan.num_processes, plan.grad_accum) == (16, 4)  # 16 x 2 x 4 = 128
    argv = ["/x/alphadpo_cli/cli.py", "train", "-p", "llama3-v0.2", "--num-machines", "2"]
    cmd = launch.build_launch_command(plan, "/tmp/a.yaml", argv, python="py")
    assert cmd == [
        "py", "-m", "accelerate.commands.launch", "--config_file", "/tmp/a.yaml",
        "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29600",
        "-m", "alphadpo_cli.cli", "train", "-p", "llama3-v0.2", "--num-machines", "2",
    ]


def test_train_arguments_need_the_train_command():
    assert launch.train_arguments(["alphadpo", "train", "-p", "tiny"]) == ["train", "-p", "tiny"]
    with pytest.raises(ConfigError, match="no 'train'"):
        launch.train_arguments(["pytest", "-q"])


def test_child_environment():
    plan = launch.plan_launch(paper("training.max_grad_norm=0.5"), gpus=8, env={})
    env = launch.child_environment(paper("training.max_grad_norm=0.5"), plan,
                                   {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "3", "PATH": "/bin"})
    assert env["ALPHADPO_LAUNCHED"] == "1"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # the trainer decides it
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "0.5"
    assert env["PATH"] == "/bin"


# --- the resolved accelerate config ---------------------------------------------------------


def test_resolved_zero3_config_points_into_the_package(tmp_path):
    plan = launch.plan_launch(paper(), gpus=8, env={})
    path = launch.write_accelerate_config(plan, tmp_path)
    data = yaml.safe_load(path.read_text())
    ds_file = Path(data["deepspeed_config"]["deepspeed_config_file"])
    assert ds_file.is_absolute() and ds_file.is_file() and ds_file.name == "deepspeed_zero3.json"
    assert ds_file.resolve() == launch.preset_file("deepspeed_zero3.json").resolve()
    assert data["deepspeed_config"]["zero3_init_flag"] is True
    assert "mixed_precision" not in data  # accelerate refuses it next to a DeepSpeed JSON
    assert (data["num_processes"], data["num_machines"], data["machine_rank"]) == (8, 1, 0)

    # accelerate's own loader accepts it
    from accelerate.commands.config.config_args import load_config_from_file

    cc = load_config_from_file(str(path))
    assert cc.distributed_type.name == "DEEPSPEED"
    assert cc.deepspeed_config["deepspeed_config_file"] == str(ds_file)


def test_a_user_accelerate_config_with_a_relative_json_and_hostfile(tmp_path, monkeypatch):
    (tmp_path / "my.json").write_text((PRESETS / "deepspeed_zero2.json").read_text())
    (tmp_path / "hosts").write_text("a slots=8\nb slots=8\n")
    acc = yaml.safe_load((PRESETS / "accelerate_zero2.yaml").read_text())
    acc["deepspeed_config"].update({"deepspeed_config_file": "my.json", "deepspeed_hostfile": "hosts",
                                    "deepspeed_multinode_launcher": "pdsh"})
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    monkeypatch.chdir(tmp_path)
    plan = launch.plan_launch(paper(f"launch.accelerate_config={tmp_path / 'acc.yaml'}"), gpus=8, env={})
    out = yaml.safe_load(launch.write_accelerate_config(plan, tmp_path / "out").read_text())
    assert out["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "my.json")
    assert out["deepspeed_config"]["deepspeed_hostfile"] == str(tmp_path / "hosts")


def test_cpu_processes_config(tmp_path):
    cfg = resolve_config(preset="tiny", overrides=["launch.num_gpus=2"])
    plan = launch.plan_launch(cfg, gpus=0, env={})
    assert plan.cpu and not plan.deepspeed and plan.num_processes == 2
    data = yaml.safe_load(launch.write_accelerate_config(plan, tmp_path).read_text())
    assert data["distributed_type"] == "MULTI_GPU"  # torchrun starts them; ACCELERATE_USE_CPU makes them gloo
    env = launch.child_environment(cfg, plan, {})
    assert env["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("name", ACC_YAMLS)
def test_shipped_accelerate_configs_load(name, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    data = yaml.safe_load((PRESETS / name).read_text())
    if data["distributed_type"] == "DEEPSPEED":
        assert "mixed_precision" not in data
        assert (PRESETS / data["deepspeed_config"]["deepspeed_config_file"]).is_file()
    cfg = resolve_config(preset="llama3-v0.2", overrides=[f"launch.accelerate_config={name}"])
    plan = launch.plan_launch(cfg, gpus=8, env={})
    load_config_from_file(str(launch.write_accelerate_config(plan, tmp_path)))


def test_hostfile_example_is_shipped():
    lines = [ln for ln in launch.preset_file("hostfile.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(ln.split()[1].startswith("slots=") for ln in lines)


# --- DeepSpeed's own parser --------------------------------------------------------------------


def _parse(config: dict, world: int):
    """DeepSpeedConfig as rank 0 of `world` data-parallel ranks would build it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    class MPU:  # what DeepSpeed asks an mpu for when sizing the data-parallel world
        def get_data_parallel_world_size(self):
            return world

        def get_data_parallel_rank(self):
            return 0

    with mock.patch("deepspeed.runtime.config.dist.get_rank", return_value=0):
        return DeepSpeedConfig(config, mpu=MPU())


@pytest.mark.parametrize("name", DS_JSONS)
@pytest.mark.parametrize("gpus", [4, 8, 16])
def test_deepspeed_configs_validate_with_deepspeeds_parser(name, gpus):
    cfg = paper()
    accum = 128 // (2 * gpus)
    filled = launch.filled_deepspeed_config(PRESETS / name, per_device=2, grad_accum=accum, num_processes=gpus,
                                            max_grad_norm=cfg.training.max_grad_norm, mixed_precision="bf16")
    assert "auto" not in json.dumps(filled)
    ds = _parse(filled, gpus)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (128, 2, accum)
    assert ds.gradient_clipping == 1.0
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    raw = json.loads((PRESETS / name).read_text())
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    if ds.zero_optimization_stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save  # saving gathers a 16-bit model


def test_a_wrong_batch_is_refused_by_deepspeed():
    filled = launch.filled_deepspeed_config(PRESETS / "deepspeed_zero3.json", per_device=2, grad_accum=8,
                                            num_processes=8)
    with pytest.raises(AssertionError, match="train_batch_size"):
        _parse(filled, 4)  # 128 != 2 x 8 x 4


def test_raw_json_needs_accelerate_to_fill_auto():
    from deepspeed.runtime.config import DeepSpeedConfig

    with pytest.raises(Exception):
        DeepSpeedConfig(json.loads((PRESETS / "deepspeed_zero3.json").read_text()))


def test_check_deepspeed_config_in_one_process():
    launch.check_deepspeed_config(launch.filled_deepspeed_config(
        PRESETS / "deepspeed_zero3.json", per_device=2, grad_accum=8, num_processes=8))


# --- the CLI end to end (the launch itself replaced) ---------------------------------------------


def _cli_with_gpus(monkeypatch, gpus, rc=0):
    from alphadpo_cli.cli import main

    calls = []

    def fake_run(cmd, env):
        calls.append((cmd, env))
        return rc

    for k in launch.LAUNCHED_MARKERS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(launch, "_run", fake_run)
    return main, calls


def test_cli_train_on_8_gpus_relaunches_itself(monkeypatch):
    main, calls = _cli_with_gpus(monkeypatch, 8)
    args = ["train", "--preset", "llama3-v0.2", "--dry-run"]
    monkeypatch.setattr(sys, "argv", ["alphadpo", *args])
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (cmd, env), = calls
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[cmd.index("-m", 3):] == ["-m", "alphadpo_cli.cli", *args]  # the same arguments, re-executed
    assert env["ALPHADPO_LAUNCHED"] == "1"
    config_file = cmd[cmd.index("--config_file") + 1]
    assert not Path(config_file).exists()  # temporary, removed after the job


def test_cli_relaunch_failure_exits_with_its_status(monkeypatch):
    main, calls = _cli_with_gpus(monkeypatch, 2, rc=7)
    args = ["train", "--preset", "tiny", "--num-gpus", "2"]
    monkeypatch.setattr(sys, "argv", ["alphadpo", *args])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 7
    assert len(calls) == 1


def test_cli_inside_a_launched_process_trains_itself(monkeypatch):
    launched = []
    monkeypatch.setattr(launch, "_run", lambda cmd, env: launched.append(cmd) or 0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.maybe_relaunch(paper(), ["alphadpo", "train"]) is False
    assert not launched


# --- DeepSpeed on CPU processes (the runs themselves: tests/test_deepspeed_cpu.py) -----------------


def _tiny(*sets):
    return resolve_config(preset="tiny", overrides=list(sets))


def test_a_cpu_machine_keeps_a_deepspeed_config(tmp_path):
    cfg = _tiny("launch.num_gpus=2", "launch.accelerate_config=accelerate_zero3.yaml", "training.max_grad_norm=0.5")
    plan = launch.plan_launch(cfg, gpus=0, env={})
    assert plan.cpu and plan.deepspeed and plan.num_processes == 2
    assert plan.describe() == ("2 processes, CPU processes (gloo), DeepSpeed, config accelerate_zero3.yaml, "
                               "gradient accumulation 1")  # 8 = 4 per device x 2 processes
    data = yaml.safe_load(launch.write_accelerate_config(plan, tmp_path).read_text())
    assert data["distributed_type"] == "DEEPSPEED" and data["use_cpu"] is False  # use_cpu would switch DeepSpeed off
    assert Path(data["deepspeed_config"]["deepspeed_config_file"]).is_file()
    env = launch.child_environment(cfg, plan, {"DS_ACCELERATOR": "cuda"})
    assert "ACCELERATE_USE_CPU" not in env  # accelerate ignores DeepSpeed in a "CPU" process
    assert env["DS_ACCELERATOR"] == "cpu" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["ACCELERATE_GRADIENT_CLIPPING"] == "0.5"
    # a plain (DDP) config on CPU is still CPU data parallelism
    ddp = launch.plan_launch(_tiny("launch.num_gpus=2"), gpus=0, env={})
    assert ddp.cpu and not ddp.deepspeed and "DDP" in ddp.describe()
    # and a CPU machine still trains in-process unless processes are asked for
    assert launch.plan_launch(_tiny("launch.accelerate_config=accelerate_zero3.yaml"), gpus=0, env={}) is None


def test_one_command_per_machine_runs_torchrun_on_each_machine(tmp_path):
    """Without a hostfile, several machines use accelerate's "standard" DeepSpeed launcher (torchrun on
    each machine); left unset, accelerate defaults to pdsh and runs `deepspeed --hostfile None`."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    cfg = paper("launch.num_machines=2", "launch.machine_rank=1", "launch.main_process_ip=127.0.0.1",
                "launch.main_process_port=29555")
    plan = launch.plan_launch(cfg, gpus=8, env={})
    path = launch.write_accelerate_config(plan, tmp_path)
    assert yaml.safe_load(path.read_text())["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    cmd = launch.build_launch_command(plan, path, ["alphadpo", "train", "-p", "llama3-v0.2"], python="py")
    args = launch_command_parser().parse_args(cmd[3:])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed and not args.cpu
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    ds_cmd, _env = prepare_deepspeed_cmd_env(args)
    assert ds_cmd is None  # torchrun, not the `deepspeed` multi-node runner
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert (getattr(args, "master_addr", None), getattr(args, "master_port", None)) == ("127.0.0.1", "29555") \
        or args.rdzv_endpoint == "127.0.0.1:29555", vars(args)
    env = launch.child_environment(cfg, dataclass_replace(plan, cpu=True), {})
    assert env["GLOO_SOCKET_IFNAME"] == "lo"  # loopback machines: gloo stays on lo
    remote = dataclass_replace(plan, cpu=True, main_process_ip="10.0.0.1")
    assert "GLOO_SOCKET_IFNAME" not in launch.child_environment(cfg, remote, {})


def test_a_hostfile_keeps_its_multinode_launcher(tmp_path, monkeypatch):
    (tmp_path / "hosts").write_text("a slots=8\nb slots=8\n")
    acc = yaml.safe_load((PRESETS / "accelerate_zero3.yaml").read_text())
    acc["deepspeed_config"].update({"deepspeed_hostfile": "hosts", "deepspeed_multinode_launcher": "pdsh"})
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    monkeypatch.chdir(tmp_path)
    plan = launch.plan_launch(paper(f"launch.accelerate_config={tmp_path / 'acc.yaml'}", "launch.num_machines=2",
                                    "launch.main_process_ip=node-0"), gpus=8, env={})
    out = yaml.safe_load(launch.write_accelerate_config(plan, tmp_path / "out").read_text())
    assert out["deepspeed_config"]["deepspeed_multinode_launcher"] == "pdsh"


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_cli_num_processes_on_a_cpu_machine(monkeypatch):
    main, calls = _cli_with_gpus(monkeypatch, 0)
    args = ["train", "--preset", "tiny", "--num-processes", "2", "--set", "launch.accelerate_config=accelerate_zero3.yaml"]
    monkeypatch.setattr(sys, "argv", ["alphadpo", *args])
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (cmd, env), = calls
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert env["DS_ACCELERATOR"] == "cpu" and "ACCELERATE_USE_CPU" not in env
    res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--num-processes", "2", "--num-gpus", "3"])
    assert res.exit_code == 2 and "disagree" in res.output


def test_trainer_names_gloo_for_deepspeed_on_cpu(monkeypatch):
    """Left to itself accelerate records no backend for DeepSpeed on CPU and every rank is process 0 of 1."""
    from alphadpo_cli.train import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert distributed.process_group_handlers() == []
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.process_group_handlers() == []  # not a launched process
    monkeypatch.setenv("LOCAL_RANK", "0")
    (handler,) = distributed.process_group_handlers()
    assert handler.to_kwargs()["backend"] == "gloo"


@pytest.mark.parametrize("name", DS_JSONS)
def test_hidden_size_auto_values_are_filled_for_the_wrapped_model(name):
    """accelerate fills them from `model.config`, which the SequenceLogps wrapper it is handed lacks."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from alphadpo_cli.config import ModelConfig
    from alphadpo_cli.logps.sequence import SequenceLogps
    from alphadpo_cli.models.loading import build_tiny_model
    from alphadpo_cli.train.distributed import prepare_deepspeed_config

    plugin = DeepSpeedPlugin(hf_ds_config=str(PRESETS / name))
    model = SequenceLogps(build_tiny_model(ModelConfig(tiny_hidden_size=32, tiny_layers=1, tiny_heads=2), 300))
    assert not hasattr(model, "config")
    prepare_deepspeed_config(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), model)
    zero = plugin.deepspeed_config["zero_optimization"]
    raw = json.loads((PRESETS / name).read_text())["zero_optimization"]
    assert zero["reduce_bucket_size"] == 32 * 32
    if zero["stage"] == 3:
        assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (921, 320)
    assert set(zero) == set(raw)  # nothing added to a ZeRO-2 config
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"  # the rest is accelerate's
