"""Check a GGUF file in a child process before loading it in ours.

llama.cpp aborts the whole process (a C++ exception, not a Python error) on
some malformed files and vocabularies (FACTS.md). A child that loads the
vocabulary and tokenizes a test string takes the blow instead; results are
remembered by path, size and mtime so each file is probed once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import ModelFileError
from ..paths import atomic_write_json, cache_dir

_CHILD = r"""
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
ids = llm.tokenize("Hello, world! 123 <|im_start|>".encode(), add_bos=False, special=True)
text = llm.detokenize(ids)
print("OK", llm.n_vocab(), len(ids))
"""


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def probe_gguf(path: str | Path, timeout: float = 120.0) -> None:
    path = Path(path)
    memo = cache_dir() / "probed.json"
    try:
        seen = json.loads(memo.read_text())
    except (OSError, ValueError):
        seen = {}
    key = _key(path)
    if seen.get(key) == "ok":
        return
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 or not proc.stdout.startswith("OK"):
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise ModelFileError(
            f"llama.cpp cannot load GGUF file '{path}' (exit code {proc.returncode}: "
            f"{why[-1][:200] if why else 'no message'}): the file is corrupt or its vocabulary "
            "is malformed; re-download it or re-export it with `edge-genarm export base`"
        )
    seen[key] = "ok"
    try:
        atomic_write_json(memo, seen)
    except OSError:
        pass  # a read-only cache only costs a re-probe next time
