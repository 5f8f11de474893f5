"""Checkpoints and final saves, always written to a temporary directory and renamed into place.

A checkpoint directory is complete only when its manifest verifies, so one interrupted mid-write
(even by kill -9) is never picked up by --resume. A checkpoint holds the trainable weights (the
LoRA adapters, or everything in full fine-tuning), the optimiser, the scheduler, every RNG, the
margin normaliser and the loop position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .integrity import seal_dir, verify_dir
from .io import atomic_dir

CHECKPOINTS = "checkpoints"


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_row: int = 0


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(output_dir, accelerator, model, optimizer, scheduler, normalizer, state: TrainerState, keep: int = 2) -> Path:
    output_dir = Path(output_dir)
    target = output_dir / CHECKPOINTS / f"step-{state.step:07d}"
    if accelerator.distributed_type.name == "DEEPSPEED":
        # DeepSpeed shards the optimiser (and under ZeRO-3 the weights): every rank writes its shards,
        # in accelerate's layout, into one directory named alike on all ranks; rank 0 seals it (the
        # manifest makes it complete) and renames it into place.
        tmp = target.with_name(f".{target.name}.tmp-deepspeed")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_common(tmp, normalizer, state)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return target
    if accelerator.is_main_process:
        with atomic_dir(target) as tmp:
            torch.save(_trainable_state(accelerator.unwrap_model(model)), tmp / "trainable.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            _write_common(tmp, normalizer, state)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _write_common(tmp: Path, normalizer, state: TrainerState) -> None:
    torch.save(_rng_state(), tmp / "rng.pt")
    if normalizer is not None:
        torch.save(normalizer.state_dict(), tmp / "normalizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
    seal_dir(tmp)


def load_checkpoint(path, accelerator, model, optimizer, scheduler, normalizer) -> TrainerState:
    path = Path(path)
    if not verify_dir(path):
        raise ValueError(f"checkpoint {path} is incomplete or corrupt (its checksums do not match)")
    if (path / "accelerate").is_dir():
        accelerator.load_state(str(path / "accelerate"))
    else:
        trainable = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
        params = dict(accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    if normalizer is not None and (path / "normalizer.pt").is_file():
        normalizer.load_state_dict(torch.load(path / "normalizer.pt", map_location="cpu", weights_only=False))
    _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=False))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged rows past the checkpoint: they are about to be logged again."""
    if not path.is_file():
        return
    from .io import atomic_write_text

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
            merged = unwrapped.merge_and_unload() if hasattr(unwrapped, "merge_and_unload") else unwrapped
            merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp / "merged"))
    staged = output_dir / ".final-save"
    for item in staged.iterdir():
        dest = output_dir / item.name
        if dest.is_dir() and item.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    shutil.rmtree(staged, ignore_errors=True)
