"""The wheel as a user gets it: built from the tracked files, nothing top-level but edge_genarm,
the default-pack recipe and its adapters inside; installed into a fresh virtual environment with
only the runtime dependencies (no torch), it generates from outside the checkout and finds the
packaged recipe.

Runtime dependencies come from the package index at the versions of this environment (pip's
cache makes that quick); llama-cpp-python from the wheel folder scripts/setup.sh builds into.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from edge_genarm import __version__
from edge_genarm.paths import cache_dir

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ["numpy", "click", "jinja2", "onnxruntime", "llama-cpp-python"]  # pyproject: dependencies + cpu


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p


def _llama_wheels() -> Path:
    """The folder scripts/setup.sh keeps its llama-cpp-python wheel in (keyed by build flags)."""
    want = md.version("llama-cpp-python")
    found = sorted(
        (cache_dir() / "wheels").glob(f"llama-*-{platform.machine()}/llama_cpp_python-{want}-*.whl")
    )
    assert found, (
        f"no llama-cpp-python {want} wheel under {cache_dir() / 'wheels'}: run scripts/setup.sh first"
    )
    return found[-1].parent


def test_wheel_installs_and_runs_outside_the_checkout(tiny_bundle, tmp_path):
    t0 = time.monotonic()
    src = tmp_path / "src"  # the tracked files only, as a clean clone has them
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src])
    (wheel,) = dist.glob("edge_genarm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    assert {n.split("/")[0] for n in names} == {"edge_genarm", f"edge_genarm-{__version__}.dist-info"}
    pack = "edge_genarm/models/default-pack"
    for arm in ("positive", "concise"):
        for f in ("adapter_config.json", "adapter_model.safetensors", "training.json"):
            assert f"{pack}/adapters/{arm}/{f}" in names
        assert f"{pack}/pairs-{arm}.jsonl" in names
    assert {f"{pack}/adapters/mix/mix.json", f"{pack}/adapters/mix/mix.safetensors"} <= set(names)  # the fast mode's head
    assert f"{pack}/recipe.toml" in names and "edge_genarm/export/commands.py" in names
    gemma = "edge_genarm/models/gemma-pack"  # its prompt template and its committed adapter ship too
    assert {f"{gemma}/template.jinja", f"{gemma}/adapters/positive/adapter_model.safetensors"} <= set(names)
    fixtures = {p.name for p in (ROOT / "tests").glob("*.py")} - {"__init__.py"} | {"tiny.py"}  # tiny.py: it lived in export/
    shipped = sorted(n for n in names if n.rsplit("/", 1)[-1] in fixtures)
    assert not shipped, f"test fixture modules ship in the wheel: {shipped}"
    t_build = time.monotonic() - t0

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", wheel])
    _run([*pip, "--find-links", _llama_wheels(), *(f"{d}=={md.version(d)}" for d in RUNTIME)])
    t_install = time.monotonic() - t0 - t_build

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "EDGE_GENARM_CACHE": str(tmp_path / "cache"),
        "ORT_DISABLE_TELEMETRY": "1",
    }
    py = venv / "bin" / "python"
    where = _run([py, "-c", "import edge_genarm, edge_genarm.pack as p; print(edge_genarm.__file__); print(p.RECIPES)"],
                 cwd=elsewhere, env=env).stdout.split()  # fmt: skip
    site = str(venv / "lib")
    assert all(w.startswith(site) for w in where), where  # the installed copy, not the checkout
    for absent in ("export", "models", "torch"):  # no top-level names of ours; the runtime needs no torch
        p = subprocess.run([py, "-c", f"import {absent}"], cwd=elsewhere, env=env, capture_output=True)
        assert p.returncode != 0, f"'import {absent}' works in the fresh venv"

    exe = venv / "bin" / "edge-genarm"
    out = _run(
        [exe, "generate", "--weights", tiny_bundle, "-n", "4", "--seed", "0", "--json", "Hi"],
        cwd=elsewhere,
        env=env,
    )
    assert '"finish_reason"' in out.stdout
    listed = _run([exe, "pack", "list"], cwd=elsewhere, env=env).stdout
    assert listed.split()[:3] == ["default", "not", "built"], listed
    assert [ln.split()[0] for ln in listed.splitlines()] == ["default", "gemma", "lite"], listed  # every recipe ships
    help_text = _run([exe, "--help"], cwd=elsewhere, env=env).stdout
    for cmd in ("generate", "chat", "pack", "export", "bundle"):
        assert f"  {cmd} " in help_text
    print(
        f"wheel test: build {t_build:.0f} s, venv + install {t_install:.0f} s, total {time.monotonic() - t0:.0f} s"
    )
