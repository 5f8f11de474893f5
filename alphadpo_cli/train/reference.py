"""The reference model during training: its precomputed log-probs, its DeepSpeed engine, and the
checks that it is never trained.

* `reference_logps`: a split's reference log-probs from the disk cache, else computed once
  (`ReferenceCache.get_or_compute` around `score_pairs`), each process scoring every world-th pair;
* `prepare_reference`: a separate online reference on the device, or under ZeRO-3 partitioned by
  an eval-only DeepSpeed engine;
* `check_reference_frozen`, `check_reference_unchanged` and `weights_digest`: no gradient and no
  optimiser slot before training, the same weights after it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from rich.console import Console

from ..config import Config
from ..data import TokenizedSplit
from ..logps.cache import ReferenceCache, cache_key
from ..logps.scoring import ScoringLayout, score_pairs
from ..losses import PreferenceLogps
from ..models.adapters import reference_mode
from ..models.loading import LoadedModels, load_reference_only
from .distributed import all_agree, gather_strided, is_zero3, rank_part


def reference_logps(accelerator, cfg: Config, models: LoadedModels, split: TokenizedSplit, what: str, *,
                    dtype: torch.dtype, console: Console) -> PreferenceLogps:
    """Precomputed reference log-probs for one split, from the disk cache when it is valid.

    With several processes each one computes every world-th pair and the parts are gathered:
    no rank waits for another to do the whole split (at the paper's scale that would outlast
    the collective timeout). Under ZeRO-3 the policy is partitioned, so an unpartitioned copy
    of the reference (`model.reference`'s model, else the initial model) serves this pass and is
    freed after it. The cache keys on the reference's identity (`models.fingerprint`: the model that
    computes these numbers, never the policy's `model.init_adapter`)."""
    is_main = accelerator.is_main_process
    key = cache_key(models.fingerprint, split, dtype)
    ref, hit = ReferenceCache().get_or_compute(
        key, len(split), lambda: compute_reference(accelerator, cfg, models, split, what, console=console),
        agree=lambda hit: all_agree(accelerator, hit), save=is_main,
        meta={"model": cfg.model.reference or cfg.model.name_or_path, "split": split.source, "rows": len(split)})
    if hit and is_main:
        console.print(f"reference log-probs for {what}: cache hit ({key})")
    return ref


def compute_reference(accelerator, cfg: Config, models: LoadedModels, split: TokenizedSplit, what: str, *,
                      console: Console) -> PreferenceLogps:
    """Score this process's part of `split` under the reference (a separate model, the policy with its
    adapters disabled, or a freshly loaded unpartitioned copy of the reference, `load_reference_only`:
    full fine-tuning with no reference loaded, and any mode under ZeRO-3), then gather the parts."""
    device = accelerator.device
    part = rank_part(accelerator, split)
    zero3 = is_zero3(accelerator)
    if models.reference is not None and not zero3:
        network_ctx = reference_mode(models.policy, models.reference)
    elif models.reference_is_adapter_disabled and not zero3:
        network_ctx = reference_mode(models.policy)
    else:
        network_ctx = None
    t = cfg.training

    layout = ScoringLayout.of_training(t, t.ref_batch_size)  # packing: one padding-free row per token budget

    def precompute(net):
        return score_pairs(net, part, pad_token_id=models.tokenizer.pad_token_id, device=device, **layout.kwargs())

    status = console.status(f"computing reference log-probs for {what} ({len(split)} pairs)") \
        if accelerator.is_main_process else nullcontext()
    with status:
        if network_ctx is None:
            no_zero_init = accelerator.state.deepspeed_plugin.zero3_init_context_manager(enable=False) \
                if zero3 else nullcontext()
            with no_zero_init:
                net = load_reference_only(cfg.model).to(device)
            ref = precompute(net)
            del net
        else:
            models.policy.to(device)
            with network_ctx as net:
                ref = precompute(net)
    return gather_strided(accelerator, ref, len(split))


def prepare_reference(accelerator, reference_scorer):
    """A separate (full fine-tuning, online) reference: under ZeRO-3 it is partitioned like the
    policy, by an eval-only DeepSpeed engine with no optimiser; otherwise it sits on the device."""
    if not is_zero3(accelerator):
        return reference_scorer.to(accelerator.device)
    import copy

    import deepspeed
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    ds = copy.deepcopy(accelerator.deepspeed_config)  # "auto" values already filled by prepare
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=reference_scorer, config=ds)
    engine.eval()
    # with no optimiser, ZeRO-3 only partitions (DeepSpeedZeRoOffload): nothing can update the weights
    if engine.optimizer is not None and not isinstance(engine.optimizer, DeepSpeedZeRoOffload):
        raise RuntimeError(f"the reference DeepSpeed engine has an optimiser ({type(engine.optimizer).__name__})")
    return engine


def check_reference_frozen(models: LoadedModels, optimizer) -> None:
    """The reference is never trained: no gradient on its weights, none of them in the optimiser."""
    if models.reference is None:
        return
    ref_ids = {id(p) for p in models.reference.parameters()}
    if any(p.requires_grad for p in models.reference.parameters()):
        raise RuntimeError("the reference model has trainable parameters")
    if any(id(p) in ref_ids for g in optimizer.param_groups for p in g["params"]):
        raise RuntimeError("reference parameters were handed to the optimiser")


def check_reference_unchanged(accelerator, reference: torch.nn.Module | None, before: torch.Tensor | None) -> bool | None:
    """After training, a separate reference's weights are still the ones it started with (each rank
    checks its own part: under ZeRO-3 its partition); None without a separate reference."""
    if before is None:
        return None
    if not all_agree(accelerator, torch.equal(weights_digest(reference), before)):
        raise RuntimeError("the reference model's weights changed during training")
    return True


def weights_digest(model: torch.nn.Module | None) -> torch.Tensor | None:
    """Per parameter, the float64 sum and sum of squares of this process's copy of the weights (under
    ZeRO-3 its partition, `ds_tensor`), in chunks so that no float64 copy of a whole matrix is made."""
    if model is None:
        return None
    rows = []
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = (p if t is None else t).detach().reshape(-1)
        s = q = torch.zeros((), dtype=torch.float64, device=t.device)
        for c in t.split(1 << 22):
            c = c.double()
            s, q = s + c.sum(), q + c.square().sum()
        rows.append(torch.stack([s, q]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
