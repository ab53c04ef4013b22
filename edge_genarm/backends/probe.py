"""Check a GGUF file in a child process before loading it in ours.

llama.cpp aborts the whole process (GGML_ASSERT, a C++ exception: not a Python error) on
some malformed files: a vocabulary it cannot parse, hyperparameters that disagree with the
tensors (`llama.block_count` = 1000), shapes it cannot compute with. A child process loads
the whole model as ours will, tokenizes a test string and evaluates a few tokens; if that
dies, the blow lands there and we report llama.cpp's own last words. The result is
remembered per file version (inode, size, mtime), so each file is probed once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import ModelFileError
from ..paths import cache_dir, update_json

_CHILD = r"""
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1,
                      n_gpu_layers=0, verbose=True)
ids = llm.tokenize("Hello, world! 123 <|im_start|>".encode(), add_bos=False, special=True)
llm.detokenize(ids)
llm.eval(ids[:8] or [0])
print("OK", llm.n_vocab(), len(ids), flush=True)
"""

# what llama.cpp says just before it gives up, most telling first
_CLUES = ("GGML_ASSERT", "what():", "error loading model", "llama_model_load:", "error", "failed")


def _key(path: Path) -> str:
    """One file version: the file itself (device and inode, which hard links and renames keep)
    then its size and mtime (which a rewrite changes)."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def _last_words(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for clue in _CLUES:
        hits = [line for line in lines if clue.lower() in line.lower()]
        if hits:
            line = hits[-1]
            i = line.find("GGML_ASSERT")  # drop the build path in front of the assertion
            return line[i:] if i >= 0 else line
    return lines[-1] if lines else "no message"


def _describe(rc: int) -> str:
    if rc < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def probe_gguf(path: str | Path, timeout: float = 120.0) -> None:
    """Raise ModelFileError if llama.cpp cannot load and run `path`; cheap once it could."""
    path = Path(path)
    memo = cache_dir() / "probed.json"
    try:
        seen = json.loads(memo.read_text())
        seen = seen if isinstance(seen, dict) else {}
    except (OSError, ValueError):
        seen = {}
    key = _key(path)
    if seen.get(key) == "ok-model":
        return
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # else ggml runs gdb on its way down
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise ModelFileError(
            f"llama.cpp did not finish loading GGUF file '{path}' in {timeout:.0f} s: the file is "
            "corrupt or far larger than it looks; re-download it or re-export it"
        ) from None
    if proc.returncode != 0 or not proc.stdout.startswith("OK"):
        raise ModelFileError(
            f"llama.cpp cannot load GGUF file '{path}' ({_describe(proc.returncode)}: "
            f"{_last_words(proc.stderr)[:200]}): the file is corrupt or its metadata disagrees "
            "with its tensors; re-download it or re-export it with `edge-genarm export base`"
        )

    def record(seen: dict) -> None:  # under update_json's lock: other processes' entries survive
        for k in [k for k in seen if k.startswith(key.split("|")[0] + "|")]:
            del seen[k]  # older versions of this file
        seen[key] = "ok-model"

    try:
        update_json(memo, record)
    except OSError:
        pass  # a read-only cache only costs a re-probe next time
