"""llama.cpp's log, routed to Python's `logging` instead of the terminal.

llama.cpp writes its own lines to stderr through one process-wide callback (llama_log_set,
which also sets ggml's): model loading, context creation, and warnings such as Gemma 3's
`llama_kv_cache_iswa: using full-size SWA cache`. Here every line goes to the logger
"edge_genarm.llama" at DEBUG, so nothing reaches the terminal unless logging is turned up
(`show_log`, the command line's -v). llama.cpp sends a line in pieces (level CONT continues
the previous one): pieces are joined and a line is logged when it ends.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

log = logging.getLogger("edge_genarm.llama")

# ggml.h's enum ggml_log_level. llama-cpp-python 0.3.36's own callback (_logger.py) still maps an
# older order (1 info .. 4 debug), so it prints WARN lines as errors even with verbose=False: that is
# how Gemma 3's SWA-cache warning reached the terminal. (Messages of level 4 are errors here.)
_LEVELS = {0: "none", 1: "debug", 2: "info", 3: "warn", 4: "error"}
_CONT = 5
_state = {"callback": None, "level": 1, "pending": ""}  # the callback is kept here: ctypes would free it
_lock = threading.Lock()


def _on_log(level: int, text: bytes | None, _user) -> None:
    """Join llama.cpp's pieces into lines; log each whole line at DEBUG with its llama.cpp level."""
    piece = (text or b"").decode("utf-8", errors="replace")
    with _lock:
        if level != _CONT:
            _state["level"] = level
        buf = _state["pending"] + piece
        *lines, _state["pending"] = buf.split("\n")
        name = _LEVELS.get(_state["level"], str(_state["level"]))
    for line in lines:
        if line.strip():
            log.debug("[%s] %s", name, line.rstrip())


def route_llama_log() -> None:
    """Install the callback once per process (idempotent). Call before llama.cpp loads anything."""
    if _state["callback"] is not None:
        return
    import llama_cpp  # importing it installs llama-cpp-python's own callback, replaced here

    with _lock:
        if _state["callback"] is None:
            callback = llama_cpp.llama_log_callback(_on_log)
            llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
            _state["callback"] = callback


def show_log(verbose: bool = True, stream=None) -> None:
    """With `verbose`, print edge-genarm's log (llama.cpp's lines included) on stderr."""
    root = logging.getLogger("edge_genarm")
    if not verbose:
        return
    if not any(getattr(h, "_edge_genarm", False) for h in root.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler._edge_genarm = True
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
