"""Shared fixtures: a tiny random bundle built once by the real exporters, then cached.

The bundle is keyed by the source of the code that builds it, so editing the
exporters rebuilds it; everything else reuses it (building takes ~30 s).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


BUILDERS = [
    "tests/tiny.py",
    "export/gguf_tokenizer.py",
    "export/converter.py",
    "export/onnx_export.py",
    "export/bundle_write.py",
    "edge_genarm/manifest.py",
]


def _fixture_key() -> str:
    h = hashlib.sha256()
    for rel in BUILDERS:
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    import fcntl

    from edge_genarm.paths import cache_dir

    from .tiny import build_tiny_bundle

    root = cache_dir() / "fixtures" / f"tiny-{_fixture_key()}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".lock", "w") as lock:  # two test runs at once build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_tiny_bundle(root)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_root) -> Path:
    return tiny_root / "bundle"


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy to damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def engine(tiny_bundle):
    from edge_genarm import load

    e = load(str(tiny_bundle), n_ctx=512)
    yield e
    e.close()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from .tiny import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch, tmp_path_factory):
    """Tests never read the developer's own config file or EDGE_GENARM_* settings."""
    import os

    for var in list(os.environ):
        if var.startswith("EDGE_GENARM_") and var not in (
            "EDGE_GENARM_CACHE",
            "EDGE_GENARM_LLAMA_SRC",
            "EDGE_GENARM_RECIPES",
        ):
            monkeypatch.delenv(var)
    monkeypatch.setenv("EDGE_GENARM_CONFIG", str(tmp_path_factory.getbasetemp() / "no-config.toml"))
    monkeypatch.setenv("EDGE_GENARM_ORT_CACHE", "0")  # test_export enables it where it is tested
