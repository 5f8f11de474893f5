"""The build's options (one flat dataclass: the CLI's flags, one field each), their checks, and
the decoding and reward they resolve to.

`BuildOptions` stays flat so that a build reads as its command line (`BuildOptions(dataset=...,
model=..., reward=..., temperature=0.5)`); the parts it shares with `alphadpo eval` are views of
it (`model_spec`, `decoding_options`, `reward_options`), which the build resolves from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import ConfigError
from ...evaluation.options import DecodingOptions, ModelSpec, RewardOptions
from .. import Reward, load_reward
from ..identity import reward_identity
from .pairing import STRATEGIES

# SimPO's on-policy recipe (on_policy_data_gen/decode.py): 5 samples at T 0.8, top-p 0.95
NUM_SAMPLES, TEMPERATURE, TOP_P = 5, 0.8, 0.95
DEFAULT_BATCH = {"transformers": 8, "vllm": 512}  # prompts per batch (the unit of resuming)
WORK_FORMAT = 1


@dataclass
class BuildOptions:
    dataset: str  # the prompts: hub id, file or directory
    output_dir: str
    model: str | None = None  # default: the preset's
    reward: str | None = None  # module:function, file.py:function, or a reward model
    adapter: str | None = None
    preset: str | None = None  # max_new_tokens, stop ids, chat template and model from a preset
    split: str = "train"
    test_split: str | None = None  # a held-out prompt split (of test_dataset, else dataset)
    test_dataset: str | None = None
    test_fraction: float | None = None  # or carve the test prompts out of the train prompts
    test_size: int | None = None
    prompt_field: str | None = None
    max_prompts: int | None = None  # the first N prompts of each prompt split
    num_samples: int = NUM_SAMPLES
    temperature: float | None = None  # None: TEMPERATURE
    top_p: float | None = None  # None: TOP_P
    max_new_tokens: int | None = None  # None: the preset's (1024 without one)
    seed: int = 42
    batch_size: int | None = None  # prompts per batch; None: DEFAULT_BATCH[backend]
    backend: str = "auto"
    dtype: str = "auto"
    chat_template: str | None = None
    strategy: str = "best-worst"
    min_gap: float = 0.0
    chosen_must_finish: bool = True
    keep_all: bool = False  # also write every answer and score (all_generated_responses, all_rm_scores)
    score_decimals: int | None = None
    reward_batch_size: int = 8
    reward_dtype: str = "auto"
    reward_max_length: int = 4096
    trust_remote_code: bool = False
    gpu_memory_utilization: float | None = None  # vLLM
    shard: tuple[int, int] | None = None  # (rank, world); None: from the environment
    work_dir: str | None = None  # default <output_dir>/.work
    max_batches: int | None = None  # stop after this many new batches per phase (a partial run)
    generate_only: bool = False
    merge_only: bool = False
    overwrite: bool = False
    rescore: bool = False

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.adapter, self.preset, self.dtype, self.backend)

    @property
    def decoding_options(self) -> DecodingOptions:
        """The SimPO recipe's sampling unless set. `batch_size` (prompts per work batch) is not
        the generator's: each work batch is sampled as one call."""
        return DecodingOptions(temperature=TEMPERATURE if self.temperature is None else self.temperature,
                               top_p=TOP_P if self.top_p is None else self.top_p,
                               max_new_tokens=self.max_new_tokens, seed=self.seed)

    @property
    def reward_options(self) -> RewardOptions:
        return RewardOptions(self.reward, self.reward_batch_size, self.reward_max_length, self.reward_dtype,
                             self.trust_remote_code)

    @property
    def work_path(self) -> Path:
        out = Path(self.output_dir).expanduser()
        return Path(self.work_dir).expanduser() if self.work_dir else out / ".work"


@dataclass
class BuildSummary:
    output_dir: Path
    work_dir: Path
    complete: bool  # the dataset was written
    rank: int
    world: int
    batches: int
    missing: int  # batches without answers or scores (other shards', or not yet run)
    generated: int  # batches sampled by this call
    scored: int
    record: dict | None = None  # build.json, when complete


def check_options(opts: BuildOptions) -> None:
    """Every option in its range, and no two that exclude each other (before anything is read)."""
    if opts.strategy not in STRATEGIES:
        raise ConfigError(f"unknown --strategy '{opts.strategy}' ({', '.join(STRATEGIES)})")
    if opts.num_samples < 2:
        raise ConfigError(f"--num-samples must be at least 2 to make a pair, not {opts.num_samples}")
    for name in ("max_prompts", "batch_size", "test_size", "reward_batch_size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
    if opts.max_batches is not None and opts.max_batches < 0:
        raise ConfigError(f"--max-batches must be >= 0, not {opts.max_batches}")
    if opts.test_fraction is not None and not 0 < opts.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1, not {opts.test_fraction}")
    held_out = [n for n, v in (("--test-split/--test-dataset", opts.test_split or opts.test_dataset),
                               ("--test-fraction", opts.test_fraction is not None),
                               ("--test-size", opts.test_size is not None)) if v]
    if len(held_out) > 1:
        raise ConfigError(f"choose one way to make the test prompts, not {' and '.join(held_out)}")
    if opts.min_gap < 0:
        raise ConfigError(f"--min-gap must be >= 0, not {opts.min_gap}")
    if opts.generate_only and opts.merge_only:
        raise ConfigError("--generate-only and --merge exclude each other")


def resolve_decoding(opts: BuildOptions):
    """(decoding, model, chat template): the SimPO recipe's sampling, the preset's length."""
    from ...evaluation.generate import decoding_for

    spec = opts.model_spec
    decoding, preset_model, template = decoding_for(spec.preset, **opts.decoding_options.overrides())
    model = spec.model or preset_model
    if not model and not spec.adapter:
        raise ConfigError("give --model (or --adapter, or a --preset that names a model)")
    return decoding, model, opts.chat_template or template


def reward_identity_of(opts: BuildOptions, reward: Reward | None) -> dict:
    """What the scores depend on: the reward (a given one by its name) and how it is run."""
    r = opts.reward_options
    spec = r.reward or getattr(reward, "name", None) or "reward"
    return reward_identity(spec, dtype=r.dtype, max_length=r.max_length, trust_remote_code=r.trust_remote_code)


def load_reward_of(opts: BuildOptions) -> Reward:
    r = opts.reward_options
    return load_reward(r.reward, dtype=r.dtype, batch_size=r.batch_size, max_length=r.max_length,
                       trust_remote_code=r.trust_remote_code)
