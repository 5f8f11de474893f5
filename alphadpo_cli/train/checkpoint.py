"""Checkpoints and final saves, always written to a temporary directory and renamed into place.

A checkpoint directory is complete only when its manifest verifies, so one interrupted mid-write
(even by kill -9) is never picked up by --resume. One layout with and without DeepSpeed:
`accelerate/` is `accelerator.save_state`'s (the trainable weights — under DeepSpeed its engine's
shards —, the optimiser, the scheduler, every process's RNG, the margin normaliser registered with
`register_for_checkpointing`), and `trainer_state.json` the loop position.

Without DeepSpeed, accelerate would write the whole model, the frozen base of a LoRA run included:
for SmolLM2-135M with LoRA r=16, 569 MiB per checkpoint instead of 56 MiB. `_trainable_weights_only`
(accelerate's save/load pre-hooks) keeps the weights file to the trainable parameters, as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import SECTIONS, Config, ConfigError, from_dict, section_fields
from ..integrity import seal_dir, verify_dir
from ..io import atomic_dir, atomic_write_text
from ..losses import make_params
from ..models.merging import merged_model

CHECKPOINTS = "checkpoints"
STATE = "accelerate"  # accelerator.save_state's directory inside a checkpoint
DEEPSPEED_TAG = "pytorch_model"  # the directory accelerate has DeepSpeed write its shards into
NORMALIZER_STATE = "custom_checkpoint_0.pkl"  # the one object registered for checkpointing


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_row: int = 0


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (half-written ones are skipped)."""
    for path in reversed(checkpoint_dirs(output_dir)):
        if verify_dir(path):
            return path
    return None


def _weights_file(state_dir, index: int) -> Path:
    from accelerate.utils import SAFE_WEIGHTS_NAME

    return Path(state_dir) / (SAFE_WEIGHTS_NAME.replace(".", f"_{index}.") if index else SAFE_WEIGHTS_NAME)


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_trainable(models, weights, _output_dir) -> None:
    """save_state's pre-hook: each model's weights file keeps only its trainable parameters (under
    DeepSpeed `weights` is empty: its engine saves its own shards)."""
    for i, state in enumerate(weights):
        names = _trainable(models[i]).keys()
        weights[i] = {k: v for k, v in state.items() if k in names}


def _load_trainable(models, input_dir) -> None:
    """load_state's pre-hook: `_save_trainable`'s files back into the models' trainable parameters
    (the very same names, or a clear error), then no model is left for accelerate to load."""
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        path = _weights_file(input_dir, i)
        saved, params = load_file(str(path)), _trainable(model)
        if saved.keys() != params.keys():
            extra, missing = sorted(saved.keys() - params.keys()), sorted(params.keys() - saved.keys())
            raise ConfigError(f"--resume: {path} holds other trainable weights than this run's model "
                              f"(only in the checkpoint: {extra[:3]}; only in the model: {missing[:3]})")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    models.clear()


