"""The demo from anywhere: a wheel (not an editable install) run from a directory that is not the
repository still finds the presets (the repository's presets/, shipped as alphadpo_cli.presets) and
their demo data (pkg:alphadpo_cli/demo), offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built into a wheel from a copy of the sources and installed with --target."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "alphadpo_cli", src / "alphadpo_cli", ignore=ignore)
    shutil.copytree(ROOT / "presets", src / "presets", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # nothing is fetched
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(base / "dist")],
                   check=True, env=env, cwd=base, capture_output=True, timeout=300)
    wheel = next((base / "dist").glob("alphadpo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "alphadpo_cli/demo/train.jsonl" in names and "alphadpo_cli/demo/test.jsonl" in names
    assert "alphadpo_cli/presets/demo.yaml" in names
    assert "alphadpo_cli/presets/launch/accelerate_zero3.yaml" in names and "alphadpo_cli/presets/launch/deepspeed_zero3.json" in names
    shipped = {f"alphadpo_cli/presets/{p.relative_to(ROOT / 'presets').as_posix()}"
               for p in (ROOT / "presets").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped <= set(names), sorted(shipped - set(names))  # every preset and launch file, once
    assert not [n for n in names if n.startswith("presets/")], "the presets ship inside alphadpo_cli only"
    site = base / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, env=env,
                   capture_output=True, timeout=300)
    return site


def test_the_wheel_lists_every_package():
    """pyproject.toml lists the packages (the presets live outside alphadpo_cli/, which discovery cannot
    map): every directory of Python files under alphadpo_cli/ must be among them, or the wheel lacks it."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "alphadpo_cli").rglob("*.py")
             if "__pycache__" not in p.parts}
    listed = set(setuptools["packages"])
    assert not found - listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "alphadpo_cli.presets" in listed and setuptools["package-dir"] == {"alphadpo_cli.presets": "presets"}
    assert listed - found == {"alphadpo_cli.presets"}, f"no such directory: {sorted(listed - found)}"


def _env(site: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), ALPHADPO_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    return env


def test_demo_and_tiny_presets_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    env = _env(installed, tmp_path)
    check = (
        "import alphadpo_cli, sys\n"
        f"assert alphadpo_cli.__file__.startswith({str(installed)!r}), alphadpo_cli.__file__\n"
        "from alphadpo_cli.config import resolve_config\n"
        "from alphadpo_cli.data import load_rows\n"
        "for preset, n in (('demo', 329), ('tiny', 329)):\n"
        "    cfg = resolve_config(preset=preset)\n"
        "    raw = load_rows(cfg.data.dataset, cfg.data.train_split)\n"
        f"    assert len(raw.rows) == n and raw.source.startswith({str(installed)!r}), raw.source\n"
        "    assert len(load_rows(cfg.data.dataset, cfg.data.eval_split).rows) == 71\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    # the whole tiny run, planned by the installed console script, from that directory
    script = installed / "bin" / "alphadpo"
    r = subprocess.run([str(script), "train", "--preset", "tiny", "-o", str(tmp_path / "out"), "--dry-run"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "dry run: config and data are valid" in out and "Traceback" not in out
    assert "alphadpo_cli/demo/train.jsonl" in " ".join(out.split()).replace(" ", "")
    r = subprocess.run([str(script), "presets", "list"], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(name in r.stdout for name in ("demo", "tiny", "llama3-v0.2", "gemma2-instruct")), r.stdout
