"""Shared fixtures: a tiny random bundle built once by the real exporters, then cached.

The bundle is keyed by the source of the code that builds it, so editing the
exporters rebuilds it; everything else reuses it (building takes ~30 s).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# .ci/run sets it to 1: there a missing browser fails the browser test instead of skipping it
REQUIRE_BROWSER = "EDGE_GENARM_REQUIRE_BROWSER"


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


def find_chromium() -> tuple[str | None, str]:
    """(a Chromium that Playwright can drive, or None; and why not). Debian's package is
    /usr/bin/chromium; `scripts/setup.sh --test` installs it where it runs as root with apt-get."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None, "Playwright is not installed: bash scripts/setup.sh --test installs it"
    candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    if sys.platform == "darwin":
        candidates.append("/Applications/Chromium.app/Contents/MacOS/Chromium")
    for path in filter(None, candidates):
        if os.access(path, os.X_OK):
            return path, ""
    how = (
        "bash scripts/setup.sh --test installs it here (root, apt-get)"
        if os.geteuid() == 0 and shutil.which("apt-get")
        else "install Chromium (Debian: apt-get install chromium, as root) to run it"
    )
    return None, f"no Chromium found (looked for /usr/bin/chromium, chromium and chromium-browser on PATH): {how}"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a Chromium for the browser tests; without one they skip, saying why, unless
    EDGE_GENARM_REQUIRE_BROWSER=1 (CI), where they fail."""
    path, why = find_chromium()
    if path:
        return path
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{why} ({REQUIRE_BROWSER}=1: the browser test must run here)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch, tmp_path_factory):
    """Tests never read the developer's own config file or EDGE_GENARM_* settings."""
    for var in list(os.environ):
        if var.startswith("EDGE_GENARM_") and var not in (
            "EDGE_GENARM_CACHE",
            "EDGE_GENARM_LLAMA_SRC",
            "EDGE_GENARM_RECIPES",
            REQUIRE_BROWSER,
        ):
            monkeypatch.delenv(var)
    monkeypatch.setenv("EDGE_GENARM_CONFIG", str(tmp_path_factory.getbasetemp() / "no-config.toml"))
    monkeypatch.setenv("EDGE_GENARM_ORT_CACHE", "0")  # test_export enables it where it is tested
