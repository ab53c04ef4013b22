"""HF -> GGUF with llama.cpp's own converter, in a subprocess.

The converter ships inside the llama-cpp-python source distribution with the
gguf-py it was written against (PyPI `gguf` breaks it, FACTS.md). We take the
sdist of the llama-cpp-python version that is installed, so converter and
runtime agree, and cache it unpacked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from edge_genarm.errors import EdgeGenarmError
from edge_genarm.paths import cache_dir

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def find_converter(version: str | None = None) -> Path:
    """Path to convert_hf_to_gguf.py for `version`, fetching the sdist with pip once."""
    version = version or llama_cpp_version()
    env_src = os.environ.get("EDGE_GENARM_LLAMA_SRC")
    root = Path(env_src) if env_src else cache_dir() / "llama-src" / f"llama_cpp_python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    downloads = cache_dir() / "downloads"
    sdist = downloads / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        print(
            f"fetching the llama-cpp-python {version} source (for its GGUF converter) with pip",
            file=sys.stderr,
        )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(downloads),
        ]
        if subprocess.run(cmd).returncode != 0 or not sdist.is_file():
            raise EdgeGenarmError(
                f"could not fetch llama-cpp-python=={version} source for its GGUF converter: "
                f"download it and set EDGE_GENARM_LLAMA_SRC to the unpacked folder"
            )
    tmp = root.parent / (root.name + ".partial")
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and ("/gguf-py/" in m.name or "/conversion/" in m.name or m.name.endswith(".py"))
        ]
        safe_extract(tar, members, tmp, sdist)
    (tmp / root.name).rename(root)
    tmp.rmdir()
    return script


def convert_hf_to_gguf(hf_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Run llama.cpp's converter; the GGUF appears at `out` only when complete."""
    if outtype not in OUTTYPES:
        raise EdgeGenarmError(f"unknown GGUF type {outtype!r}: use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    part = out.with_name(out.name + ".partial")
    script = find_converter()
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(part), "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise EdgeGenarmError(f"llama.cpp's converter failed on '{hf_dir}':\n{tail}")
    os.replace(part, out)
    return out


def safe_extract(tar: tarfile.TarFile, members: list, dst: Path, what: Path) -> None:
    """Extract `members` under `dst`, refusing what the "data" filter refuses. Python before
    3.11.4 / 3.12 (Debian 12's 3.11.2) has no extraction filters: there the members are
    checked here instead (plain files and folders only, relative paths that stay inside)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dst, members=members, filter="data")
        return
    for m in members:
        parts = Path(m.name).parts
        if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or ".." in parts:
            raise EdgeGenarmError(
                f"'{what}' holds '{m.name}', which is not a plain file inside the archive: the download "
                "is corrupt or not llama-cpp-python's sdist; delete it and run again"
            )
    tar.extractall(dst, members=members)
