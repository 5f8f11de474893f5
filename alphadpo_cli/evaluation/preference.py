"""`alphadpo eval preference`: an offline report on held-out preference pairs, no judge needed.

* reward accuracy with the implicit SimPO/α-DPO reward (length-normalised log-likelihood) and with
  the reference-relative DPO reward (log πθ(y|x) − log πref(y|x)), ties counting one half;
* the mean margins of both rewards;
* a sampled estimate of KL(πθ ‖ πref) on the held-out prompts: responses are *sampled from the
  policy* (temperature 1, no top-p/top-k, so the estimator is unbiased up to truncation at
  `kl_max_new_tokens`) and the mean of log πθ − log πref over them is reported per sequence and
  per token (`kl_samples=0` turns it off; the on-data per-token log-ratio is reported anyway and
  named as such);
* average response lengths (the data's chosen/rejected, and the sampled ones).

The reference is the policy with its LoRA adapters disabled, or `ref_model`, or, for a full
fine-tuning output directory, the base model its config.yaml names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..config import ConfigError
from ..io import atomic_write_json
from .common import default_output_dir, model_label


def _reference_for(model: str | None, ref_model: str | None, policy, dtype, chat_template, device):
    """(reference network or None, description)."""
    from ..models.loading import load_for_inference

    if ref_model:
        ref, _ = load_for_inference(ref_model, dtype=dtype, chat_template=chat_template, device=device)
        return ref, f"separate model {ref_model}"
    if hasattr(policy, "disable_adapter"):
        return None, "the policy with its adapters disabled"
    if model and (Path(model) / "config.yaml").is_file():
        from ..config import load_config_file

        base = load_config_file(Path(model) / "config.yaml").model.name_or_path
        if base and base != model:
            ref, _ = load_for_inference(base, dtype=dtype, chat_template=chat_template, device=device)
            return ref, f"the base model of the run, {base}"
    return False, "none (a full model without --ref-model): reference-relative metrics are skipped"


def sampled_kl(policy, reference, tokenizer, prompts: list[list[dict]], *, samples: int, max_new_tokens: int,
               batch_size: int = 4, seed: int = 42, max_prompt_tokens: int | None = None,
               stop_ids: Sequence[int] = ()) -> dict:
    """Monte-Carlo KL(πθ‖πref): sample y ~ πθ(·|x), average log πθ(y|x) − log πref(y|x).

    A sample ends at the first stop id, which is part of it: the ids generation stops at
    (`generate.stop_token_ids`: EOS, the chat template's end of turn such as Gemma's
    <end_of_turn> or Llama-3's <|eot_id|>, and `stop_ids`, e.g. a preset's). A sample without
    one is cut at `max_new_tokens` (counted in `truncated_fraction`)."""
    import torch
    from transformers import GenerationConfig

    from ..data import uses_document_bos
    from ..logps.sequence import SequenceLogps
    from ..models.adapters import reference_mode
    from .generate import render_prompt, stop_token_ids

    if samples <= 0 or not prompts:
        return {}
    bos = uses_document_bos(tokenizer)
    stops = stop_token_ids(tokenizer, stop_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    chosen = [prompts[i % len(prompts)] for i in range(samples)]
    ids_list = [render_prompt(tokenizer, m, bos=bos, max_prompt_tokens=max_prompt_tokens) for m in chosen]
    device = next(policy.parameters()).device
    gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                          eos_token_id=stops, pad_token_id=pad)
    kl_seq, lengths, truncated = [], [], 0
    # reference_mode yields `reference` when there is one, else the policy with its adapters off
    pol_scorer = SequenceLogps(policy)
    ref_scorer = pol_scorer if reference is None else SequenceLogps(reference)
    was_training = policy.training
    policy.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, samples, batch_size):
            args, n_tokens, cut = _sample(policy, ids_list[start:start + batch_size], gc, pad, stops, device)
            lengths.extend(n_tokens)
            truncated += cut
            pol, _ = pol_scorer(*args)
            with reference_mode(policy, reference):
                ref, _ = ref_scorer(*args)
            kl_seq.extend((pol.double() - ref.double()).cpu().tolist())
    policy.train(was_training)
    return _kl_summary(kl_seq, lengths, truncated, max_new_tokens)


def _sample(policy, batch: list[list[int]], gc, pad: int, stops: list[int], device):
    """Sample one response per prompt (left-padded): the scorers' arguments (ids, attention, response
    mask, positions), each response's length, and how many reached no stop id."""
    import torch

    from .greedy import left_padded

    inp, att = left_padded(batch, pad)
    width = inp.shape[1]
    out = policy.generate(input_ids=inp.to(device), attention_mask=att.to(device), generation_config=gc).cpu()
    gen = out[:, width:]
    resp = torch.zeros_like(gen, dtype=torch.bool)
    lengths, truncated = [], 0
    for i in range(gen.shape[0]):
        row = gen[i].tolist()
        stop = next((t for t, tok in enumerate(row) if tok in stops), None)
        n = len(row) if stop is None else stop + 1  # the sampled stop id is part of the response
        truncated += stop is None
        resp[i, :n] = True
        lengths.append(n)
    full_att = torch.cat([att, resp.long()], dim=1)
    full_resp = torch.cat([torch.zeros_like(att, dtype=torch.bool), resp], dim=1)
    ids = out.clone()
    ids[~full_att.bool()] = pad
    pos = (full_att.cumsum(-1) - 1).clamp(min=0)
    return (ids.to(device), full_att.to(device), full_resp.to(device), pos.to(device)), lengths, truncated


