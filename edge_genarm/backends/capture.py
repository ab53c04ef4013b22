"""One layer's output read out of llama.cpp while it decodes: the base's own trunk for ARM heads.

The default pack's ARMs are the base's own weights (dequantized) with adapters on their last
layers, so the trunk they share computes what the base's first layers already computed.
llama.cpp's eval callback (`cb_eval` in the context parameters) hands over any node of its
graph as it is computed: here the output of layer L-1 (`l_out-{L-1}`), copied into a
NumPy buffer row by row, one row per position, so heads can run on it.

llama.cpp asks the callback about every node of the graph, about 1,090 times a step on a
30-layer model. Through ctypes that alone costs +3.7 ms a step (FACTS.md), more than the
saving on a small base; so the callback is 20 lines of C, compiled once per machine with
the system's C compiler into the cache (about 0.1 s), and costs nothing measurable. It
needs no llama.cpp headers: the three ggml functions it calls (tensor name, size, copy)
are passed in as pointers resolved from the loaded libggml. Without a C compiler, or if the
build fails, `load_capture` raises CaptureUnavailable with the reason, and the loader keeps
the trunk graph instead (exact, slower).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..paths import cache_dir

SOURCE = r"""
#include <stdbool.h>
#include <stddef.h>
#include <string.h>
#define EG_MAX 4
typedef const char *(*get_name_fn)(const void *);
typedef size_t (*nbytes_fn)(const void *);
typedef void (*tensor_get_fn)(const void *, void *, size_t, size_t);
typedef struct {
    get_name_fn get_name; nbytes_fn nbytes; tensor_get_fn tensor_get;
    int n;
    char want[EG_MAX][64];
    char *buf[EG_MAX]; size_t cap[EG_MAX]; size_t used[EG_MAX];
    int overflow; int hits;
} eg_capture;
/* ask: does the caller want node t? (only those named in `want`); then, with ask false,
   its data is ready: append it to that name's buf. Returning true keeps the graph computing. */