@contextmanager
def _trainable_weights_only(accelerator):
    handles = (accelerator.register_save_state_pre_hook(_save_trainable),
               accelerator.register_load_state_pre_hook(_load_trainable))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def save_checkpoint(output_dir, accelerator, state: TrainerState, keep: int = 2) -> Path:
    """Every process writes its part (`accelerator.save_state`: under DeepSpeed its shards, and its
    RNG) into one temporary directory named alike on all of them; the main process adds the loop
    position, seals it (the manifest makes it complete), renames it into place and drops all but the
    newest `keep` checkpoints."""
    output_dir = Path(output_dir)
    target = output_dir / CHECKPOINTS / f"step-{state.step:07d}"
    tmp = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _trainable_weights_only(accelerator):
        accelerator.save_state(str(tmp / STATE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
        seal_dir(tmp)
        for f in (f for f in tmp.rglob("*") if f.is_file()):  # on disk before the rename makes it count
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def deepspeed_world_size(path) -> int | None:
    """How many processes wrote a DeepSpeed checkpoint (one ZeRO optimiser shard each), None for a
    checkpoint without DeepSpeed shards."""
    ranks = {int(m.group(1)) for f in (Path(path) / STATE).rglob("*zero_pp_rank_*_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
    return max(ranks) + 1 if ranks else None


def _check_layout(path: Path, accelerator) -> None:
    """A checkpoint resumes only under the kind of run that wrote it, DeepSpeed with as many processes
    (ZeRO's sharded optimiser state is not re-partitioned): say so before anything is read."""
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    sharded = (path / STATE / DEEPSPEED_TAG).is_dir()
    if sharded and not deepspeed:
        raise ConfigError(f"--resume {path}: a DeepSpeed checkpoint; resume it with the run's DeepSpeed "
                          "launch.accelerate_config")
    if deepspeed and not sharded:
        raise ConfigError(f"--resume {path}: written without DeepSpeed; resume it without a DeepSpeed "
                          "launch.accelerate_config")
    world = deepspeed_world_size(path) if sharded else None
    if world is not None and world != accelerator.num_processes:
        raise ConfigError(
            f"--resume {path}: written by {world} DeepSpeed processes, resumed on {accelerator.num_processes}. "
            f"ZeRO's sharded optimiser state cannot be re-partitioned: resume with {world} processes in all "
            "(--num-gpus/--num-processes x --num-machines), or turn the checkpoint into full weights with its "
            "accelerate/zero_to_fp32.py and start a new run from them.")


def load_checkpoint(path, accelerator, normalizer=None) -> TrainerState:
    """Restore what `save_checkpoint` wrote into the prepared objects (`accelerator.load_state`: the
    trainable weights, optimiser, scheduler, the normaliser registered for checkpointing, this
    process's RNG) and return the loop position."""
    path = Path(path)
    if not verify_dir(path):
        raise ValueError(f"checkpoint {path} is incomplete or corrupt (its checksums do not match)")
    _check_layout(path, accelerator)
    if not (path / STATE).is_dir():
        raise ConfigError(f"--resume {path}: no {STATE}/ directory (a checkpoint of an older alphadpo, whose "
                          "layout this version does not read): finish that run with the version that wrote it")
    saved = (path / STATE / NORMALIZER_STATE).is_file()
    if saved != (normalizer is not None):  # accelerate restores exactly the registered objects
        raise ConfigError(f"--resume {path}: the checkpoint {'holds' if saved else 'has no'} margin normaliser "
                          f"state and this run's loss {'has none' if saved else 'has one'}: resume with the "
                          "run's loss.name")
    with _trainable_weights_only(accelerator):
        accelerator.load_state(str(path / STATE))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged rows past the checkpoint: they are about to be logged again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if int(row.get("step", 0)) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def save_final_model(output_dir, accelerator, model, tokenizer, *, merge: bool, is_peft: bool, engine=None) -> None:
    """Adapters (LoRA) or full weights, plus the tokenizer, into the output directory.

    Written to a temporary directory first, then each file renamed into place.
    """
    output_dir = Path(output_dir)
    unwrapped = accelerator.unwrap_model(model)
    state_dict = None
    if accelerator.distributed_type.name == "DEEPSPEED":
        # Gathers ZeRO-3 shards as 16-bit weights (stage3_gather_16bit_weights_on_model_save); needs the
        # DeepSpeed engine, which wraps SequenceLogps(model): its keys carry one extra "model." prefix.
        state_dict = accelerator.get_state_dict(engine if engine is not None else model)
        if engine is not None and state_dict is not None:
            state_dict = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}
    if not accelerator.is_main_process:
        return
    with atomic_dir(output_dir / ".final-save") as tmp:
        kwargs = {"safe_serialization": True}
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        unwrapped.save_pretrained(str(tmp), **kwargs)
        tokenizer.save_pretrained(str(tmp))
        if merge and is_peft:
            merged = merged_model(unwrapped)
            merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp / "merged"))
    staged = output_dir / ".final-save"
    for item in staged.iterdir():
        dest = output_dir / item.name
        if dest.is_dir() and item.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    shutil.rmtree(staged, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# --resume, checked before anything is loaded

#: Settings whose change breaks a resumed run (another model or adapter shape, other data or
#: tokenisation, another batch geometry or data order, another loss): refused unless the user
#: allows config changes. Whole sections are named by "section.", single keys in full.
BREAKING = ("model.", "lora.", "data.", "loss.name", "training.per_device_batch_size",
            "training.global_batch_size", "training.seed")
#: ... except these, which change neither the weights' shape nor the training data.
NOT_BREAKING = ("model.gradient_checkpointing", "model.attn_implementation", "lora.dropout", "data.eval_split",
                "data.eval_dataset", "data.max_eval_samples")
#: Never compared: where the run is, and what only `presets show` uses.
#: The launcher's rendezvous port and address are where the processes meet, not part of the run.
IGNORED = ("training.output_dir", "description", "variants", "launch.main_process_port", "launch.main_process_ip")
#: What a changed value does after --resume, where it is not simply "used from now on".
RESUME_NOTES = {
    "training.learning_rate": "no effect: the checkpoint's optimiser and scheduler restore their own",
    "training.weight_decay": "no effect: the checkpoint's optimiser restores its own",
    "training.adam_beta1": "no effect: the checkpoint's optimiser restores its own",
    "training.adam_beta2": "no effect: the checkpoint's optimiser restores its own",
    "training.adam_epsilon": "no effect: the checkpoint's optimiser restores its own",
    "training.lr_scheduler": "the new schedule applies from the checkpoint's step on",
    "training.warmup_ratio": "the new schedule applies from the checkpoint's step on",
    "training.num_epochs": "the schedule is recomputed for the new length",
    "training.max_steps": "the schedule is recomputed for the new length",
}


@dataclass
class ConfigChange:
    key: str
    old: object
    new: object
    breaking: bool

    def line(self) -> str:
        note = RESUME_NOTES.get(self.key)
        flag = "  <- changes the run: refused" if self.breaking else ""
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}{f' ({note})' if note else ''}{flag}"


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    return json.dumps(value) if isinstance(value, (list, dict)) else f"{value:g}" if isinstance(value, float) else str(value)


def is_breaking(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in NOT_BREAKING):
        return False
    return any(key.startswith(k) if k.endswith(".") else key == k for k in BREAKING)


def _flat(cfg_dict: dict, resolved_params: dict | None) -> dict[str, object]:
    out = {}
    for section, body in cfg_dict.items():
        if section in IGNORED:
            continue
        if section == "loss":
            out["loss.name"] = body.get("name")
            for k, v in (resolved_params if resolved_params is not None else body.get("params") or {}).items():
                out[f"loss.params.{k}"] = v
        elif isinstance(body, dict):
            for k, v in body.items():
                if f"{section}.{k}" not in IGNORED:
                    out[f"{section}.{k}"] = v
    return out


def _resolved_params(name, params) -> dict | None:
    try:
        return make_params(name, params).to_dict()
    except (ValueError, TypeError):
        return None


def config_changes(saved: dict, current) -> list[ConfigChange]:
    """Every setting of `current` (a Config) that differs from the `saved` run config (a raw
    mapping, as config.yaml holds it). Loss parameters are compared as resolved, defaults included;
    a key the saved file lacks (written by an older version) counts as its default."""
    known = {}
    for section, body in (saved or {}).items():
        if section not in SECTIONS:
            continue
        if isinstance(body, dict) and section not in ("variants",):
            fields = section_fields(section)
            body = {k: v for k, v in body.items() if k in fields}
        known[section] = body
    try:
        old_cfg = from_dict(known, source="the checkpoint's config")
    except ValueError:
        old_cfg = Config()
    old = _flat(old_cfg.to_dict(), _resolved_params(old_cfg.loss.name, old_cfg.loss.params))
    new = _flat(current.to_dict(), _resolved_params(current.loss.name, current.loss.params))
    changes = []
    for key in list(dict.fromkeys([*old, *new])):
        a, b = old.get(key), new.get(key)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            changes.append(ConfigChange(key, a, b, is_breaking(key)))
    return changes


def resume_target(output_dir: Path, resume) -> Path:
    """The checkpoint --resume continues from: the newest complete one of the run (resume=True),
    or the one given (a checkpoint directory, or a run directory: its newest)."""
    output_dir = Path(output_dir)
    if resume is True or resume in ("latest", ""):
        where = latest_checkpoint(output_dir)
        if where is None:
            found = checkpoint_dirs(output_dir)
            detail = (f" ({len(found)} incomplete: {', '.join(p.name for p in found)})" if found else "")
            raise ConfigError(
                f"--resume: no complete checkpoint in {output_dir / CHECKPOINTS}{detail}. Drop --resume to "
                "start from scratch (with --overwrite if the directory is not empty)."
            )
        return where
    where = Path(resume).expanduser()
    if not where.is_dir():
        raise ConfigError(f"--resume {where}: no such checkpoint directory")
    if (where / CHECKPOINTS).is_dir() and not (where / "trainer_state.json").exists():
        latest = latest_checkpoint(where)
        if latest is None:
            raise ConfigError(f"--resume {where}: no complete checkpoint in {where / CHECKPOINTS}")
        return latest
    if not verify_dir(where):
        raise ConfigError(f"--resume {where}: not a complete checkpoint (its checksums do not match, or it "
                            "was never finished)")
    return where


def check_resume(cfg, output_dir, resume, *, allow_config_change: bool = False, console=None,
                 accelerator=None) -> Path:
    """Before any model is loaded: the checkpoint to resume from, whether this launch can continue it
    (with `accelerator`: DeepSpeed or not, and as many DeepSpeed processes), and the settings that
    differ from the run's saved config.yaml, listed. Changes that break the run are refused
    (ConfigError) unless `allow_config_change`; the others are printed as warnings."""
    where = resume_target(output_dir, resume)
    if accelerator is not None:
        _check_layout(where, accelerator)
    run_dir = where.parent.parent if where.parent.name == CHECKPOINTS else Path(output_dir)
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        if console is not None:
            console.print(f"[yellow]--resume: {saved_file} is missing, so the settings cannot be compared with the "
                          "checkpoint's[/]")
        return where
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--resume: {saved_file} is not valid YAML ({exc})") from None
    changes = config_changes(saved if isinstance(saved, dict) else {}, cfg)
    if not changes:
        return where
    breaking = [c for c in changes if c.breaking]
    listing = "\n  ".join(c.line() for c in changes)
    if breaking and not allow_config_change:
        raise ConfigError(
            f"--resume: {len(changes)} setting(s) differ from the checkpoint's config ({saved_file}):\n  {listing}\n"
            f"{len(breaking)} of them change the run itself (model, data, tokenisation, batch geometry or loss), "
            "which a checkpoint cannot continue. Resume with the run's settings, start a new run in another "
            "--output-dir, or pass --allow-config-change to continue anyway."
        )
    if console is not None:
        console.print(f"[yellow]--resume: {len(changes)} setting(s) differ from the checkpoint's config "
                      f"({saved_file}):\n  {listing}[/]", highlight=False, soft_wrap=True)
    return where
