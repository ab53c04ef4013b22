"""The engine: a loaded base and its ARM units, run for one request at a time.

The `Engine` holds what is loaded (the base, the forward units that compute the ARMs'
logits, their KV caches, the default weights, the chat template) and turns a prompt into a
`Generation` (generation.py), which runs the decode loop. Per step one base decode and one
forward per unit with an active ARM, overlapped in threads (llama.cpp and onnxruntime both
release the GIL). Every per-request value lives in the Generation; the engine's caches are
held by one Generation at a time (`hold`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from . import guidance as G
from .backends.llama_base import LlamaBase
from .backends.mix import MIX
from .chat import check_messages, render
from .config import DEFAULTS
from .errors import ConfigError, ContextOverflowError, EdgeGenarmError
from .fastmode import default_exact, gate_tau
from .generation import Completion, Generation, StepRecord, Timings
from .nudge import NudgeConfig, NudgeTable

log = logging.getLogger("edge_genarm")

__all__ = ["Completion", "Engine", "Generation", "StepRecord", "Timings"]

Runs = tuple[list, list]  # (label, unit, active names) overlapped with the base / run after it


class Engine:
    """A loaded bundle: one base, any number of ARMs with run-time weights.

    `arms` maps a name to an ARM backend (`prefill(tokens)`/`step(token)` -> logits), each
    with its forward `unit` (backends.units): a lone ARM is its own unit, ARMs that share a
    trunk share one, whose trunk runs once per step for all of its active heads.
    """

    def __init__(
        self,
        base: LlamaBase,
        arms: dict,
        weights: dict[str, float],
        chat_template: str | None = None,
        parallel: bool = True,
        nudge_table: NudgeTable | None = None,
        mix=None,
    ):
        self.base, self.arms = base, arms
        self.weights: dict[str, float] = {n: 0.0 for n in arms}  # defaults for requests
        self.set_weights(weights)
        self.chat_template = chat_template or base.info.get("tokenizer.chat_template") or None
        self.units = list({id(a.unit): a.unit for a in arms.values()}.values())
        # One worker per unit: a unit's calls stay in order even when a reply was
        # interrupted (Ctrl+C) while its step was still running.
        self._pools = {_label(u): ThreadPoolExecutor(max_workers=1) for u in self.units} if parallel else {}
        self.nudge_table: NudgeTable | None = nudge_table  # the bundle's (plan.LoadPlan), if any
        self.dry_breakers = _Breakers(lambda t: self.base.token_bytes(t))
        # the fast mode's restricted ARM LM head always scores these (generation.fast_forward)
        self.eos_candidates = np.array(sorted(base.eos_ids), dtype=np.int64)
        self.mix = mix  # the pack's mix head (backends.mix.MixUnit): the fast mode's one head for any weights
        self._mix_refusals: set[str] = set()  # the reasons the mix head refused weights, logged once each
        self._busy, self._busy_lock = False, threading.Lock()

    # -- configuration ------------------------------------------------------
    def check_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """`weights` over the defaults, validated: unknown names, and weights G.check_weight refuses, are errors."""
        for name, w in weights.items():
            if name not in self.arms:
                have = ", ".join(self.arms) or "none loaded"
                raise ConfigError(f"unknown ARM '{name}': loaded ARMs are {have}")
            G.check_weight(name, w)  # a finite number in [-G.MAX_WEIGHT, G.MAX_WEIGHT]
        return {n: float(weights.get(n, self.weights.get(n, 0.0))) for n in self.arms}

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the default ARM weights (later requests use them; a request's `weights=` does not)."""
        self.weights = self.check_weights(weights)

    # -- prompts ------------------------------------------------------------
    @property
    def prompt_format(self) -> str:
        """How prompts are written: "template" (the chat template) or "raw" (none: format_prompt)."""
        return "template" if self.chat_template else "raw"

    def format_prompt(self, prompt: str | list[dict], raw: bool = False, system: str | None = None) -> str:
        """The text a prompt is sent as.

        With a chat template (`prompt_format` "template"): messages, or a string as one user
        message, through the template; `raw=True` sends a string as is. Without one ("raw": the
        GGUF has none and none was given), a string is sent as is (with `system`, both become
        messages) and messages become a plain transcript, one "System: ...", "User: ..." or
        "Assistant: ..." line each, ending with "Assistant:". No chat format (ChatML or another)
        is assumed for a model that may not have been trained on one.
        """
        if isinstance(prompt, str) and (raw or not self.chat_template and system is None):
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [
                m for m in messages if m.get("role") != "system"
            ]
        if not self.chat_template:
            return _transcript(messages)
        info = self.base.info
        toks = info.tokens

        def tok(key):
            i = info.get(f"tokenizer.ggml.{key}_token_id")
            return toks[i] if i is not None and 0 <= i < len(toks) else ""

        return render(self.chat_template, messages, bos_token=tok("bos"), eos_token=tok("eos"))

    def tokenize_prompt(self, text: str) -> list[int]:
        ids = self.base.tokenize(text)
        if not ids:
            raise ConfigError("the prompt is empty: give some text")
        bos = self.base.bos_id
        if self.base.add_bos and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the template already wrote BOS
        return ids

    def prompt_ids(self, prompt, raw: bool = False, system: str | None = None) -> list[int]:
        """A prompt's token ids: a list of ids as given, else `format_prompt` then `tokenize_prompt`."""
        if _is_token_list(prompt):
            return list(prompt)
        return self.tokenize_prompt(self.format_prompt(prompt, raw, system))

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """Tokens a reply may have: `max_tokens`, or fewer when the context fills first (None:
        until it is full). A prompt that fills the context is a ContextOverflowError."""
        n_ctx = self.base.n_ctx
        if n_prompt >= n_ctx:
            raise ContextOverflowError(
                f"the prompt is {n_prompt} tokens but the context holds {n_ctx}: shorten it, or "
                f"load with a larger context (--ctx, up to {self.base.n_ctx_train})"
            )
        room = n_ctx - n_prompt
        if max_tokens is not None and max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {max_tokens}")
        return room if max_tokens is None else min(max_tokens, room)

    # -- generation ---------------------------------------------------------
    def generate(self, prompt, **kw) -> Completion:
        gen = self.stream(prompt, **kw)
        records = list(gen)
        text = "".join(r.text for r in records)
        records = [r for r in records if r.token >= 0]  # a token -1 record only carries held text
        return Completion(
            text, [r.token for r in records], gen.finish_reason, records, gen.timings, gen.nudge, gen.weights
        )

    def stream(
        self,
        prompt,
        *,
        max_tokens: int | None = DEFAULTS["max_tokens"],
        sampling: G.SamplingParams | None = None,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
        weights: dict[str, float] | None = None,
        guidance: bool = True,
        raw: bool = False,
        system: str | None = None,
        on_step=None,
        ignore_eos: bool = False,
        nudge: NudgeConfig | None = None,
        explain: bool = False,
        exact: bool | None = None,
        **sampling_kw,
    ) -> Generation:
        """A Generation: iterate it for one StepRecord per generated token.

        `weights` apply to this request only, over the engine's defaults (`set_weights`);
        `guidance=False` runs the base alone. `nudge` turns on entropy-triggered nudging
        (nudge.py) with the bundle's nudge table when it has one. `on_step(i, scores, params)`
        sees each step's scores (what the sampler draws from). `explain` records in each
        StepRecord the token the base alone would have drawn (`base_pick`). `exact` (default:
        fastmode.DEFAULT_EXACT) runs every ARM at every step; `exact=False` skips the ARMs where
        the base is confident (fastmode.py) and records which steps were guided. Bad arguments
        raise here, before any model runs. One Generation runs at a time: iterate it to the
        end, or `close()` it, before iterating the next.
        """
        params = sampling or G.SamplingParams(**sampling_kw)
        w = self.check_weights(weights or {})
        active = {n: v for n, v in w.items() if v != 0.0} if guidance else {}
        if params.dry_multiplier is None:  # "auto": DRY on for guided or nudged requests only
            params = replace(params, dry_multiplier=G.auto_dry(active, nudge is not None))
        if nudge is not None and self.nudge_table is None and not self.arms:
            raise ConfigError(
                "nudging needs a nudge table (`edge-genarm export nudges`) or ARMs to score "
                "candidates: this bundle has neither"
            )
        if nudge is not None and nudge.rollouts and not active:
            raise ConfigError(
                "nudge rollouts are scored by the ARMs, and none is active: give an ARM a weight "
                "(--arm NAME=W), or set rollouts to 0"
            )
        mixed = self.mix.plan(active) if nudge is None and self.mix is not None else None
        if exact is None:  # the default mode: fast where the pack's mix head serves these weights
            exact = default_exact(isinstance(mixed, tuple))
        fast_tau = gate_tau(exact, bool(active))
        ids = self.prompt_ids(prompt, raw, system)
        runs, run_active, alpha = self.units_for(active), active, None
        if fast_tau is not None and mixed is not None:
            if isinstance(mixed, str):  # said once per reason: a server would repeat it at every request
                say = log.debug if mixed in self._mix_refusals else log.warning
                self._mix_refusals.add(mixed)
                say("fast mode: %s; the separate ARMs run instead of the mix head", mixed)
            else:  # one head for these weights: log p_base + S * log pi_alpha (backends.mix)
                alpha, strength = mixed
                run_active, runs = {MIX: strength}, ([], [(MIX, self.mix, [MIX])])
        return Generation(
            self, ids, self.budget(len(ids), max_tokens), params=params, seed=seed, weights=w,
            active=run_active, runs=runs, stop=stop, on_step=on_step,
            eos=set() if ignore_eos else self.base.eos_ids, nudge=nudge, explain=explain, fast_tau=fast_tau,
            mix_alpha=alpha,
        )  # fmt: skip

    @contextmanager
    def hold(self) -> Iterator[None]:
        """The engine's KV caches for one user at a time: a Generation holds them while it runs
        (from its first token until it ends, is closed or is dropped); a second one is refused
        rather than interleaved, since each would move the caches under the other."""
        with self._busy_lock:
            if self._busy:
                raise EdgeGenarmError(
                    "this engine is already generating: finish or close the first generation (iterate "
                    "it to the end, or call its close()) before starting another; the engine has one "
                    "set of KV caches (load a second engine to run two at once)"
                )
            self._busy = True
        try:
            yield
        finally:
            self._busy = False

    # -- forwards -----------------------------------------------------------
    def units_for(self, active) -> Runs:
        """The units with an active ARM, as (label, unit, active names): those that overlap the
        base's forward in their threads, and those that run after it (no threads, or the unit
        reads the base's own layer: `after_base`)."""
        early, late = [], []
        for unit in self.units:
            names = [n for n in unit.names if n in active]
            if names:
                run = (_label(unit), unit, names)
                (early if self._pools and not unit.after_base else late).append(run)
        return early, late

    def forward(self, kind: str, arg, runs: Runs, t: Timings | None = None):
        """`kind` ("prefill" tokens / "step" token) on the base and on the units of `runs`
        (`units_for`). Returns (base logits, {name: ARM logits}); the seconds spent are added
        to `t` when given (a step's forwards; the caller times a prompt's forward whole)."""
        t0 = time.perf_counter()
        early, late = runs
        futures = [
            (label, self._pools[label].submit(_run, unit, kind, arg, names)) for label, unit, names in early
        ]
        tb = time.perf_counter()
        base_logits = getattr(self.base, kind)(arg)
        base_s = time.perf_counter() - tb
        arm_logits = {}
        for label, future in futures:
            out, dt = future.result()
            arm_logits.update(out)
            if t is not None:
                t.arm_s[label] = t.arm_s.get(label, 0.0) + dt
        arm_logits.update(self.forward_units(kind, arg, late, t))
        if t is not None:
            t.base_s += base_s
            t.forward_s += time.perf_counter() - t0
        return base_logits, arm_logits

    def forward_units(self, kind: str, arg, run: list, t: Timings | None = None, ids=None) -> dict:
        """`kind` on the units of `run` alone, one after another (the base is not touched):
        {name: ARM logits}. Fast mode's catch-up is `forward_units("prefill", seq, ...)`: each
        unit evaluates the positions it skipped, in one batch (units.reusable). `ids`: only
        these tokens' logits are needed (a unit may return a units.Partial)."""
        arm_logits = {}
        for label, unit, names in run:
            out, dt = _run(unit, kind, arg, names, ids)
            arm_logits.update(out)
            if t is not None:
                t.arm_s[label] = t.arm_s.get(label, 0.0) + dt
        return arm_logits

    def trim_for(self, seq: list[int], runs: Runs) -> None:
        """Start a seeded request from cache entries that a cold prefill would compute bit for bit
        (LlamaBase.trim_for): the same request and seed then give the same text whatever ran
        before it. A chat's earlier turns are still reused, but its last reply (decoded one token
        at a time) is evaluated again, in one batch; requests without a seed reuse everything."""
        self.base.trim_for(seq)
        for _, unit, names in runs[0] + runs[1]:
            unit.trim_for(seq, names)

    def reset(self) -> None:
        """Empty every KV cache (base, ARMs, shared trunks): the next request evaluates its whole
        prompt afresh. A cached prefix is evaluated in other batches than a fresh prefill, which
        changes the numerics slightly (FACTS.md), so independent prompts that must give the same
        result however they are grouped (batch, eval, Ray) start from here."""
        self.base.reset()
        for unit in self.units:
            unit.reset()
        if self.mix is not None:
            self.mix.reset()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)


