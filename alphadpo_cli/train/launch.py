"""Running `alphadpo train` on several processes: it re-executes itself under `accelerate launch`.

Nothing distributed is implemented here. This module decides whether the current process should
train by itself or start the job under accelerate, writes the accelerate config with its DeepSpeed
JSON resolved to the files shipped in `alphadpo_cli.presets`, and builds the command:

    python -m accelerate.commands.launch --config_file <resolved yaml> --num_processes N
        --num_machines M --machine_rank R [--main_process_ip IP] --main_process_port P
        -m alphadpo_cli.cli train <the same arguments>

Every launched process then runs the ordinary accelerate loop of `alphadpo_cli.train.trainer`, which keeps
the global batch by setting gradient accumulation to global / (per-device x processes). DeepSpeed's
"auto" values are filled by accelerate from that loop (micro-batch from the DataLoader, accumulation
from the Accelerator, clipping from `training.max_grad_norm` through ACCELERATE_GRADIENT_CLIPPING),
so the JSON files never need editing when the number of GPUs changes.

Without GPUs, `--num-processes N` (= `--num-gpus N`) starts N CPU processes: with a DeepSpeed config,
DeepSpeed itself on the CPU (DS_ACCELERATOR=cpu, gloo: the tests' way of running ZeRO-2/3 for real);
with any other config, plain data parallelism (gloo).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from ..config import Config, ConfigError, gradient_accumulation_steps, preset_dir

# Set in every process started by a launcher (torchrun/accelerate/deepspeed/mpirun), or by us.
LAUNCHED_MARKERS = (
    "ALPHADPO_LAUNCHED",
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    # accelerate's single-process launcher sets no rank variables, only its own
    "ACCELERATE_DYNAMO_BACKEND",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_USE_FSDP",
)

DEFAULT_GPU_CONFIG = "accelerate_ddp.yaml"


def inside_launched_process(env: Mapping[str, str] | None = None) -> bool:
    """True in a process that a launcher started: it must train, not launch again."""
    env = os.environ if env is None else env
    return any(env.get(k) not in (None, "") for k in LAUNCHED_MARKERS)


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - broken driver: behave as a CPU machine
        return 0


def preset_file(name: str) -> Path:
    """A file shipped in `alphadpo_cli.presets` (accelerate/DeepSpeed configs, hostfile example)."""
    res = preset_dir().joinpath("launch", name)
    if not res.is_file():
        raise ConfigError(f"no file '{name}' among the shipped presets")
    return Path(str(res))


def find_config_file(name: str, relative_to: Path | None = None) -> Path:
    """A user path (absolute, or relative to the cwd / the referring file), else a shipped preset file."""
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([relative_to / p] if relative_to else [])
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if not p.is_absolute() and len(p.parts) == 1:
        res = preset_dir().joinpath("launch", p.name)
        if res.is_file():
            return Path(str(res)).resolve()
    raise ConfigError(f"launch config file '{name}' not found (neither a path nor a shipped preset file)")


def read_accelerate_config(name: str) -> tuple[dict, Path]:
    path = find_config_file(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"accelerate config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"accelerate config {path}: expected a mapping")
    return data, path


def uses_deepspeed(acc_cfg: dict) -> bool:
    return str(acc_cfg.get("distributed_type", "")).upper() == "DEEPSPEED"


def deepspeed_json(acc_cfg: dict, acc_path: Path) -> Path | None:
    ds = acc_cfg.get("deepspeed_config") or {}
    f = ds.get("deepspeed_config_file")
    return find_config_file(str(f), relative_to=acc_path.parent) if f else None


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class LaunchPlan:
    num_processes: int  # over all machines
    processes_per_machine: int
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    accelerate_config: str  # name or path, as configured (resolved when written)
    cpu: bool  # CPU processes (gloo): tests, or a machine without GPUs
    deepspeed: bool
    grad_accum: int

    def describe(self) -> str:
        kind = ("CPU processes (gloo)" if self.cpu else "GPUs") + (", DeepSpeed" if self.deepspeed else ", DDP")
        where = f" on {self.num_machines} machines (this is rank {self.machine_rank})" if self.num_machines > 1 else ""
        return (f"{self.num_processes} processes{where}, {kind}, config {self.accelerate_config}, "
                f"gradient accumulation {self.grad_accum}")


def plan_launch(cfg: Config, gpus: int | None = None, env: Mapping[str, str] | None = None) -> LaunchPlan | None:
    """How to launch `cfg`, or None when this process should train by itself."""
    if inside_launched_process(env):
        return None
    lc = cfg.launch
    gpus = visible_gpus() if gpus is None else gpus
    if lc.num_machines < 1:
        raise ConfigError(f"--num-machines must be at least 1, not {lc.num_machines}")
    if not 0 <= lc.machine_rank < lc.num_machines:
        raise ConfigError(f"--machine-rank must be in [0, {lc.num_machines - 1}], not {lc.machine_rank}")
    if lc.num_gpus is not None and lc.num_gpus < 1:
        raise ConfigError(f"--num-gpus must be at least 1, not {lc.num_gpus}")
    if lc.num_gpus is not None and gpus and lc.num_gpus > gpus:
        raise ConfigError(f"--num-gpus {lc.num_gpus}: only {gpus} GPUs are visible on this machine")
    per_machine = lc.num_gpus if lc.num_gpus is not None else gpus
    cpu = gpus == 0
    acc_name = lc.accelerate_config or DEFAULT_GPU_CONFIG
    if cpu and lc.num_gpus is None:
        return None  # a CPU machine trains in-process unless processes are asked for
    acc_cfg, _ = read_accelerate_config(acc_name)
    # On CPU a DeepSpeed config stays DeepSpeed (DS_ACCELERATOR=cpu, gloo); any other config becomes
    # plain CPU data parallelism (gloo), written below.
    ds = uses_deepspeed(acc_cfg)
    total = per_machine * lc.num_machines
    # One process trains in-process, unless one GPU was asked for explicitly with a DeepSpeed
    # config (e.g. ZeRO-3 with CPU offload on a single GPU).
    if total <= 1 and not (ds and lc.num_gpus == 1):
        return None
    if lc.num_machines > 1 and not lc.main_process_ip:
        raise ConfigError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
    return LaunchPlan(
        num_processes=total,
        processes_per_machine=per_machine,
        num_machines=lc.num_machines,
        machine_rank=lc.machine_rank,
        main_process_ip=lc.main_process_ip,
        main_process_port=lc.main_process_port,
        accelerate_config=acc_name,
        cpu=cpu,
        deepspeed=ds,
        grad_accum=gradient_accumulation_steps(cfg, total),  # fails early when 128 does not divide
    )


def write_accelerate_config(plan: LaunchPlan, dest_dir: Path) -> Path:
    """The accelerate YAML with file references made absolute (the DeepSpeed JSON inside the installed
    package), and the launch geometry filled in; written to `dest_dir`."""
    acc_cfg, acc_path = read_accelerate_config(plan.accelerate_config)
    out = copy.deepcopy(acc_cfg)
    if plan.cpu and not plan.deepspeed:
        # accelerate starts several CPU processes only through its multi-GPU (torchrun) launcher;
        # ACCELERATE_USE_CPU=true in their environment turns them into gloo CPU processes.
        out = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "gpu_ids": "all",
               "mixed_precision": "no", "use_cpu": False}
    elif uses_deepspeed(out):
        # DeepSpeed on CPU processes too (use_cpu must stay false: accelerate's CPU flag turns DeepSpeed
        # off; DS_ACCELERATOR=cpu in the environment makes DeepSpeed run on the CPU).
        out["use_cpu"] = False
        ds = dict(out.get("deepspeed_config") or {})
        js = deepspeed_json(out, acc_path)
        if js is None:
            raise ConfigError(f"accelerate config {acc_path}: DEEPSPEED needs deepspeed_config.deepspeed_config_file")
        ds["deepspeed_config_file"] = str(js)
        if ds.get("deepspeed_hostfile"):
            ds["deepspeed_hostfile"] = str(find_config_file(str(ds["deepspeed_hostfile"]), acc_path.parent))
        elif plan.num_machines > 1 and not ds.get("deepspeed_multinode_launcher"):
            # One `alphadpo train --machine-rank R` per machine: torchrun on each ("standard"). Left
            # unset, accelerate would default to pdsh and run `deepspeed --hostfile None` from every machine.
            ds["deepspeed_multinode_launcher"] = "standard"
        out["deepspeed_config"] = ds
        out.pop("mixed_precision", None)  # accelerate refuses it next to a DeepSpeed config file
    out.update({
        "num_processes": plan.num_processes,
        "num_machines": plan.num_machines,
        "machine_rank": plan.machine_rank,
        "main_process_port": plan.main_process_port,
    })
    if plan.main_process_ip:
        out["main_process_ip"] = plan.main_process_ip
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / "accelerate_config.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return path


def train_arguments(argv: Sequence[str]) -> list[str]:
    """`train ...` out of the argv of `alphadpo train ...` / `python -m alphadpo_cli.cli train ...`."""
    args = list(argv[1:])
    if "train" not in args:
        raise ConfigError(f"cannot relaunch: no 'train' command in the arguments {list(argv)!r}")
    return args[args.index("train"):]


def build_launch_command(plan: LaunchPlan, config_file: str | Path, argv: Sequence[str],
                         python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(config_file),
           "--num_processes", str(plan.num_processes),
           "--num_machines", str(plan.num_machines),
           "--machine_rank", str(plan.machine_rank)]
    if plan.main_process_ip:
        cmd += ["--main_process_ip", plan.main_process_ip]
    cmd += ["--main_process_port", str(plan.main_process_port)]
    cmd += ["-m", "alphadpo_cli.cli", *train_arguments(argv)]
    return cmd


def child_environment(cfg: Config, plan: LaunchPlan, env: Mapping[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    out["ALPHADPO_LAUNCHED"] = "1"
    # Accumulation comes from the trainer (global batch / (per-device x processes)); an inherited
    # value would make accelerate prefer it and silently change the global batch.
    out.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None)
    if plan.deepspeed:
        # fills "gradient_clipping": "auto" (accelerate would otherwise use 1.0 whatever the config says)
        out["ACCELERATE_GRADIENT_CLIPPING"] = repr(float(cfg.training.max_grad_norm or 0.0))
    if plan.cpu:
        if not plan.deepspeed:  # (under DeepSpeed it would switch DeepSpeed off)
            out["ACCELERATE_USE_CPU"] = "true"
        out["DS_ACCELERATOR"] = "cpu"
        if plan.num_machines == 1 or _loopback(plan.main_process_ip):
            out.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return out


def _loopback(address: str | None) -> bool:
    import ipaddress

    if not address:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# DeepSpeed configs: accelerate's own filling of "auto", then DeepSpeed's own parser


def filled_deepspeed_config(json_path: str | Path, *, per_device: int, grad_accum: int, num_processes: int,
                            max_grad_norm: float = 1.0, mixed_precision: str = "bf16",
                            hidden_size: int = 4096) -> dict:
    """The DeepSpeed config a run would hand to `deepspeed.initialize`: the shipped JSON with its
    "auto" values filled by accelerate's DeepSpeedPlugin, the way `Accelerator.prepare` fills them."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path), gradient_clipping=float(max_grad_norm))
    plugin.set_mixed_precision(mixed_precision)
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=grad_accum)
    plugin.deepspeed_config_process(must_match=False, **{
        "train_micro_batch_size_per_gpu": per_device,
        "train_batch_size": per_device * grad_accum * num_processes,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
    })
    return copy.deepcopy(plugin.deepspeed_config)


