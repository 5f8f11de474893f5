"""`IterateOptions`: what `alphadpo iterate` is asked (the CLI's flags and the Python API's
keywords, one field each), its checks before anything is read, and its identity: everything that
changes the results, saved in `<output_dir>/iterate.json` (`artefacts.save_identity`) so that a
rerun with other settings is refused with the changes listed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import ConfigError
from ..evaluation.options import BACKENDS, DecodingOptions, RewardOptions
from ..rewards.build.options import NUM_SAMPLES
from ..rewards.build.pairing import STRATEGIES

#: the reference of round k: π_{k-1} (Definition 4.1, iterative DPO) or π_0 throughout
REFERENCES = ("previous", "initial")

#: fields that change where or how loudly a run writes, not what it computes
NOT_IDENTITY = ("output_dir", "overwrite", "quiet", "compare_offline")


@dataclass
class IterateOptions:
    """One online α-DPO experiment: `rounds` rounds of sample → score → pair → train → judge.

    `prompts[split]` are the training prompts, cut into `rounds` disjoint slices of
    `prompts_per_round` (default: as many as divide evenly), or the same `prompts_per_round` every
    round with `reuse_prompts`. The held-out prompts come from `heldout_split` (of
    `heldout_dataset`, else `prompts`), or `heldout_size`/`heldout_fraction` of the training
    prompts carved out; they are never trained on. `sampling` is the decoding of the answers
    (temperature, top_p, max_new_tokens, seed, batch_size = prompts per work batch), `judge_batch_size`
    the generation batch of the greedy held-out answers. `overrides` (`--set KEY=VALUE`) apply to
    every round's training config."""

    prompts: str
    reward: RewardOptions | str
    output_dir: str
    preset: str | None = None
    config_file: str | None = None
    loss: str | None = None
    model: str | None = None  # π_0; default: the config's model.name_or_path
    split: str = "train"
    prompt_field: str | None = None
    max_prompts: int | None = None
    heldout_split: str | None = None
    heldout_dataset: str | None = None
    heldout_size: int | None = None
    heldout_fraction: float | None = None
    rounds: int = 3
    prompts_per_round: int | None = None
    reuse_prompts: bool = False
    num_samples: int = NUM_SAMPLES
    strategy: str = "best-worst"
    min_gap: float = 0.0
    chosen_must_finish: bool = True  # an answer cut off by the token budget is never chosen
    sampling: DecodingOptions = field(default_factory=DecodingOptions)
    judge_batch_size: int | None = None
    backend: str = "auto"
    dtype: str = "auto"
    reference: str = "previous"
    overrides: tuple[str, ...] = ()
    overwrite: bool = False
    compare_offline: bool = False
    quiet: bool = False

    def __post_init__(self):
        if isinstance(self.reward, str):
            self.reward = RewardOptions(self.reward)
        self.overrides = tuple(self.overrides or ())

    def settings(self) -> dict:
        """The fields that change the results (the run's identity), as JSON-able values."""
        out = dataclasses.asdict(self)
        for name in NOT_IDENTITY:
            out.pop(name)
        return out


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, not {value}")


def check_options(opts: IterateOptions) -> None:
    """Every option in its range and no two that exclude each other, before anything is read."""
    if opts.rounds is None or opts.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, not {opts.rounds}")
    if opts.reference not in REFERENCES:
        raise ConfigError(f"unknown --reference '{opts.reference}' (choose {' or '.join(REFERENCES)})")
    if opts.strategy not in STRATEGIES:
        raise ConfigError(f"unknown --strategy '{opts.strategy}' ({', '.join(STRATEGIES)})")
    if opts.num_samples < 2:
        raise ConfigError(f"--num-samples must be at least 2 to make a pair, not {opts.num_samples}")
    if opts.backend not in BACKENDS:
        raise ConfigError(f"unknown --backend '{opts.backend}' ({', '.join(BACKENDS)})")
    for name in ("prompts_per_round", "max_prompts", "heldout_size", "judge_batch_size"):
        _positive(name, getattr(opts, name))
    _positive("batch_size", opts.sampling.batch_size)
    _positive("max_new_tokens", opts.sampling.max_new_tokens)
    if opts.min_gap < 0:
        raise ConfigError(f"--min-gap must be >= 0, not {opts.min_gap}")
    if opts.heldout_fraction is not None and not 0 < opts.heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction must be between 0 and 1, not {opts.heldout_fraction}")
    ways = [n for n, v in (("--heldout-split/--heldout-dataset", opts.heldout_split or opts.heldout_dataset),
                           ("--heldout-size", opts.heldout_size is not None),
                           ("--heldout-fraction", opts.heldout_fraction is not None)) if v]
    if not ways:
        raise ConfigError("give the held-out prompts the rounds are judged on: --heldout-split NAME (of "
                          "--heldout-dataset, else --prompts), --heldout-size N or --heldout-fraction F")
    if len(ways) > 1:
        raise ConfigError(f"choose one way to make the held-out prompts, not {' and '.join(ways)}")
    if not opts.preset and not opts.config_file:
        raise ConfigError("give --preset NAME or --config FILE (see `alphadpo presets list`)")
    if not opts.output_dir:
        raise ConfigError("give --output-dir")
