"""The base backend: a GGUF model run by llama-cpp-python.

Only the model loading, the tokenizer and one decode call per step come from
llama.cpp; sampling is ours. Logits are read zero-copy from llama.cpp's buffer
(`Llama.scores` stays zeros with logits_all=False in 0.3.x): the returned view
is overwritten by the next decode, so callers use it before stepping again.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..config import DEFAULTS
from ..errors import ContextOverflowError, ModelFileError
from ..gguf import GGUFInfo, read_gguf
from .units import reusable


def default_threads() -> int:
    """Physical-ish core count: llama.cpp slows down past the real cores."""
    n = os.cpu_count() or 2
    return max(1, n // 2) if n > 4 else n


def _check_template_compiles(path: Path, template) -> None:
    """llama-cpp-python compiles the GGUF's chat template when it loads the model, and a template
    that does not compile stops the load with a jinja2 error: name the file and the key instead."""
    from ..chat import compile_error

    why = compile_error(template) if isinstance(template, str) and template else None
    if why:
        raise ModelFileError(
            f"the chat template in GGUF file '{path}' (tokenizer.chat_template) does not compile "
            f"({why}); llama-cpp-python compiles it when loading, so the file cannot be used as is: "
            "re-export it with a working template"
        )


class LlamaBase:
    """The base model: `prefill(tokens)` and `step(token)` return last-position logits."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = DEFAULTS["ctx"],
        threads: int | None = None,
        gpu_layers: int = 0,
        validated: bool = False,
        info: GGUFInfo | None = None,
        tap: int | list[int] | None = None,
    ):
        """`tap`: also keep the output of layer `tap` at every position (`hidden`), for ARM
        heads that run on the base's own trunk (backends.capture); a list: each of those layers
        (`hidden_at`), the first one being `hidden`."""
        import llama_cpp

        from .llama_log import route_llama_log

        route_llama_log()  # llama.cpp's own lines go to logging ("edge_genarm.llama"), not the terminal
        self.path = Path(path)
        # the header read (and checked) in Python before llama.cpp can abort; `info`: already read
        self.info = info if info is not None else read_gguf(self.path)
        _check_template_compiles(self.path, self.info.get("tokenizer.chat_template"))
        if not validated:
            from .probe import probe_gguf

            probe_gguf(self.path)
        trained_ctx = int(self.info.arch_get("context_length", n_ctx) or n_ctx)
        self.n_ctx_train = trained_ctx
        n_ctx = min(int(n_ctx), trained_ctx) if n_ctx else trained_ctx
        threads = threads or default_threads()
        self.capture, self.taps = None, []
        if tap is not None:
            from .capture import LayerCapture

            self.taps = [int(t) for t in (tap if isinstance(tap, (list, tuple)) else [tap])]
            nodes = [f"l_out-{t}" for t in self.taps]
            self.capture = LayerCapture(nodes, int(self.info.arch_get("embedding_length")), n_ctx)
        try:
            from .capture import loading

            with self.capture.installed() if self.capture else loading():
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=min(512, n_ctx),
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=gpu_layers,
                    logits_all=False,
                    verbose=False,
                )
        except Exception as e:  # llama-cpp-python raises ValueError, RuntimeError, jinja2 errors...
            raise ModelFileError(
                f"llama.cpp could not load '{self.path}' ({type(e).__name__}: {str(e)[:200]}): "
                "re-download or re-export it"
            ) from None
        # llama.cpp pads a small context up (to 256): keep the one asked for, so `--ctx 8` means 8
        self.n_ctx = min(self.llm.n_ctx(), n_ctx)
        self.n_vocab = self.llm.n_vocab()
        self.threads, self.gpu_layers = threads, gpu_layers
        self._ctx, self._batch = self.llm._ctx, self.llm._batch
        self._n_batch = self.llm.n_batch
        self._get_logits = llama_cpp.llama_get_logits_ith
        self._ctx_ptr = self._ctx.ctx
        self.tokens: list[int] = []
        self.n_exact = 0  # leading cached positions computed in batches of >= 2 tokens (see trim_for)
        self.last_prefill_evaluated = 0  # tokens the last prefill actually ran (the rest came from cache)

    # -- tokenizer (the GGUF's own vocabulary) ------------------------------
    @property
    def bos_id(self) -> int | None:
        i = self.info.get("tokenizer.ggml.bos_token_id")
        return None if i is None else int(i)

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.llm.token_eos()}
        eot = self.info.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            ids.add(int(eot))
        return {i for i in ids if i >= 0}

    @property
    def add_bos(self) -> bool:
        return bool(
            self.info.get("tokenizer.ggml.add_bos_token", self.info.get("tokenizer.ggml.model") == "llama")
        )

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add, special=special)

    def token_bytes(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=False)

    # -- evaluation -----------------------------------------------------------
    def reset(self) -> None:
        self._ctx.kv_cache_clear()
        self.tokens = []
        self.n_exact = 0

    def _decode(self, new: list[int]) -> np.ndarray:
        n_past = len(self.tokens)
        if n_past + len(new) > self.n_ctx:
            raise ContextOverflowError(
                f"{n_past + len(new)} tokens do not fit the {self.n_ctx}-token context of "
                f"'{self.path.name}': shorten the prompt, lower max tokens, or raise --ctx "
                f"(trained length {self.n_ctx_train})"
            )
        if self.capture:
            self.capture.start(n_past)
        for i, j in _chunks(len(new), self._n_batch):
            self._batch.set_batch(batch=new[i:j], n_past=n_past + i, logits_all=False)
            self._ctx.decode(self._batch)
        if self.capture:
            self.capture.finish(len(new))
        if len(new) >= 2 and n_past == self.n_exact:
            self.n_exact = n_past + len(new)
        self.tokens.extend(new)
        ptr = self._get_logits(self._ctx_ptr, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Evaluate `tokens`, reusing the KV cache for the prefix shared with the last call."""
        keep = reusable(self.tokens, tokens)
        self._truncate(keep)
        self.last_prefill_evaluated = len(tokens) - keep
        return self._decode(list(tokens[keep:]))

    def trim_for(self, tokens: list[int]) -> None:
        """Drop the cached positions that a cold prefill of `tokens` would compute differently, so
        that the next `prefill(tokens)` gives its logits bit for bit: positions not shared with
        `tokens`, positions decoded one token at a time (llama.cpp's one-token path rounds
        differently from its batched one, up to ~1 nat on a Q4 model; batches of any size >= 2
        agree exactly), and enough that at least two tokens are evaluated."""
        self._truncate(reusable(self.tokens, tokens, self.n_exact))

    def _truncate(self, keep: int) -> None:
        if keep < len(self.tokens):
            self._ctx.kv_cache_seq_rm(-1, keep, -1)
            self.tokens = self.tokens[:keep]
            self.n_exact = min(self.n_exact, keep)

    def step(self, token: int) -> np.ndarray:
        return self._decode([token])

    @property
    def hidden(self) -> np.ndarray:
        """The (first) tapped layer's output at every cached position, (positions, width)."""
        return self.hidden_at(self.taps[0])

    def hidden_at(self, layer: int) -> np.ndarray:
        """Tapped layer `layer`'s output at every cached position, (positions, width)."""
        if self.capture is None or int(layer) not in self.taps:
            raise ValueError(f"layer {layer} is not tapped (taps: {getattr(self, 'taps', [])})")
        return self.capture.rows[f"l_out-{int(layer)}"][: len(self.tokens)]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[i, j) slices of at most `size` covering n positions, none of one position when n > 1
    (a one-token decode rounds differently: see LlamaBase.trim_for)."""
    bounds = list(range(0, n, size)) + [n]
    if n > 1 and size > 2 and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return list(zip(bounds[:-1], bounds[1:]))