class _Breakers:
    """Token ids DRY never matches across (their text holds a newline, ':', '"' or '*'), looked
    up as the history needs them: DRY reads only the newest tokens, so no vocabulary scan."""

    MARKS = (b"\n", b":", b'"', b"*")

    def __init__(self, token_bytes):
        self._bytes, self._seen = token_bytes, {}

    def __contains__(self, tok) -> bool:
        hit = self._seen.get(tok)
        if hit is None:
            b = self._bytes(int(tok))
            hit = self._seen[tok] = any(m in b for m in self.MARKS)
        return hit


def _label(unit) -> str:
    """A unit's name in timings: its ARM's name, or its heads' names joined by '+'."""
    return "+".join(unit.names)


def _run(unit, kind: str, arg, names, ids=None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = getattr(unit, kind)(arg, names) if ids is None else getattr(unit, kind)(arg, names, ids=ids)
    return out, time.perf_counter() - t0


def _transcript(messages: list[dict]) -> str:
    """Messages as a plain transcript for a model without a chat template; one user message alone
    is its text, as a string prompt is (export.sources.RAW_TEMPLATE trains on the same text)."""
    messages = check_messages(messages)
    if len(messages) == 1 and messages[0]["role"] == "user" and isinstance(messages[0]["content"], str):
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, (int, np.integer)) for i in x)