bool eg_capture_cb(void *t, bool ask, void *ud) {
    eg_capture *s = (eg_capture *)ud;
    const char *name = s->get_name(t);
    for (int i = 0; i < s->n; i++) {
        if (strncmp(name, s->want[i], sizeof s->want[i]) != 0) continue;
        if (ask) return true;
        size_t n = s->nbytes(t);
        if (s->used[i] + n > s->cap[i]) { s->overflow = 1; return true; }
        s->tensor_get(t, s->buf[i] + s->used[i], 0, n);
        s->used[i] += n;
        s->hits++;
        return true;
    }
    return !ask;
}
"""

MAX_NODES = 4


class CaptureUnavailable(RuntimeError):
    """The compiled callback could not be built or loaded here (the reason is the message)."""


class _State(ctypes.Structure):
    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("n", ctypes.c_int),
        ("want", (ctypes.c_char * 64) * MAX_NODES),
        ("buf", ctypes.c_void_p * MAX_NODES),
        ("cap", ctypes.c_size_t * MAX_NODES),
        ("used", ctypes.c_size_t * MAX_NODES),
        ("overflow", ctypes.c_int),
        ("hits", ctypes.c_int),
    ]


_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None


@contextlib.contextmanager
def loading():
    """Held while llama-cpp-python builds a context without a tap: `LayerCapture.installed`
    swaps a module-level function for the length of a load, and a plain load in another
    thread at that moment would otherwise get the callback too."""
    with _LOCK:
        yield


def _suffix() -> str:
    return {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")


def _compile() -> Path:
    """The compiled callback in the cache, built now if absent (atomically: a killed build
    leaves no half-written library)."""
    key = hashlib.sha256(f"{SOURCE}|{platform.machine()}|{sys.platform}".encode()).hexdigest()[:12]
    out = cache_dir() / "native" / f"capture-{key}{_suffix()}"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise CaptureUnavailable("no C compiler found (set CC or install cc/gcc/clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "capture.c", Path(tmp) / out.name
        src.write_text(SOURCE)
        cmd = [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CaptureUnavailable(f"'{cc}' could not run: {e}") from None
        if r.returncode != 0 or not lib.exists():
            raise CaptureUnavailable(f"'{' '.join(cmd)}' failed: {(r.stderr or r.stdout).strip()[:300]}")
        os.replace(lib, out)
    return out


def _ggml() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base (already loaded by llama_cpp: this returns the same handle)."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    names = [f"libggml-base{_suffix()}", f"ggml-base{_suffix()}", f"libggml{_suffix()}"]
    for n in names:
        if (libdir / n).exists():
            lib = ctypes.CDLL(str(libdir / n))
            if all(hasattr(lib, f) for f in ("ggml_get_name", "ggml_nbytes", "ggml_backend_tensor_get")):
                return lib
    raise CaptureUnavailable(f"no libggml with ggml_get_name/ggml_backend_tensor_get under '{libdir}'")


def load_capture() -> ctypes.CDLL:
    global _LIB
    with _LOCK:
        if _LIB is None:
            _LIB = ctypes.CDLL(str(_compile()))
        return _LIB


def _addr(f) -> int:
    return ctypes.cast(f, ctypes.c_void_p).value


class LayerCapture:
    """Collects the rows of the nodes named `nodes` (e.g. "l_out-21": the output of layer 21)
    into (n_ctx, width) float32 buffers (`rows[node]`), at the rows of the positions being
    decoded: one node for the ARM heads' trunk, one more for a mix head cut later.

    Use: `with capture.installed(): llama_cpp.Llama(...)` makes that context call it;
    then per decode `start(n_past)`, decode, `finish(n_new)`."""

    def __init__(self, nodes, width: int, n_ctx: int):
        import llama_cpp.llama_cpp as lc

        nodes = [nodes] if isinstance(nodes, str) else list(dict.fromkeys(nodes))
        if not 1 <= len(nodes) <= MAX_NODES:
            raise ValueError(f"1 to {MAX_NODES} nodes can be captured, got {len(nodes)}")
        lib, ggml = load_capture(), _ggml()
        self.nodes, self.width = nodes, int(width)
        self.rows = {n: np.zeros((int(n_ctx), self.width), dtype=np.float32) for n in nodes}
        s = self._state = _State()
        s.get_name, s.nbytes = _addr(ggml.ggml_get_name), _addr(ggml.ggml_nbytes)
        s.tensor_get = _addr(ggml.ggml_backend_tensor_get)
        s.n = len(nodes)
        for i, n in enumerate(nodes):
            s.want[i].value = n.encode()
        self._cb = lc.ggml_backend_sched_eval_callback(_addr(lib.eg_capture_cb))
        self._ud = ctypes.cast(ctypes.pointer(s), ctypes.c_void_p)

    @contextlib.contextmanager
    def installed(self):
        """llama-cpp-python builds its context parameters from `llama_context_default_params()`
        inside `Llama.__init__` and has no argument for the callback: wrap that function while
        the model loads (under a lock: another thread loading a model keeps the plain one)."""
        import llama_cpp.llama_cpp as lc

        original = lc.llama_context_default_params

        def with_callback():
            p = original()
            p.cb_eval, p.cb_eval_user_data = self._cb, self._ud
            return p

        with _LOCK:
            lc.llama_context_default_params = with_callback
            try:
                yield
            finally:
                lc.llama_context_default_params = original

    def start(self, n_past: int) -> None:
        s = self._state
        for i, n in enumerate(self.nodes):
            rows = self.rows[n]
            s.buf[i] = rows.ctypes.data + n_past * self.width * 4
            s.cap[i] = (len(rows) - n_past) * self.width * 4
            s.used[i] = 0
        s.overflow = 0

    def finish(self, n_new: int) -> None:
        s, want = self._state, n_new * self.width * 4
        for i, n in enumerate(self.nodes):
            if s.overflow or s.used[i] != want:
                got = s.used[i] / (self.width * 4)
                raise CaptureUnavailable(
                    f"llama.cpp handed over {got:g} rows of '{n}' for {n_new} positions"
                    + (" (buffer full)" if s.overflow else "")
                )
