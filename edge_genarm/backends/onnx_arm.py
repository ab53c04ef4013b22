"""The ARM backend: an ONNX causal LM with past key/values, run by onnxruntime.

The graph is the one optimum exports for `text-generation-with-past`: inputs
input_ids, attention_mask, (position_ids), past_key_values.{i}.key/value;
outputs logits and present.{i}.key/value. The KV cache lives here as NumPy
arrays, so a chat turn that shares a prefix with the cache evaluates only the
new tokens.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelFileError
from .units import ArmUnit, reusable

log = logging.getLogger(__name__)

DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "coreml": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
}


def resolve_providers(device: str, available: list[str]) -> list[str]:
    """Map a device name ('auto', 'cpu', 'cuda', 'coreml') to ORT providers.

    'auto' takes the first accelerator that this onnxruntime build offers.
    Asking for one it lacks is an error with the fix, never a silent CPU run.
    """
    device = device.lower()
    if device == "auto":
        for name in ("cuda", "coreml"):
            if DEVICE_PROVIDERS[name][0] in available:
                return DEVICE_PROVIDERS[name]
        return DEVICE_PROVIDERS["cpu"]
    if device not in DEVICE_PROVIDERS:
        raise ConfigError(f"unknown ARM device {device!r}: use one of auto, cpu, cuda, coreml")
    wanted = DEVICE_PROVIDERS[device][0]
    if wanted not in available:
        extra = {
            "cuda": "pip install 'edge-genarm[gpu]' (onnxruntime-gpu, CUDA 12)",
            "coreml": "use onnxruntime >= 1.16 on macOS",
        }.get(device, "")
        raise ConfigError(
            f"ARM device {device!r} needs {wanted}, which this onnxruntime lacks "
            f"(available: {', '.join(available)}): {extra}"
        )
    return DEVICE_PROVIDERS[device]


def _machine_tag() -> str:
    """What an optimized CPU graph depends on besides the model: ORT version, arch, CPU features."""
    import platform

    import onnxruntime as ort

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return f"{ort.__version__}|{platform.machine()}|{flags}"


def optimized_cache_path(path: Path) -> Path | None:
    """Where the CPU-optimized copy of `path` is cached, or None when caching does not apply.

    Session creation for a 135M-parameter ARM spends seconds in graph optimization; ORT's
    own advice is to optimize once, save, and load the result with optimizations off.
    The key covers the file (path, size, mtime) and the machine, so a changed ARM or a
    different CPU never reuses a stale graph. EDGE_GENARM_ORT_CACHE=0 turns it off.
    """
    import hashlib

    from ..paths import cache_dir

    if os.environ.get("EDGE_GENARM_ORT_CACHE", "1") == "0":
        return None
    st = path.stat()
    data = [p.stat().st_size for p in path.parent.glob(path.name + "_data")]
    if st.st_size + sum(data) > 1_500_000_000:  # a single protobuf holds at most 2 GB
        return None
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    what = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{data}|{_machine_tag()}".encode()).hexdigest()[:12]
    return cache_dir() / "ort" / f"{where}-{what}.onnx"  # one entry per ARM file: see _session


def session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    # Spinning ORT threads fight llama.cpp's for the same cores (FACTS.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No CPU arena, no memory pattern: the arena keeps its high-water mark for the life of the
    # session, so one long prompt (a prefill's [seq, vocab] logits: 155 MB at 787 tokens of a
    # 49k vocabulary) stayed resident for good; plain malloc gives it back (with the server's
    # malloc_trim) and costs no measurable decode speed (tiny bundle, 2 cores: 21-23 tok/s both).
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    return opts


# Cache an optimized graph only when optimizing it takes this long (one-off, measured at the
# first load). Measured on 2 cores: optimum's fp32 export of the 135M ARM takes 3.8 s to
# optimize (0.4 s from the cache); the compact int8 trunk (export/compact.py) 0.22 s, its
# heads 0.09 s and the LM head 0.13 s, and caching them would add 296 MB of copies to disk.
# Reading the copy back costs time too, and on a loaded machine the wall time of optimizing
# balloons (the int8 trunk once took 0.6 s, then over 1.5 s, and was cached: 209 MB to save
# nothing): the cost is the session-creating thread's CPU time, and a copy is kept only when
# it exceeds CACHE_MIN_SECONDS plus reading the weights back at CACHE_READ_BYTES_PER_S.
CACHE_MIN_SECONDS = 0.5
CACHE_READ_BYTES_PER_S = 200e6


class OnnxGraph:
    """An onnxruntime session for one ARM graph file, created through the optimized-graph
    cache on CPU; a bad file is a ModelFileError naming it."""

    def __init__(
        self, path: str | Path, name: str = "arm", device: str = "cpu", threads: int = 1, cache: bool = True
    ):
        import onnxruntime as ort

        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        self.path, self.name, self.threads = Path(path), name, max(1, int(threads))
        self._use_cache = cache  # off for one-off sessions (export parity on a temporary file)
        if not self.path.is_file():
            raise ModelFileError(f"ARM '{name}': ONNX file '{self.path}' does not exist: re-export it")
        opts = session_options(self.threads)
        providers = resolve_providers(device, ort.get_available_providers())
        try:
            self.session = self._session(opts, providers)
        except Exception as e:  # ORT raises its own types for bad protobufs / missing data
            raise ModelFileError(
                f"ARM '{name}': cannot load ONNX file '{self.path}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}): the file is corrupt or its external data is "
                "missing; re-export it with `edge-genarm export arm`"
            ) from None
        self.providers = self.session.get_providers()
        if providers[0] not in self.providers:
            log.warning("ARM '%s' asked for %s but runs on %s", name, providers[0], self.providers)
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._ort = ort
        self._device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def run_error(self, e: Exception) -> ModelFileError:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return ModelFileError(
            f"ARM '{self.name}': ONNX file '{self.path}' loads but fails when run ({type(e).__name__}: "
            f"{first}): the graph is corrupt or not an edge-genarm ARM; re-export it with `edge-genarm export arm`"
        )

    def _session(self, opts, providers):
        """The session; on CPU through the optimized-graph cache (see optimized_cache_path)."""
        import onnxruntime as ort

        on_cpu = providers[0] == "CPUExecutionProvider"
        cached = optimized_cache_path(self.path) if on_cpu and self._use_cache else None
        self.from_cache = False
        if cached is not None and cached.is_file():
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                session = ort.InferenceSession(str(cached), sess_options=opts, providers=providers)
                self.from_cache = True
                return session
            except Exception:  # a torn or stale cache entry: drop it, optimize again
                log.warning("ARM '%s': dropping unreadable optimized cache %s", self.name, cached)
                cached.unlink(missing_ok=True)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # an unwritable cache costs speed, never the load
                log.warning("ARM '%s': no optimized-graph cache (%s); loading without it", self.name, e)
                cached = None
        fast = cached.with_name(cached.name + ".fast") if cached is not None else None
        if cached is None or fast.is_file():
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        from ..paths import cache_dir, file_lock

        # One process optimizes and saves; the others (Ray actors on one node) wait, then read its
        # copy: two writing the same .data file at once, or one deleting the other's .tmp, would tear it.
        # (The lock lives outside the graph folder, one per ARM path.)
        with file_lock(cache_dir() / "locks" / f"ort-{cached.name.split('-')[0]}"):
            if not cached.is_file() and not fast.is_file():
                return self._optimize_into(cached, fast, opts, providers)
        return self._session(opts, providers)

    def _optimize_into(self, cached: Path, fast: Path, opts, providers):
        """Create the session with full optimization, saving the optimized graph as `cached` when
        that took long enough to be worth its disk (else mark the ARM `fast`)."""
        import onnxruntime as ort

        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.onnx")
        opts.optimized_model_filepath = str(tmp)
        # the weights go to a data file beside it (an ARM with external data would otherwise be
        # saved pointing at its own model.onnx_data, relative to the wrong folder)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", cached.name + ".data"
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        t0 = time.thread_time()  # CPU time of this thread: what optimizing costs, whatever else runs
        session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        weights = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        keep = time.thread_time() - t0 >= CACHE_MIN_SECONDS + weights / CACHE_READ_BYTES_PER_S
        try:
            if keep:
                os.replace(tmp, cached)
            else:  # optimizing it is cheap: a copy of its weights would cost disk for nothing
                fast.touch()
        except OSError:
            pass
        for old in cached.parent.glob(cached.name.split("-")[0] + "-*.onnx*"):
            if old.name not in (cached.name, cached.name + ".data", fast.name) or not keep and old != fast:
                old.unlink(missing_ok=True)  # the ARM file before it changed, or this one's unneeded copy
        return session


KV_BLOCK = 256  # positions: an in-place KV cache grows by doubling, in multiples of this


class KVGraph(OnnxGraph):
    """A graph with past key/values (optimum's `-with-past` layout): `feed` evaluates new
    positions after the cached ones. The cache stays in ORT's buffers between calls.

    A compact graph (export/compact.py) attends with GroupQueryAttention, which appends the new
    positions in place when its past and present key/values are one buffer: there the cache is
    one numpy buffer per layer with room to spare (`_inplace`), bound as both, and grows by
    doubling; elsewhere each forward returns a new cache, the old one copied into it, which at
    1,000 positions was most of a 4-layer head's step (docs/speed.md). The arithmetic is the same:
    the same keys and values are read in the same order."""

    feed_input = "input_ids"  # what a new position is: a token id, or a hidden state (trunk heads)
    out_name = "logits"
    in_place = True  # where the graph allows it (a subclass whose old caches must stay intact: False)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._past_names = [n for n in self._inputs if n.startswith("past_key_values.")]
        if self.feed_input not in self._inputs or not self._past_names:
            raise ModelFileError(
                f"ARM '{self.name}': '{self.path}' is not a causal LM graph exported with past "
                f"key/values and input '{self.feed_input}' (inputs: " + ", ".join(self._inputs) + "): "
                "export it with `edge-genarm export arm`"
            )
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        self._out_names = [self.out_name, *self._present_names]
        outputs = {o.name: o for o in self.session.get_outputs()}
        shape = outputs[self.out_name].shape
        self.vocab_size = shape[-1] if isinstance(shape[-1], int) else None
        self._empty = {n: self._empty_past(self._inputs[n]) for n in self._past_names}
        # export/compact.py names the cache's length 'past' in and 'total' out (its GQA layout)
        self._inplace = self.in_place and self._device == "cpu" and all(
            len(self._inputs[n].shape) == 4 and self._inputs[n].shape[2] == "past"
            and p in outputs and outputs[p].shape[2] == "total"
            for n, p in zip(self._past_names, self._present_names)
        )  # fmt: skip
        self.reset()

    @staticmethod
    def _empty_past(inp) -> np.ndarray:
        dtype = np.float16 if "float16" in inp.type else np.float32
        dims = [d if isinstance(d, int) else 0 for d in inp.shape]
        dims[0] = 1
        return np.zeros(dims, dtype=dtype)

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.n_exact = 0  # leading cached positions computed in batches of >= 2 (LlamaBase.trim_for)
        self._kv: dict[str, np.ndarray] = {}  # the in-place cache's buffers (what _past wraps)
        self._past = {n: self._ort.OrtValue.ortvalue_from_numpy(v) for n, v in self._empty.items()}

    def truncate(self, keep: int) -> None:
        """Keep the first `keep` cached positions."""
        if keep < len(self.tokens):
            if not self._inplace:  # (in place, the positions past `keep` are simply written over)
                self._past = {
                    n: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :keep]))
                    for n, v in self._past.items()
                }
            self.tokens = self.tokens[:keep]
            self.n_exact = min(self.n_exact, keep)

    def _reserve(self, need: int) -> None:
        """Room for `need` positions in the in-place cache (a larger buffer, the cached positions copied)."""
        cap = next(iter(self._kv.values())).shape[2] if self._kv else 0
        if need <= cap:
            return
        size = -(-max(need, 2 * cap) // KV_BLOCK) * KV_BLOCK
        n = len(self.tokens)
        kv = {}
        for name, empty in self._empty.items():
            buf = np.zeros((1, empty.shape[1], size, empty.shape[3]), dtype=empty.dtype)
            if name in self._kv:
                buf[:, :, :n] = self._kv[name][:, :, :n]
            kv[name] = buf
        self._kv = kv
        self._past = {name: self._ort.OrtValue.ortvalue_from_numpy(buf) for name, buf in kv.items()}

    def exact_keep(self, tokens: list[int]) -> int:
        """The cached positions a cold prefill of `tokens` would compute bit for bit: shared, fed
        in batches (onnxruntime's one-position kernels round differently), >= 2 left to feed."""
        return reusable(self.tokens, tokens, self.n_exact)

    def feed(self, new: list[int], value: np.ndarray | None = None, extra: dict | None = None) -> np.ndarray:
        """One forward with IOBinding over the positions of token ids `new` (fed as `value`
        when the graph takes hidden states). The KV cache stays in ORT's buffers between
        steps (no copy out to NumPy and back, which grows with the context). `extra`: more
        inputs by name (the same at every position). Returns the
        output for the new positions, shape (n_new, ...)."""
        n_past, n_new = len(self.tokens), len(new)
        io = self.session.io_binding()
        if value is None:
            value = np.asarray([new], dtype=np.int64)
        io.bind_cpu_input(self.feed_input, value)
        io.bind_cpu_input("attention_mask", np.ones((1, n_past + n_new), dtype=np.int64))
        for name, v in (extra or {}).items():  # a mix head's 'alpha'
            io.bind_cpu_input(name, v)
        if "position_ids" in self._inputs:
            io.bind_cpu_input("position_ids", np.arange(n_past, n_past + n_new, dtype=np.int64)[None, :])
        if self._inplace:  # GQA reads the cache from and appends to one buffer
            self._reserve(n_past + n_new)
            io.bind_output(self.out_name, self._device)  # first: outputs come back in binding order
            for name, present in zip(self._past_names, self._present_names):
                io.bind_ortvalue_input(name, self._past[name])
                io.bind_ortvalue_output(present, self._past[name])
        else:
            for name, past in self._past.items():
                io.bind_ortvalue_input(name, past)
            for name in self._out_names:
                io.bind_output(name, self._device)
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # onnxruntime's own error types: a graph that loads but cannot run
            raise self.run_error(e) from None
        outs = io.get_outputs()
        # The binding holds its inputs and outputs for as long as any output lives, and the new
        # KV cache is an output: without this, the last step's cache (37 MB per head at 3,100
        # positions) and the prefill's whole output stayed resident beside the new cache.
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        if not self._inplace:
            self._past = dict(zip(self._past_names, outs[1:]))
        if n_new >= 2 and n_past == self.n_exact:
            self.n_exact = n_past + n_new
        self.tokens.extend(new)
        return outs[0].numpy()[0]


class OnnxARM(KVGraph):
    """One ARM: `prefill(tokens)` then `step(token)`, each returning last-position logits.
    `unit` is the ARM as the engine runs it (backends.units)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.unit = ArmUnit(self)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Evaluate `tokens`, reusing the cached prefix they share with the last call."""
        self.truncate(reusable(self.tokens, tokens))
        # a copy: the last row as a view would keep the whole [n, vocab] output alive (1.2 GB for a
        # 3,000-token prompt over two ARMs) until the next request replaced it
        return self.feed(list(tokens[len(self.tokens) :]))[-1].copy()

    def trim_for(self, tokens: list[int]) -> None:
        """As LlamaBase.trim_for: the next prefill(tokens) equals a cold one bit for bit."""
        self.truncate(self.exact_keep(tokens))

    def step(self, token: int) -> np.ndarray:
        return self.feed([token])[-1]

    def sequence_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of `tokens` from an empty cache (export checks)."""
        self.reset()
        return self.feed(list(tokens))

    def logits_from(self, tokens: list[int], start: int) -> tuple[int, np.ndarray]:
        """(first, logits at positions first.. of `tokens`), first <= `start`: the positions before
        `first` come from the KV cache (scoring a reply after a cached prompt)."""
        self.truncate(reusable(self.tokens, tokens[: start + 1]))
        first = len(self.tokens)
        return first, self.feed(list(tokens[first:]))
