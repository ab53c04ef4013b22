"""Where edge-genarm keeps its files, and how it writes them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """$EDGE_GENARM_CACHE, else $XDG_CACHE_HOME/edge-genarm, else ~/.cache/edge-genarm."""
    env = os.environ.get("EDGE_GENARM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edge-genarm"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_bytes(path: str | Path, write) -> None:
    """`write(fileobj)` into a temporary file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: str | Path):
    """An exclusive lock (flock) on `path` + ".lock", held for the block; it waits for other
    processes holding it. Where fcntl is missing (Windows) the block runs unlocked."""
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_json(path: str | Path, update: Callable[[dict], None]) -> dict:
    """Read the JSON object in `path` (missing or unreadable: {}), let `update` change it, write it
    back atomically, all under file_lock(path): processes that update it at once (Ray actors on
    one node sharing the cache) each keep their change, where read-modify-write with only an
    atomic replace would let the last writer drop the others'. Returns the object written."""
    path = Path(path)
    with file_lock(path):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        update(data)
        atomic_write_json(path, data)
        return data
