"""The run card: README.md in a run's output directory, a model card in the Hugging Face layout.

Written with huggingface_hub's `ModelCard` / `ModelCardData` (YAML metadata between `---` lines,
then Markdown), so a run directory can be pushed to the hub as it is. Metadata: `base_model` and
`datasets` where they are hub ids (a local path, file or `pkg:` source is named in the body
instead), `library_name` (peft for an adapter, transformers for full weights or a merged model),
`tags`, and `license` where the base model's own card (a local directory's or the local hub
cache's README.md; never fetched) states one. Body: the command line, the preset, the resolved
config, the data and model fingerprints, package versions, hardware, wall time and throughput, the
held-out results before and after training, and the checks that were run.

`write_run_card` builds everything from the run's config, its `train_results.json` record and its
tokenizer; only the main process calls it, at the end of a run (a resumed one too), after the
final save, and writes atomically. A `merged/` directory gets its own card.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import Config, ModelConfig, load_config_file
from ..data import uses_document_bos
from ..io import atomic_write_text
from ..models.pretrained import load_tokenizer
from .card_body import body

CARD = "README.md"
#: The distributions whose versions the card lists (those installed).
PACKAGES = ("alphadpo", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
            "huggingface_hub", "bitsandbytes", "deepspeed", "flash-attn", "trl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: A conversation rendered by both tokenizers in the template check.
PROBE = [{"role": "user", "content": "What is 2 + 2?"}]


@dataclass
class Check:
    """One check of the run: what was compared, and whether it held (None: it could not be run)."""

    name: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        mark = {True: "passed", False: "FAILED", None: "not run"}[self.passed]
        return f"- **{self.name}**: {mark}. {self.detail}"


def hub_id(ref: str | None) -> str | None:
    """`ref` when it names a hub repository (owner/name, not a local path, file or pkg: source)."""
    if not ref or ref.startswith("pkg:") or Path(ref).expanduser().exists() or not _HUB_ID.match(ref):
        return None
    return ref


def command_line(argv: Sequence[str]) -> str:
    """The command as typed: `alphadpo train ...` (a launched process's argv holds the same train
    arguments), else the Python process's own argv (a run started from Python)."""
    args = list(argv)
    if "train" in args[1:] and Path(args[0]).name in ("alphadpo", "__main__.py", "cli"):
        return "alphadpo " + shlex.join(args[args.index("train", 1):])
    return f"(Python API, `train(config)`, in: {shlex.join(args)})"


def preset_of(argv: Sequence[str], cfg: Config) -> str | None:
    """The preset named on an `alphadpo train` command line (--preset/-p), else the one the config's
    origins name (a run started from Python: another program's argv, e.g. pytest's `-p plugin`, is
    not read)."""
    args = list(argv)
    if not ("train" in args[1:] and Path(args[0]).name in ("alphadpo", "__main__.py", "cli")):
        args = []
    for i, a in enumerate(args):
        if a in ("--preset", "-p") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    for origin in cfg.origins.values():
        m = re.match(r"preset ([\w.-]+)", origin)
        if m:
            return m.group(1)
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def base_license(model_ref: str) -> str | None:
    """The license in the base model's own card: a local directory's README.md, or a hub id's in the
    local hub cache (huggingface_hub.try_to_load_from_cache: never the network)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    readme = Path(model_ref).expanduser() / CARD
    if not readme.is_file() and hub_id(model_ref):
        cached = try_to_load_from_cache(model_ref, CARD)
        readme = Path(cached) if isinstance(cached, str) else readme
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - someone else's card: no license rather than no run card
        return None


# -- checks -------------------------------------------------------------------------------------


def generation_tokenizer(run_dir: Path):
    """The tokenizer `alphadpo eval` loads for this directory: an adapter's from its run's config.yaml
    (base and chat template as trained, `models.inference.load_for_inference`), full weights' or a
    merged model's from the directory itself."""
    if (run_dir / "adapter_config.json").is_file() and (run_dir / "config.yaml").is_file():
        return load_tokenizer(load_config_file(run_dir / "config.yaml").model)
    return load_tokenizer(ModelConfig(name_or_path=str(run_dir)))


