"""Click options shared by the commands that take `evaluation.options`' parts, and the builders
that turn a command's keywords back into those parts.

A command stacks the options it takes (`options("model", "adapter", ...)`, or a group such as
`JUDGE`), receives them as keywords, and builds its options object with `model_spec(kw)`,
`decoding(kw)`, `judge(kw)` and `output(kw)`: each takes its fields out of `kw`, so what is left
is the command's own. Defaults come from the dataclasses, so the CLI and the Python API agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import click

from ..evaluation.options import DecodingOptions, JudgeOptions, ModelSpec, OutputOptions

_JUDGE = JudgeOptions()

OPTIONS: dict[str, Callable] = {
    # the model (ModelSpec)
    "model": click.option("--model", "-m", help="Base model: hub id, local dir, .gguf, pkg:..., tiny-random, or a "
                                                "training output dir."),
    "adapter": click.option("--adapter", help="A LoRA adapter directory (a training output dir works too)."),
    "preset": click.option("--preset", "-p", help="Take decoding settings (and the model, if --model is not given) "
                                                  "from a preset."),
    "backend": click.option("--backend", type=click.Choice(["auto", "vllm", "transformers"]), default=ModelSpec.backend,
                            show_default=True, help="auto: vLLM when installed and a GPU is present, else transformers."),
    "dtype": click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=ModelSpec.dtype,
                          show_default=True),
    # where the outputs go (OutputOptions)
    "name": click.option("--name", help="Name of the model in outputs (default: from the model/adapter path)."),
    "output_dir": click.option("--output-dir", "-o", help="Default: outputs/eval/<name>/<benchmark>/"),
    "overwrite": click.option("--overwrite", is_flag=True, help="Discard previously generated answers in the output dir."),
    # the benchmarks' subset
    "max_instances": click.option("--max-instances", type=int, help="Only this many prompts (a quick run)."),
    # decoding (DecodingOptions)
    "max_new_tokens": click.option("--max-new-tokens", type=int, help="Override the preset's answer length."),
    "batch_size": click.option("--batch-size", type=int, help="Generation batch size (transformers backend)."),
    "temperature": click.option("--temperature", type=float, help="Override the preset's temperature (0 = greedy)."),
    "top_p": click.option("--top-p", type=float),
    "seed": click.option("--seed", type=int, help="Sampling seed."),
    # the judge (JudgeOptions)
    "no_judge": click.option("--no-judge", "no_judge", is_flag=True, help="Only generate the answers."),
    "judge_base_url": click.option("--judge-base-url", help="An OpenAI-compatible endpoint, e.g. "
                                                            "http://127.0.0.1:8000/v1 (default: OpenAI)."),
    "judge_model": click.option("--judge-model", help="Judge model name (default: gpt-4-1106-preview, as the papers)."),
    "judge_api_key_env": click.option("--judge-api-key-env", default=_JUDGE.api_key_env, show_default=True,
                                      help="Environment variable holding the judge's API key."),
    "judge_concurrency": click.option("--judge-concurrency", type=int, default=_JUDGE.concurrency, show_default=True,
                                      help="Parallel judge requests."),
    "judge_max_retries": click.option("--judge-max-retries", type=int, default=_JUDGE.max_retries, show_default=True),
    "judge_timeout": click.option("--judge-timeout", type=float, default=_JUDGE.timeout, show_default=True,
                                  help="Seconds per request."),
    "judge_backoff": click.option("--judge-backoff", type=float, default=_JUDGE.backoff, show_default=True,
                                  help="First retry delay in seconds (doubles, with jitter); 429s follow Retry-After."),
    "rejudge_malformed": click.option("--rejudge-malformed", is_flag=True,
                                      help="Ask the judge again where it answered unusably."),
}

#: the model, the output and the generation of a benchmark's answers, in --help order
GENERATION = ("model", "adapter", "preset", "name", "output_dir", "max_instances", "max_new_tokens", "batch_size",
              "backend", "dtype", "overwrite")
SAMPLING = ("temperature", "top_p", "seed")
JUDGE = ("no_judge", "judge_base_url", "judge_model", "judge_api_key_env", "judge_concurrency", "judge_max_retries",
         "judge_timeout", "judge_backoff", "rejudge_malformed")


def options(*names: str) -> Callable:
    """A decorator adding these options (keys of `OPTIONS`), in this order in --help."""

    def decorate(fn):
        for name in reversed(names):
            fn = OPTIONS[name](fn)
        return fn

    return decorate


def _take(kw: dict[str, Any], cls, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` found in `kw` (as `prefix + field`), taken out of `kw`."""
    return {f.name: kw.pop(prefix + f.name) for f in dataclasses.fields(cls) if prefix + f.name in kw}


def model_spec(kw: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**_take(kw, ModelSpec))


def decoding(kw: dict[str, Any]) -> DecodingOptions:
    return DecodingOptions(**_take(kw, DecodingOptions))


def judge(kw: dict[str, Any]) -> JudgeOptions:
    fields = _take(kw, JudgeOptions, prefix="judge_")
    if "rejudge_malformed" in kw:
        fields["rejudge_malformed"] = kw.pop("rejudge_malformed")
    if "no_judge" in kw:
        fields["enabled"] = not kw.pop("no_judge")
    return JudgeOptions(**fields)


def output(kw: dict[str, Any]) -> OutputOptions:
    return OutputOptions(**_take(kw, OutputOptions))
