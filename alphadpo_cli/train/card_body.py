"""The Markdown body of the run card (`card.py` adds the metadata and writes it): one function per
section, each from the run's config and its `train_results.json` record."""

from __future__ import annotations

from typing import Sequence

from ..config import Config


def _fence(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def _number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def heading(cfg: Config, results: dict, *, merged: bool) -> str:
    what = ("merged weights (the LoRA adapter merged into its base) of the run one directory up" if merged
            else {"lora": "a LoRA adapter", "qlora": "a QLoRA adapter"}.get(cfg.model.mode, "full weights"))
    resumed = results.get("resumed_from_step") or 0
    note = f" (resumed from step {resumed}; this session ran {results.get('session_steps')} steps)" if resumed else ""
    return (f"# {cfg.model.name_or_path}, trained with `{cfg.loss.name}`\n\n"
            f"Preference optimisation with the `alphadpo` package ({cfg.loss.name}, "
            f"{cfg.model.mode}): {what}, {results.get('steps')} optimiser steps{note}. "
            f"Base model: `{cfg.model.name_or_path}`; data: `{cfg.data.dataset}`.")


def command_section(command: str, preset: str | None, cfg: Config) -> str:
    out = ["## Command", "", _fence(command, "bash"), ""]
    out.append(f"Preset: `{preset}`" + (f" ({cfg.description})" if cfg.description else "") if preset
               else "Preset: none (a config file)")
    return "\n".join(out)


def results_section(results: dict) -> str:
    before, after = results.get("eval_before"), results.get("eval_after")
    if not before and not after:
        return "## Held-out results\n\nNo held-out split (data.eval_split): nothing was evaluated."
    before, after = before or {}, after or {}
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    keys = [k for k in dict.fromkeys([*before, *after]) if numeric(before.get(k, after.get(k)))]
    rows = ["| metric | before training | after training |", "|---|---:|---:|"]
    rows += [f"| {k} | {_number(before.get(k, '-'))} | {_number(after.get(k, '-'))} |" for k in keys]
    return ("## Held-out results\n\nPreference accuracy and rewards on the held-out pairs, before and after "
            "training.\n\n" + "\n".join(rows))


def throughput_section(results: dict) -> str:
    tp = results.get("throughput") or {}
    mfu = results.get("mfu")
    mfu_text = f"{mfu:.2%}" if mfu is not None else f"not reported ({tp.get('peak_source', 'no peak')})"
    lines = [
        "## Training time and throughput", "",
        f"- wall time: {results.get('wall_seconds', 0.0):.1f} s for the whole run (loading, data, reference "
        f"precompute, evaluations, saving), {results.get('seconds', 0.0):.1f} s of it in the training loop",
        f"- {results.get('pairs', 0)} pairs, {results.get('tokens', 0)} tokens (prompt+chosen and prompt+rejected "
        "of every pair, no padding)",
        f"- pairs/s: {results.get('pairs_per_second', 0.0):.3f}; tokens/s: {results.get('tokens_per_second', 0.0):.1f}",
        f"- MFU: {mfu_text}",
    ]
    if tp:
        lines += [f"- model FLOPs per token: {tp['formula']}, N = {tp['n_params']:,} weights used in matmuls per "
                  "token (LM head included, input embedding excluded; attention-score FLOPs and activation "
                  "recompute not counted)",
                  f"- peak: {tp['peak_source']}"]
    return "\n".join(lines)


def data_section(cfg: Config, results: dict) -> str:
    data = results.get("data") or {}
    lines = ["## Data", ""]
    for name, split in data.items():
        lines.append(f"- {name}: `{split.get('source')}`, {split.get('pairs')} pairs, tokenised-split fingerprint "
                     f"`{split.get('fingerprint')}`")
    if results.get("model_fingerprint"):
        lines.append(f"- model (reference) fingerprint: `{results['model_fingerprint']}`")
    if results.get("policy_fingerprint") and results["policy_fingerprint"] != results.get("model_fingerprint"):
        lines.append(f"- the policy's starting weights: `{results['policy_fingerprint']}`")
    lines.append(f"- dataset as configured: `{cfg.data.dataset}` (train split `{cfg.data.train_split}`, "
                 f"held-out split `{cfg.data.eval_split}`)")
    return "\n".join(lines)


def hardware_section(results: dict, versions: dict[str, str]) -> str:
    hw = results.get("hardware") or {}
    gpu = f"{hw['gpus']} × {hw['gpu']}" if hw.get("gpu") else "none"
    lines = ["## Hardware and software", "",
             f"- CPU: {hw.get('cpu', 'unknown')}; GPU: {gpu}",
             f"- processes: {hw.get('processes', 1)} on {hw.get('machines', 1)} machine(s), device {hw.get('device')}, "
             f"dtype {hw.get('dtype')}", "",
             "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions.items()]
    return "\n".join(lines)


def body(cfg: Config, results: dict, checks: Sequence, *, command: str, preset: str | None,
         versions: dict[str, str], merged: bool) -> str:
    """The card's Markdown, section after section."""
    sections = [
        heading(cfg, results, merged=merged),
        command_section(command, preset, cfg),
        results_section(results),
        throughput_section(results),
        data_section(cfg, results),
        "## Checks\n\n" + "\n".join(c.line() for c in checks),
        hardware_section(results, versions),
        "## Resolved config\n\nThe config the run used (also `config.yaml`):\n\n" + _fence(cfg.to_yaml(), "yaml"),
    ]
    return "\n\n".join(sections)