def template_checks(run_dir: Path, train_tokenizer) -> list[Check]:
    """The chat template and BOS used in training equal those generation will use: the tokenizer
    generation loads for `run_dir`, compared with the training run's on the template text, a
    rendered prompt (`PROBE`, with the generation prompt), the BOS rule `data.uses_document_bos`
    (shared by training and generation) and the BOS/EOS ids."""
    try:
        gen = generation_tokenizer(run_dir)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is reported, never fatal
        return [Check("chat template and BOS, training = generation", None,
                      f"generation's tokenizer could not be loaded from {run_dir}: {exc}")]

    def render(tok) -> str:
        return tok.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False)

    same_template = train_tokenizer.chat_template == gen.chat_template
    same_prompt = render(train_tokenizer) == render(gen)
    bos = (uses_document_bos(train_tokenizer), uses_document_bos(gen))
    ids = ((train_tokenizer.bos_token_id, train_tokenizer.eos_token_id), (gen.bos_token_id, gen.eos_token_id))
    return [
        Check("chat template, training = generation", same_template and same_prompt,
              f"the template text is {'identical' if same_template else 'DIFFERENT'}, and the prompt "
              f"{PROBE[0]['content']!r} renders {'identically' if same_prompt else 'DIFFERENTLY'} with the "
              f"generation prompt, in the training tokenizer and the one `alphadpo eval` loads from {run_dir.name}/"),
        Check("BOS, training = generation", bos[0] == bos[1] and ids[0] == ids[1],
              f"document BOS (`data.uses_document_bos`): {bos[0]} in training, {bos[1]} in generation; "
              f"BOS/EOS ids {ids[0]} and {ids[1]}"),
    ]


def run_checks(results: dict) -> list[Check]:
    """The checks the run itself made, from its results record."""
    out = []
    if results.get("reference_unchanged") is not None:
        ok = bool(results["reference_unchanged"])
        out.append(Check("reference unchanged by training", ok, "the frozen reference's weights digest "
                         f"{'matches' if ok else 'does NOT match'} the one taken before training"))
    skipped = results.get("skipped_nonfinite", 0)
    out.append(Check("finite steps", skipped == 0, f"{skipped} non-finite step(s) skipped (weights left as they were)"))
    return out


# -- the card -----------------------------------------------------------------------------------


def card_data(cfg: Config, *, merged: bool):
    from huggingface_hub import ModelCardData

    peft = cfg.model.mode in ("lora", "qlora") and not merged
    tags = ["alphadpo", cfg.loss.name.replace("_", "-"), "dpo", "preference-optimization", "rlhf"]
    tags += [cfg.model.mode] if cfg.model.mode in ("lora", "qlora") else []
    dataset = hub_id(cfg.data.dataset)
    return ModelCardData(base_model=hub_id(cfg.model.name_or_path), datasets=[dataset] if dataset else None,
                         library_name="peft" if peft else "transformers", pipeline_tag="text-generation",
                         tags=list(dict.fromkeys(tags)), license=base_license(cfg.model.name_or_path))


def write_run_card(run_dir: str | Path, cfg: Config, results: dict, tokenizer, argv: Sequence[str], *,
                   merged: bool = False) -> Path:
    """README.md of `run_dir` (a run's output directory, or its `merged/` with `merged=True`), atomically."""
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    checks = template_checks(run_dir, tokenizer) + run_checks(results)
    text = body(cfg, results, checks, command=command_line(argv), preset=preset_of(argv, cfg),
                versions=versions(), merged=merged)
    card = ModelCard(f"---\n{card_data(cfg, merged=merged).to_yaml()}\n---\n\n{text}\n")
    path = run_dir / CARD
    atomic_write_text(path, str(card))
    return path
