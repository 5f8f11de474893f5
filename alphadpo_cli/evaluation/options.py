"""The options that recur across `alphadpo eval …` and `alphadpo data build`, as dataclasses.

The CLI builds them from its flags; the Python API takes them. Each command then has one options
object of its own that holds these parts plus what is its alone (see `AlpacaEvalOptions` and
friends next to each benchmark, and `rewards.build.BuildOptions`). `None` in a field means "the
preset's value, else the command's default" — never a silent zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """The model to load: a hub id, directory, .gguf or pkg: reference, an optional adapter
    directory, the preset whose model/template/stop ids apply, the dtype and the generation backend."""

    model: str | None = None
    adapter: str | None = None
    preset: str | None = None
    dtype: str = "auto"
    backend: str = "auto"


@dataclass(frozen=True)
class DecodingOptions:
    """What the user asked of decoding; unset fields come from the preset, else the benchmark."""

    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None
    seed: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields as keyword arguments of `generate.decoding_for`."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JudgeOptions:
    """The LLM judge (an OpenAI-compatible chat-completions endpoint)."""

    enabled: bool = True
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else the official endpoint
    model: str | None = None  # None: the benchmark's own judge
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6
    timeout: float = 300.0
    backoff: float = 1.0
    rejudge_malformed: bool = False


@dataclass(frozen=True)
class RewardOptions:
    """A reward: `module:function`, `file.py:function`, or a reward model (hub id or directory)."""

    reward: str
    batch_size: int = 8
    max_length: int = 4096
    dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class OutputOptions:
    """Where a command writes, under which name, and whether it may replace what is there."""

    output_dir: str | None = None  # None: outputs/eval/<name>/<benchmark>
    name: str | None = None  # None: from the model (or adapter) reference
    overwrite: bool = False
    quiet: bool = False