def check_deepspeed_config(config: dict) -> None:
    """Parse with DeepSpeed's own `DeepSpeedConfig` (in one process: the batch arithmetic is
    checked for world size 1, so train_batch_size is left for DeepSpeed to derive)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not visible_gpus() else "cuda")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = copy.deepcopy(config)
    cfg.pop("train_batch_size", None)
    if cfg.get("steps_per_print") == float("inf"):
        cfg["steps_per_print"] = 10**9
    DeepSpeedConfig(cfg)


def _precheck_deepspeed(cfg: Config, plan: LaunchPlan) -> None:
    acc_cfg, acc_path = read_accelerate_config(plan.accelerate_config)
    js = deepspeed_json(acc_cfg, acc_path)
    if js is None:
        return
    try:
        json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {js}: not valid JSON: {exc}") from None
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            f"{plan.accelerate_config} uses DeepSpeed, which is not installed: "
            "pip install --no-build-isolation 'alphadpo[deepspeed]'"
        ) from None
    del deepspeed  # (only whether it imports)
    from ..models.loading import resolve_dtype  # here: models imports torch, which `alphadpo --help` never loads

    import torch

    mp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_dtype(cfg.model.dtype), "no")
    try:
        check_deepspeed_config(filled_deepspeed_config(
            js, per_device=cfg.training.per_device_batch_size, grad_accum=plan.grad_accum,
            num_processes=plan.num_processes, max_grad_norm=cfg.training.max_grad_norm, mixed_precision=mp))
    except (ValueError, AssertionError) as exc:
        raise ConfigError(f"DeepSpeed config {js} does not validate: {exc}") from None


# ---------------------------------------------------------------------------------------------


def maybe_relaunch(cfg: Config, argv: Sequence[str], *, console=None, runner=None) -> bool:
    """Launch this `alphadpo train` under `accelerate launch` when several processes are wanted.

    Returns False when the current process should train by itself (already inside a launched
    process, or one process wanted); True once the launched job has finished successfully. A failed
    job exits with its status.
    """
    plan = plan_launch(cfg)
    if plan is None:
        return False
    if console is None:
        from ..console import console as stderr_console

        console = stderr_console()
    if plan.deepspeed:
        _precheck_deepspeed(cfg, plan)
    tmp = Path(tempfile.mkdtemp(prefix="alphadpo-launch-"))
    try:
        config_file = write_accelerate_config(plan, tmp)
        cmd = build_launch_command(plan, config_file, argv)
        env = child_environment(cfg, plan)
        console.print(f"launching {plan.describe()}")
        if plan.cpu:
            how = ("DeepSpeed on the CPU (DS_ACCELERATOR=cpu)" if plan.deepspeed
                   else "plain data parallelism (a non-DeepSpeed accelerate config is not used on CPU)")
            console.print(f"[yellow]no GPU visible: CPU processes with the gloo backend, {how} (for tests; slow)[/]")
        extra = {k: v for k, v in env.items() if k.startswith(("ALPHADPO_", "ACCELERATE_")) and os.environ.get(k) != v}
        console.print(shlex.join([f"{k}={v}" for k, v in sorted(extra.items())] + cmd), highlight=False, soft_wrap=True)
        rc = (runner or _run)(cmd, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rc != 0:
        raise SystemExit(rc)
    return True


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher in the foreground; Ctrl-C reaches the workers (same process group), which
    save a checkpoint and stop; SIGTERM is passed on."""
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, _frame):
        proc.send_signal(signum)

    try:
        signal.signal(signal.SIGTERM, forward)
    except ValueError:  # pragma: no cover - not the main thread
        previous = None
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the workers got the SIGINT too; wait for their checkpoint
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
