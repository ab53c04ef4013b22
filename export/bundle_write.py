"""Writing a bundle (export, pack builds and the test fixtures): the base, the ARMs, file records.

Every write lands atomically: a file is copied under a temporary name and renamed, a folder
is filled beside its place and renamed, and the manifest is rewritten last (manifest.py). A
killed export leaves scratch folders and temporary files that `tidy_bundle` removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_genarm.bundle import sha256_file
from edge_genarm.errors import BundleError
from edge_genarm.gguf import read_gguf, vocab_fingerprint
from edge_genarm.manifest import read_manifest, write_manifest
from edge_genarm.tokens import check_arm_tokens, check_token_ids, find_arm_tokens, load_arm_tokens


def file_record(path: Path) -> dict:
    """The manifest's record of a file: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def add_file(root: Path, manifest: dict, rel: str) -> None:
    """Record a file already written into the bundle (size + sha256)."""
    manifest.setdefault("files", {})[rel] = file_record(Path(root) / rel)


@contextmanager
def scratch_dir(root: Path, kind: str) -> Iterator[Path]:
    """A temporary folder in `root` (same filesystem, so its files rename into place), named
    .KIND-scratch-PID-*; ones left by killed runs (their process is gone) are deleted first."""
    root.mkdir(parents=True, exist_ok=True)
    clean_scratch(root)
    path = Path(tempfile.mkdtemp(dir=root, prefix=f".{kind}-scratch-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tidy_bundle(root: Path) -> list[Path]:
    """Delete what a killed export or share-trunk left in bundle `root`: stale scratch folders,
    the temporary files of killed atomic writes, and files under arms/ and trunks/ that its
    manifest does not record (e.g. full ARM graphs a finished share-trunk had yet to delete).
    Returns what was deleted."""
    m = read_manifest(root)
    kept = {root / rel for rel in m.get("files", {})}
    gone = []
    for sub in ("arms", "trunks"):
        for p in sorted((root / sub).rglob("*"), reverse=True) if (root / sub).is_dir() else []:
            if p.is_file() and p not in kept:
                p.unlink()
                gone.append(p)
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for p in root.glob(".*.tmp"):  # an atomic write killed before its rename (paths.atomic_write_bytes)
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone + clean_scratch(root)


def clean_scratch(root: Path) -> list[Path]:
    """Delete the scratch folders in `root` whose process is gone (a killed export's)."""
    gone = []
    for old in root.glob(".*-scratch-*") if root.is_dir() else []:
        pid = old.name.split("-scratch-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def add_base(
    root: str | Path, gguf_path: str | Path, name: str = "base.gguf", extra: dict | None = None
) -> dict:
    """Copy (atomically) a GGUF into the bundle and record it (with `extra`) in one manifest write."""
    root, src = Path(root), Path(gguf_path)
    info = read_gguf(src)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / name
    if src.resolve() != dst.resolve():
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    m = read_manifest(root)
    m["base"] = {
        "file": name,
        "architecture": info.architecture,
        "n_vocab": len(info.tokens),
        "tokenizer_fingerprint": vocab_fingerprint(info.tokens),
        **(extra or {}),
    }
    m.setdefault("files", {})[name] = file_record(dst)
    write_manifest(root, m)
    return m


def add_arm(
    root: str | Path,
    onnx_dir: str | Path,
    name: str,
    beta_r: float | None = None,
    weight: float = 1.0,
    extra: dict | None = None,
) -> dict:
    """Copy an exported ARM folder (model.onnx [+ data], tokens.json) into the bundle."""
    return add_graph(root, onnx_dir, "arms", name, {"beta_r": beta_r, "default_weight": weight, **(extra or {})})


def add_graph(root: str | Path, src: str | Path, section: str, name: str, entry: dict, kind: str = "ARM") -> dict:
    """Install an exported graph folder (model.onnx [+ data], tokens.json) as the bundle's
    SECTION/NAME/ and record it as manifest[section][name] = {file, tokens, **entry}, in one
    manifest write. Its tokens are checked against the base's first (`kind`: "ARM" or "reward
    model"); the folder is copied beside its place and renamed into it, so a killed run leaves
    the old one. Returns the manifest."""
    root, src = Path(root), Path(src)
    m = read_manifest(root)
    if "base" not in m:
        raise BundleError(f"bundle '{root}' has no base model yet: run `edge-genarm export base` first")
    base_tokens = read_gguf(root / m["base"]["file"]).tokens
    tokens = load_arm_tokens(find_arm_tokens(src / "model.onnx"), name)
    if kind == "ARM":
        check_arm_tokens(name, tokens, base_tokens, m["base"]["file"])
    else:
        check_token_ids(name, tokens, base_tokens, m["base"]["file"], kind=kind)
    rel_dir = Path(section) / name
    dst, tmp = root / rel_dir, root / section / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [p for p in src.iterdir() if p.name.startswith("model.onnx") or p.name == "tokens.json"]
    for p in files:
        shutil.copyfile(p, tmp / p.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    recs = m.setdefault("files", {})
    for k in [k for k in recs if k.startswith(f"{rel_dir}/")]:
        del recs[k]
    for p in files:
        recs[f"{rel_dir}/{p.name}"] = file_record(dst / p.name)
    m.setdefault(section, {})[name] = {"file": f"{rel_dir}/model.onnx", "tokens": f"{rel_dir}/tokens.json", **entry}
    write_manifest(root, m)
    return m