def _kl_summary(kl_seq: list[float], lengths: list[int], truncated: int, max_new_tokens: int) -> dict:
    n = len(kl_seq)
    m = sum(kl_seq) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in kl_seq) / (n - 1)) if n > 1 else float("nan")
    return {
        "samples": n,
        "max_new_tokens": max_new_tokens,
        "kl_per_sequence": m,
        "kl_per_sequence_se": sd / math.sqrt(n) if n > 1 else None,
        "kl_per_token": sum(kl_seq) / sum(lengths),
        "mean_sampled_response_tokens": sum(lengths) / n,
        "truncated_fraction": truncated / n,
    }


def run_preference(*, data: str, model: str | None = None, adapter: str | None = None, ref_model: str | None = None,
                   split: str = "test", preset: str | None = None, max_samples: int | None = None, batch_size: int = 8,
                   max_length: int | None = None, max_prompt_length: int | None = None, truncation: str | None = None,
                   kl_samples: int = 8, kl_max_new_tokens: int = 128, seed: int = 42, dtype: str = "auto",
                   output: str | None = None, device=None, console=None, quiet: bool = False) -> dict:
    from ..config import DataConfig, resolve_config
    from ..data import TokenizeSettings, load_rows, tokenize_split, validate_rows
    from ..models.loading import load_for_inference
    from ..logps.scoring import preference_report, score_with_reference

    dcfg, chat_template, stop_ids = DataConfig(), None, []
    if preset:
        cfg = resolve_config(preset=preset)
        dcfg, chat_template = cfg.data, cfg.model.chat_template
        stop_ids = [int(i) for i in (cfg.generation.stop_token_ids or [])]
        model = model or (cfg.model.name_or_path if not adapter else None)
    if not model and not adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model)")
    if kl_samples < 0 or kl_max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--kl-samples >= 0, --kl-max-new-tokens >= 1 and --batch-size >= 1 are required")
    settings = TokenizeSettings(max_length or dcfg.max_length, max_prompt_length or dcfg.max_prompt_length,
                                truncation or dcfg.truncation, dcfg.pipeline)
    if settings.truncation not in ("keep_end", "drop", "error"):
        raise ConfigError(f"--truncation must be keep_end, drop or error, not {settings.truncation!r}")
    policy, tok = load_for_inference(model or adapter, adapter if model else None, dtype=dtype,
                                     chat_template=chat_template, device=device)
    reference, ref_desc = _reference_for(model, ref_model, policy, dtype, chat_template, device)
    has_ref = reference is not False
    reference = reference if reference is not False else None
    if reference is not None and len(getattr(reference, "get_input_embeddings")().weight) < len(tok):
        raise ConfigError("the reference model's vocabulary is smaller than the policy tokenizer's; pass a matching --ref-model")

    tsplit = tokenize_split(data, split, tok, settings, max_samples)
    scores = score_with_reference(policy, tsplit, reference=reference, with_reference=has_ref,
                                  pad_token_id=tok.pad_token_id, batch_size=batch_size)
    report = preference_report(scores)
    if "logratio_per_token" in report:
        report["logratio_per_token_on_data"] = report.pop("logratio_per_token")
    kl = {}
    if has_ref and kl_samples > 0:
        raw = load_rows(data, split)
        pairs = validate_rows(raw)
        kept = [pairs[i] for i in tsplit.dataset["row"]]
        kl = sampled_kl(policy, reference, tok, [p.prompt for p in kept], samples=kl_samples,
                        max_new_tokens=kl_max_new_tokens, batch_size=min(batch_size, 8), seed=seed,
                        max_prompt_tokens=settings.max_prompt_length, stop_ids=stop_ids)
    result = _result(report, kl, settings, tsplit, model=model, adapter=adapter, reference=ref_desc, data=data,
                     split=split)
    out = Path(output) if output else default_output_dir(model_label(model, adapter), "preference") / "report.json"
    atomic_write_json(out, result)
    result["output"] = str(out)
    return result


