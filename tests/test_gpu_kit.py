"""benchmarks/gpu_kit.sh, offline: the kit carries every package the project imports that the GPU image
lacks, at pyproject.toml's pins, and the device command it prints is the one documented. With a kit
already downloaded (.whl/), also: one file per package, and every wheel's own needs are met there."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_kit.sh"
# Imported by the project, but neither in the image nor carried, and why the GPU check does without them.
NOT_CARRIED = {
    "vllm": "0.30 pins torch 2.13 (the image has 2.11) and is ~400 MB; gpu_check's vllm section skips",
    "flash-attn": "no wheel for torch 2.11 + CUDA 13; the packed check uses torch's own varlen attention",
    "openai": "the LLM judge of `alphadpo eval` only, not in the GPU check",
    "alpaca-eval": "`alphadpo eval alpacaeval` only, not in the GPU check",
    "gguf": "only for .gguf models; the GPU check builds random models",
}
# What the device has when the check runs on it (the image's python3 is 3.12 on x86-64 Linux).
DEVICE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _script_names(var: str) -> list[str]:
    text = SCRIPT.read_text()
    m = re.search(rf'^{var}=\((.*?)^\)', text, re.S | re.M) or re.search(rf'^{var}="(.*?)"', text, re.S | re.M)
    assert m, f"{SCRIPT.name} has no {var}"
    body = "\n".join(line.split("#", 1)[0] for line in m.group(1).splitlines())
    return body.split()


def _pins(var: str) -> dict[str, str]:
    out = {}
    for spec in _script_names(var):
        name, sep, version = spec.partition("==")
        assert sep and version, f"{SCRIPT.name}: {var} entry {spec!r} is not NAME==VERSION"
        out[canonicalize_name(name)] = version
    return out


IMAGE = {canonicalize_name(n) for n in _script_names("IMAGE_PACKAGES")}
KIT = {**_pins("KIT_WHEELS"), **_pins("KIT_SDISTS")}


def _project_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["deepspeed"])
    pins = {}
    for r in map(Requirement, reqs):
        spec = next(iter(r.specifier), None)
        pins[canonicalize_name(r.name)] = spec.version if spec is not None and spec.operator == "==" else None
    return pins


def _imported_distributions() -> set[str]:
    files = [*(ROOT / "alphadpo_cli").rglob("*.py"), ROOT / "benchmarks" / "gpu_check.py",
             ROOT / "benchmarks" / "bench_dpo.py"]
    mods = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    mods -= set(sys.stdlib_module_names) | {"alphadpo_cli"}
    dists = md.packages_distributions()  # import name -> distribution, for those installed here
    return {canonicalize_name(dists.get(m, [m.replace("_", "-")])[0]) for m in mods}


def test_kit_pins_agree_with_pyproject():
    pins = _project_pins()
    for name, version in KIT.items():
        if name in pins:
            assert version == pins[name], f"gpu_kit.sh pins {name}=={version}, pyproject.toml =={pins[name]}"
    for name in pins:
        assert name in IMAGE or name in KIT or name in NOT_CARRIED, \
            f"pyproject.toml needs {name}: neither the GPU image nor the kit (gpu_kit.sh) has it"
    assert not (set(KIT) & IMAGE), f"the kit would shadow the image's {sorted(set(KIT) & IMAGE)}"


def test_kit_covers_every_import():
    missing = sorted(d for d in _imported_distributions() if d not in IMAGE | set(KIT) | set(NOT_CARRIED))
    assert not missing, f"imported by the project, but neither in the GPU image nor in gpu_kit.sh: {missing}"


def test_device_command():
    cmd = subprocess.run(["bash", str(SCRIPT), "--command"], capture_output=True, text=True, check=True).stdout
    assert ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
            "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && ") in cmd
    assert cmd.rstrip().endswith("PYTHON=python3 bash benchmarks/gpu_check.sh $OUT/gpu-check.json")
    assert len(cmd) < 2000  # the run tool's limit
    smoke = subprocess.run(["bash", str(SCRIPT), "--command", "--cpu-smoke", "--site", "/x", "--results", "r.json"],
                           capture_output=True, text=True, check=True).stdout
    assert "--target /x " in smoke and smoke.rstrip().endswith("gpu_check.sh --cpu-smoke r.json")
    bad = subprocess.run(["bash", str(SCRIPT), "--command", "--gpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--gpu" in bad.stderr


@pytest.mark.skipif(not (ROOT / ".whl").is_dir(), reason="no kit downloaded (make gpu-kit)")
def test_downloaded_kit_is_complete():
    files = sorted((ROOT / ".whl").iterdir())
    found = {}
    for f in files:
        m = re.match(r"(.+?)-(\d[^-]*?)(?:\.tar\.gz|-.*\.whl)$", f.name)
        assert m, f"unexpected file in .whl/: {f.name}"
        found[canonicalize_name(m.group(1))] = m.group(2)
    assert found == KIT, "the kit folder holds other files or versions than gpu_kit.sh names: rerun make gpu-kit"
    for f in files:
        if f.suffix != ".whl":
            continue
        with zipfile.ZipFile(f) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1])
            if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
                continue
            name = canonicalize_name(req.name)
            assert name in IMAGE or name in KIT, f"{f.name} needs {req}: neither the image nor the kit has it"
            if name in KIT:
                assert req.specifier.contains(KIT[name], prereleases=True), f"{f.name} needs {req}, kit has {KIT[name]}"


def test_presets_found_from_a_checkout_that_is_not_installed(monkeypatch):
    """The device runs the tree from PYTHONPATH, where `alphadpo_cli.presets` (a pyproject mapping)
    does not exist: the presets come from the top-level folder then."""
    from importlib import resources

    from alphadpo_cli.config import inheritance

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(resources, "files", missing)
    found = inheritance.preset_dir()
    assert (found / "demo.yaml").is_file() and (found / "launch" / "accelerate_zero3.yaml").is_file()


def test_checkpointing_under_transformers_before_5_23():
    """The GPU image's transformers 5.17 has only `gradient_checkpointing_enable`."""
    from alphadpo_cli.models import checkpointing

    calls = []

    class Old:  # the causal LM as transformers 5.17 has it
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    old = Old()
    checkpointing.enable_checkpointing(old)
    assert len(calls) == 1 and calls[0]["use_reentrant"] is False
    assert isinstance(calls[0]["context_fn"], checkpointing.RecomputeAsForward)
