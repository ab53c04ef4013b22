"""llama.cpp's log goes to logging ("edge_genarm.llama"), never to the terminal unless -v
(edge_genarm/backends/llama_log.py). Checked on real processes: what reaches file descriptor 2."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edge_genarm.backends import llama_log

# a llama.cpp call that logs at error level without any model: loading a file that is not there
CHILD = """
import sys, llama_cpp
if "route" in sys.argv:
    from edge_genarm.backends.llama_log import route_llama_log, show_log
    route_llama_log()
    route_llama_log()  # twice: still one callback
    if "show" in sys.argv:
        show_log()
llama_cpp.llama_model_load_from_file(b"/nonexistent/x.gguf", llama_cpp.llama_model_default_params())
print("done")
"""


def run_child(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120)


def test_llama_cpp_lines_leave_stderr_only_when_shown():
    plain = run_child()
    assert "failed to open GGUF file" in plain.stderr  # llama-cpp-python alone prints it
    routed = run_child("route")
    assert routed.returncode == 0 and routed.stdout.strip() == "done"
    assert routed.stderr == ""
    shown = run_child("route", "show")
    lines = shown.stderr.splitlines()
    assert lines and all(line.startswith("edge_genarm.llama: [error] ") for line in lines)
    assert any("failed to open GGUF file '/nonexistent/x.gguf'" in line for line in lines)


def test_pieces_are_joined_into_lines(caplog):
    caplog.set_level(logging.DEBUG, logger="edge_genarm.llama")
    llama_log._on_log(3, b"llama_kv_cache_iswa: using ", None)
    llama_log._on_log(5, b"full-size SWA cache\nsecond ", None)
    assert [r.getMessage() for r in caplog.records] == [
        "[warn] llama_kv_cache_iswa: using full-size SWA cache"
    ]
    llama_log._on_log(5, b"line\n", None)
    llama_log._on_log(2, b"\n", None)  # blank lines are dropped
    assert [r.getMessage() for r in caplog.records][1:] == ["[warn] second line"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_genarm.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def llama_lines(stderr: str) -> list[str]:
    marks = ("llama_", "ggml_", "load_tensors", "print_info", "llm_load", "gguf_")
    return [line for line in stderr.splitlines() if any(m in line for m in marks)]


def test_generate_prints_nothing_from_llama_cpp(tiny_bundle):
    r = cli("generate", "--weights", str(tiny_bundle), "-n", "3", "--seed", "0", "Hi")
    assert r.returncode == 0, r.stderr
    assert llama_lines(r.stderr) == []
    v = cli("-v", "generate", "--weights", str(tiny_bundle), "-n", "3", "--seed", "0", "Hi")
    assert v.returncode == 0, v.stderr
    assert any(line.startswith("edge_genarm.llama: ") for line in v.stderr.splitlines())


@pytest.mark.slow
def test_gemma3_swa_warning_goes_to_the_log():
    """Gemma 3's sliding-window layers make llama.cpp warn at context creation: shown with -v only."""
    from tests.test_gguf_tokenizer import gemma_gguf

    path: Path = gemma_gguf()
    r = cli("generate", "--weights", str(path), "-n", "2", "--seed", "0", "The sky is")
    assert r.returncode == 0, r.stderr
    assert llama_lines(r.stderr) == [] and "SWA" not in r.stderr
    v = cli("-v", "generate", "--weights", str(path), "-n", "2", "--seed", "0", "The sky is")
    assert "edge_genarm.llama: [warn] llama_kv_cache_iswa: using full-size SWA cache" in v.stderr
