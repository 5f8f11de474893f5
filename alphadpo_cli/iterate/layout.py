"""Where an experiment's files go, and which model each round starts from and is judged as.

    <out>/iterate.json          the identity (what changes results; a changed setting is refused)
    <out>/progress.jsonl        one record per finished phase (an artefacts.WorkLog)
    <out>/heldout.jsonl         the held-out prompts
    <out>/initial/eval/         π_0's greedy answers to them (made once, the baseline of every round)
    <out>/round-<k>/prompts.jsonl, data/, train/, eval/
    <out>/offline/...           --compare-offline: one round from π_0 with the same budget
    <out>/rounds.json, rounds.png

The model of round k (π_k, trained in round-<k>/train) by training mode and reference choice:

| mode, reference | round k trains from (`model.name_or_path`) | its reference | π_k as a model |
|---|---|---|---|
| lora/qlora, previous | π_{k-1} merged (`round-<k-1>/train/merged`), a fresh adapter | the adapter-disabled model = π_{k-1} | `round-<k>/train/merged` |
| lora/qlora, initial | π_0 with `model.init_adapter` = round k-1's adapter | the adapter-disabled base = π_0 | `round-<k>/train` (the adapter on π_0) |
| full, previous | π_{k-1} (`round-<k-1>/train`), precomputed reference log-probs | π_{k-1} | `round-<k>/train` |
| full, initial | π_{k-1}, `model.reference` = π_0 | π_0 | `round-<k>/train` |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OFFLINE = "offline"


@dataclass(frozen=True)
class Layout:
    out: Path

    def round_dir(self, k: int | str) -> Path:
        return self.out / (OFFLINE if k == OFFLINE else f"round-{k}")

    def prompts(self, k) -> Path:
        return self.round_dir(k) / "prompts.jsonl"

    def data(self, k) -> Path:
        return self.round_dir(k) / "data"

    def train(self, k) -> Path:
        return self.round_dir(k) / "train"

    def eval(self, k) -> Path:
        """Held-out answers and scores of π_k (k = 0: the initial model's)."""
        return self.out / "initial" / "eval" if k == 0 else self.round_dir(k) / "eval"

    @property
    def heldout(self) -> Path:
        return self.out / "heldout.jsonl"

    @property
    def identity(self) -> Path:
        return self.out / "iterate.json"

    @property
    def progress(self) -> Path:
        return self.out / "progress.jsonl"

    @property
    def rounds_json(self) -> Path:
        return self.out / "rounds.json"

    @property
    def plot(self) -> Path:
        return self.out / "rounds.png"

    def ours(self) -> list[Path]:
        """Everything an experiment writes at the top of its directory (what --overwrite removes)."""
        fixed = [self.identity, self.progress, self.heldout, self.rounds_json, self.plot, self.out / "initial",
                 self.round_dir(OFFLINE)]
        return fixed + sorted(self.out.glob("round-*"))


@dataclass(frozen=True)
class Models:
    """π_k as model references, and round k's training settings, for one mode and reference choice."""

    layout: Layout
    initial: str  # π_0
    mode: str  # full, lora or qlora (resolved)
    reference: str  # previous or initial

    @property
    def peft(self) -> bool:
        return self.mode in ("lora", "qlora")

    def policy(self, k) -> str:
        """π_k as something `data build` and `eval reward` load (a model, run or adapter dir)."""
        if k == 0:
            return self.initial
        train = self.layout.train(k)
        if self.peft and self.reference == "previous" and k != OFFLINE:
            return str(train / "merged")
        return str(train)

    def train_overrides(self, k: int) -> list[str]:
        """`--set` items that make round k train π_k from π_{k-1} with the chosen reference."""
        sets = [f"training.output_dir={self.layout.train(k)}", f"data.dataset={self.layout.data(k)}",
                "data.eval_split=null", "data.eval_dataset=null"]
        if self.peft and self.reference == "previous":
            sets.append("training.merge=true")  # the next round starts from the merged weights
        if k == 1:
            return sets + [f"model.name_or_path={self.initial}"]
        before = self.layout.train(k - 1)
        if self.peft and self.reference == "previous":
            return sets + [f"model.name_or_path={before / 'merged'}"]
        if self.peft:
            return sets + [f"model.name_or_path={self.initial}", f"model.init_adapter={before}"]
        if self.reference == "previous":
            return sets + [f"model.name_or_path={before}", "training.precompute_ref=true"]
        return sets + [f"model.name_or_path={before}", f"model.reference={self.initial}"]

    def offline_overrides(self, steps: int, pairs: int) -> list[str]:
        """The offline round: from π_0, the online rounds' total optimiser steps and pairs."""
        return [f"training.output_dir={self.layout.train(OFFLINE)}", f"data.dataset={self.layout.data(OFFLINE)}",
                "data.eval_split=null", "data.eval_dataset=null", f"model.name_or_path={self.initial}",
                f"training.max_steps={steps}", f"data.max_samples={pairs}"]