def _result(report: dict, kl: dict, settings, tsplit, **head) -> dict:
    """The report's JSON: `head` (model, adapter, reference, data, split), the rewards and margins,
    the sampled KL and the tokenisation."""
    return {
        **head,
        "pairs": report["pairs"],
        "reward_accuracy_simpo": report["accuracy"],
        "reward_accuracy_ref": report.get("accuracy_ref"),
        "margin_simpo": report["reward_margin"],
        "margin_ref": report.get("ref_reward_margin"),
        "logps_chosen": report["logps_chosen"],
        "logps_rejected": report["logps_rejected"],
        "length_chosen_tokens": report["length_chosen"],
        "length_rejected_tokens": report["length_rejected"],
        "logratio_per_token_on_data": report.get("logratio_per_token_on_data"),
        "kl": kl or None,
        "tokenization": {"max_length": settings.max_length, "max_prompt_length": settings.max_prompt_length,
                         "truncation": settings.truncation, "summary": tsplit.stats.summary()},
    }


def print_result(result: dict, console) -> None:
    from rich.table import Table

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    t = Table(title=f"held-out preferences: {result['data']} [{result['split']}], {result['pairs']} pairs")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("reward accuracy (implicit SimPO: avg log-prob)", f(result["reward_accuracy_simpo"], ".3f"))
    t.add_row("reward accuracy (reference-relative: log πθ/πref)", f(result["reward_accuracy_ref"], ".3f"))
    t.add_row("mean margin (avg log-prob, chosen − rejected)", f(result["margin_simpo"]))
    t.add_row("mean margin (log-ratio, chosen − rejected)", f(result["margin_ref"]))
    kl = result.get("kl") or {}
    if kl:
        t.add_row(f"KL(πθ‖πref) per token, sampled ({kl['samples']} samples)", f(kl["kl_per_token"]))
        se = kl.get("kl_per_sequence_se")
        t.add_row("KL(πθ‖πref) per sequence, sampled", f(kl["kl_per_sequence"]) + (f" ± {se:.4f}" if se else ""))
        t.add_row("sampled response length (tokens)", f(kl["mean_sampled_response_tokens"], ".1f"))
    t.add_row("log-ratio per token on the data's responses", f(result.get("logratio_per_token_on_data")))
    t.add_row("response length chosen / rejected (tokens)",
              f"{result['length_chosen_tokens']:.1f} / {result['length_rejected_tokens']:.1f}")
    t.add_row("reference", str(result["reference"]))
    console.print(t)
    console.print(f"report: {result['output']}", highlight=False)
