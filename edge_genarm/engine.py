"""The decoding loop: base + ARMs -> combined scores -> sampled token -> text.

Per step: one base decode and one decode per active ARM (overlapped in threads:
llama.cpp and onnxruntime both release the GIL), log-softmax of each, the
weighted sum, the sampler, and a StepRecord for whoever is listening.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import guidance as G
from .backends.llama_base import LlamaBase, default_threads
from .backends.onnx_arm import OnnxARM
from .bundle import Bundle, check_arm_tokens, load_arm_tokens, parse_arm_spec, resolve_arm
from .chat import CHATML, render
from .errors import ConfigError, ContextOverflowError, EdgeGenarmError
from .nudge import NudgeConfig, NudgeReport, NudgeTable, apply_site, is_site
from .text import TextStream

log = logging.getLogger("edge_genarm")


@dataclass
class StepRecord:
    """One generated token and why it was chosen."""

    token: int
    text: str  # text released by this step (may be "" while UTF-8 or a stop is pending)
    base_logprob: float  # log p_base(token)
    combined_logprob: float  # log-softmax of the combined scores at token (before temperature)
    entropy: float  # entropy (nats) of the base's raw next-token distribution
    arm_contrib: dict[str, float] = field(default_factory=dict)  # name -> w * log p_arm(token)
    fallback: list[str] = field(default_factory=list)  # ARMs skipped this step (NaN/inf logits)
    site: bool = False  # a nudge site (entropy trigger fired)
    nudged_from: int | None = None  # the token sampling chose before the nudge changed it


@dataclass
class _Request:
    """Per-request state of the loop."""

    params: G.SamplingParams
    rng: np.random.Generator
    active: dict[str, float]
    stream: TextStream
    on_step: object
    eos: set[int]
    nudge: NudgeConfig | None = None
    report: NudgeReport | None = None
    last_site: int | None = None


@dataclass
class Timings:
    steps: int = 0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    base_s: float = 0.0
    arm_s: dict[str, float] = field(default_factory=dict)
    forward_s: float = 0.0  # wall time of the (overlapped) forward section
    total_s: float = 0.0  # wall time of the decode steps

    def summary(self) -> dict:
        n = max(1, self.steps)
        other = self.total_s - self.forward_s
        return {
            "tokens": self.steps,
            "tok_per_s": self.steps / self.total_s if self.total_s else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "prompt_ms": 1e3 * self.prompt_s,
            "base_ms": 1e3 * self.base_s / n,
            "arm_ms": {k: 1e3 * v / n for k, v in self.arm_s.items()},
            "python_ms": 1e3 * other / n,
        }


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    records: list[StepRecord]
    timings: Timings
    nudge: NudgeReport | None = None


class Engine:
    """A loaded bundle: one base, any number of ARMs with run-time weights."""

    def __init__(
        self,
        base: LlamaBase,
        arms: dict[str, OnnxARM],
        weights: dict[str, float],
        chat_template: str | None = None,
        parallel: bool = True,
    ):
        self.base, self.arms = base, arms
        self.weights: dict[str, float] = {}
        self.set_weights(weights)
        self.chat_template = chat_template or base.info.get("tokenizer.chat_template") or None
        # One worker per ARM: an ARM's calls stay in order even when a reply was
        # interrupted (Ctrl+C) while its step was still running.
        self._pools = {n: ThreadPoolExecutor(max_workers=1) for n in arms} if parallel else {}
        self.last_timings = Timings()
        self.nudge_table: NudgeTable | None = None
        self.last_nudge_report: NudgeReport | None = None

    # -- configuration ------------------------------------------------------
    def set_weights(self, weights: dict[str, float]) -> None:
        """Change ARM weights between requests; unknown names are an error."""
        for name, w in weights.items():
            if name not in self.arms:
                have = ", ".join(self.arms) or "none loaded"
                raise ConfigError(f"unknown ARM '{name}': loaded ARMs are {have}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
                raise ConfigError(f"ARM weight for '{name}' must be a finite number, got {w!r}")
        self.weights = {n: float(weights.get(n, self.weights.get(n, 0.0))) for n in self.arms}

    # -- prompts ------------------------------------------------------------
    def format_prompt(self, prompt: str | list[dict], raw: bool = False, system: str | None = None) -> str:
        """Messages (or a string, as one user message) through the chat template."""
        if isinstance(prompt, str) and raw:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + [
                m for m in messages if m.get("role") != "system"
            ]
        info = self.base.info
        toks = info.tokens

        def tok(key):
            i = info.get(f"tokenizer.ggml.{key}_token_id")
            return toks[i] if i is not None and 0 <= i < len(toks) else ""

        return render(self.chat_template or CHATML, messages, bos_token=tok("bos"), eos_token=tok("eos"))

    def tokenize_prompt(self, text: str) -> list[int]:
        ids = self.base.tokenize(text)
        if not ids:
            raise ConfigError("the prompt is empty: give some text")
        bos = self.base.bos_id
        if self.base.add_bos and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the template already wrote BOS
        return ids

    # -- generation ---------------------------------------------------------
    def generate(self, prompt, **kw) -> Completion:
        records, text = [], []
        for rec in self.stream(prompt, **kw):
            records.append(rec)
            text.append(rec.text)
        records = [r for r in records if r.token >= 0]  # a token -1 record only carries held text
        return Completion(
            "".join(text),
            [r.token for r in records],
            self._finish,
            records,
            self.last_timings,
            self.last_nudge_report,
        )

    def stream(
        self,
        prompt,
        *,
        max_tokens: int | None = 256,
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
        **sampling_kw,
    ) -> Iterator[StepRecord]:
        """Yield one StepRecord per generated token. `on_step(i, scores, params)` sees each step's scores.

        `weights` changes the engine's ARM weights (they stay for later calls, like
        `set_weights`); `guidance=False` runs the base alone without touching them.
        `nudge` turns on entropy-triggered nudging (nudge.py) with the bundle's
        nudge table when it has one; `self.last_nudge_report` then says what it did.
        """
        if nudge is not None and self.nudge_table is None and not self.weights:
            raise ConfigError(
                "nudging needs a nudge table (`edge-genarm export nudges`) or ARMs to score "
                "candidates: this bundle has neither"
            )
        params = sampling or G.SamplingParams(**sampling_kw)
        if weights:
            self.set_weights(weights)
        active = {n: w for n, w in self.weights.items() if w != 0.0} if guidance else {}
        if nudge is not None and nudge.rollouts and not active:
            raise ConfigError(
                "nudge rollouts are scored by the ARMs, and none is active: give an ARM a weight "
                "(--arm NAME=W), or set rollouts to 0"
            )
        ids = (
            prompt
            if _is_token_list(prompt)
            else self.tokenize_prompt(self.format_prompt(prompt, raw, system))
        )
        budget = self._budget(len(ids), max_tokens)
        req = _Request(
            params,
            np.random.default_rng(seed),
            active,
            TextStream(stop),
            on_step,
            set() if ignore_eos else self.base.eos_ids,
            nudge,
            NudgeReport() if nudge is not None else None,
        )
        self.last_nudge_report = req.report
        yield from self._loop(ids, budget, req)

    def _budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """Prompt too long: an error. Prompt + max_tokens too long: generate until the context is full."""
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

    def _loop(self, ids, budget, req: _Request):
        active, stream, eos = req.active, req.stream, req.eos
        seq = list(ids)
        t = self.last_timings = Timings(prompt_tokens=len(ids), arm_s={n: 0.0 for n in active})
        self._finish = "length"
        t0 = time.perf_counter()
        logits = self._forward(lambda m: m.prefill(ids), active, t, count=False)
        t.prompt_s = time.perf_counter() - t0
        for i in range(budget):
            t1 = time.perf_counter()
            scores, rec = self._combine(logits, active)
            if req.params.repeat_penalty != 1.0 and req.params.repeat_last_n:
                G.repeat_penalty(scores, seq[-req.params.repeat_last_n :], req.params.repeat_penalty)
            if req.on_step is not None:
                req.on_step(i, scores, req.params)
            tok = self._choose(i, scores, rec, req, seq)
            seq.append(tok)
            rec.token = tok
            self._fill_record(rec, tok, active)
            rec.combined_logprob = (
                (float(scores[tok]) - G.logsumexp(scores)) if self._arm else rec.base_logprob
            )
            if tok in eos:
                self._finish = "stop"
                t.total_s += time.perf_counter() - t1
                break
            rec.text = stream.push(self.base.token_bytes(tok))
            t.steps += 1
            done = stream.stopped or i == budget - 1
            if not done:
                logits = self._forward(lambda m, tok=tok: m.step(tok), active, t)
            t.total_s += time.perf_counter() - t1
            if done:
                rec.text += stream.flush()
                self._finish = "stop" if stream.stopped else "length"
                yield rec
                return
            yield rec
        tail = stream.flush()
        if tail:
            yield StepRecord(-1, tail, 0.0, 0.0, 0.0)

    def _choose(self, i: int, scores, rec: StepRecord, req: _Request, seq: list[int]) -> int:
        """Sample; at a nudge site, let the nudge change the pick (same uniform draw)."""
        u = req.rng.random()
        tok = G.sample_u(scores, req.params, u)
        if req.nudge is None:
            return tok
        req.report.steps += 1
        if not is_site(i, rec.entropy, req.last_site, req.nudge):
            return tok
        req.last_site = i
        req.report.sites.append(i)
        rec.site = True
        table = self.nudge_table
        direction = table.direction_for(seq[-req.nudge.context :]) if table is not None else None
        ranked: list[int] = []
        forced, biased = apply_site(self._base_lp, scores, req.nudge, direction, ranked)
        new = forced if forced is not None else G.sample_u(biased, req.params, u)
        if req.nudge.rollouts and self._arm:
            new = self._verify(i, seq, ranked[: req.nudge.rollouts], req)
        if new != tok:
            req.report.changes.append((i, tok, new))
            rec.nudged_from = tok
        return new

    def _verify(self, i: int, seq: list[int], cands: list[int], req: _Request) -> int:
        """Forward-only verification: the candidate whose rollout has the highest summed ARM term.

        Each candidate c is fed, then followed greedily (argmax of the combined scores) until
        the rollout holds `rollout_len` tokens or ends in EOS; its score is the sum of
        sum_i w_i log p_arm_i over those tokens. Every rollout has the same horizon, so the
        sums compare like with like. The models are put back on `seq` afterwards (their KV
        caches keep the shared prefix; one token is re-evaluated).
        """
        active, t, horizon = req.active, self.last_timings, req.nudge.rollout_len
        saved = (self._arm, self._base_lp)

        def arm_term(tok: int) -> float:
            return sum(active[n] * (float(z[tok]) - lse) for n, (z, lse) in self._arm.items() if tok < z.size)

        results = []
        for c in cands:
            self._arm, self._base_lp = saved
            score, tok = arm_term(c), c
            for j in range(horizon - 1):
                if tok in req.eos:
                    break
                # the first forward feeds c after the shared prefix; the rest are single steps
                call = (lambda m, f=seq + [c]: m.prefill(f)) if j == 0 else (lambda m, tk=tok: m.step(tk))
                logits = self._forward(call, active, t)
                req.report.rollout_tokens += 1
                combined, _ = self._combine(logits, active)
                tok = int(np.argmax(combined))
                score += arm_term(tok)
            results.append((c, score))
        self._forward(lambda m: m.prefill(seq), active, t)  # back to the real sequence
        self._arm, self._base_lp = saved
        req.report.rollouts.append((i, results))
        return max(results, key=lambda r: r[1])[0]

    def _forward(self, call, active, t: Timings, count: bool = True):
        """Run `call` on the base and on each active ARM, overlapped when a pool exists."""
        t0 = time.perf_counter()
        futures = {}
        if self._pools:
            futures = {n: self._pools[n].submit(_timed, call, self.arms[n]) for n in active}
        tb = time.perf_counter()
        base_logits = call(self.base)
        t.base_s += time.perf_counter() - tb
        arm_logits = {}
        for n in active:
            out, dt = futures[n].result() if futures else _timed(call, self.arms[n])
            arm_logits[n] = out
            t.arm_s[n] += dt
        if count:
            t.forward_s += time.perf_counter() - t0
        else:
            t.base_s, t.arm_s = 0.0, {n: 0.0 for n in active}
        return base_logits, arm_logits

    def _combine(self, logits, active) -> tuple[np.ndarray, StepRecord]:
        """scores = log p_base + sum_i w_i (z_i - logZ_i), z_i the ARM's raw logits.

        Only logZ_i is computed for each ARM (not its whole log-softmax): the
        sum of w_i * logZ_i is one scalar subtracted at the end.
        """
        base_logits, arm_logits = logits
        base_lp, h = G.log_softmax_entropy(base_logits)
        if h != h:  # NaN entropy <=> a NaN or +inf among the logits
            raise EdgeGenarmError(
                f"the base model '{self.base.path.name}' produced NaN/inf logits: the GGUF may be "
                "corrupt or GPU offload broken; re-export it or try --gpu-layers 0"
            )
        rec = StepRecord(-1, "", 0.0, 0.0, h)
        self._arm, self._base_lp = {}, base_lp
        if not active:
            return base_lp, rec
        v = base_lp.size
        for n in active:
            z = arm_logits[n][:v]
            lse = G.logsumexp(z)
            if not np.isfinite(lse):
                log.warning("ARM '%s' produced NaN/inf logits; skipping its guidance for this step", n)
                rec.fallback.append(n)
                continue
            self._arm[n] = (z, lse)
        names = list(self._arm)
        scores = G.combine(base_lp, [_pad(self._arm[n][0], v) for n in names], [active[n] for n in names])
        scores -= np.float32(sum(active[n] * self._arm[n][1] for n in names))
        short = min((self._arm[n][0].size for n in names), default=v)
        if short < v:
            scores[short:] = -np.inf  # ids the ARM does not have: not real shared tokens
        return scores, rec

    def _fill_record(self, rec: StepRecord, tok: int, active) -> None:
        rec.base_logprob = float(self._base_lp[tok])
        for n, (z, lse) in self._arm.items():
            rec.arm_contrib[n] = active[n] * (float(z[tok]) - lse) if tok < z.size else float("-inf")

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)


def _timed(call, model):
    t0 = time.perf_counter()
    out = call(model)
    return out, time.perf_counter() - t0


def _pad(lp: np.ndarray, v: int) -> np.ndarray:
    if lp.size >= v:
        return lp
    out = np.zeros(v, dtype=np.float32)
    out[: lp.size] = lp
    return out


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, (int, np.integer)) for i in x)


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def overlap_pays(base_path, arm_paths) -> bool:
    """Overlapping forwards pays when the ARMs cost about as much as the base.

    Measured on 2 cores (bench): a 25 MB ARM beside a 98 MB base ran 0.72x as fast
    overlapped (the base lost a core for a short ARM step); 170 MB and 540 MB ARMs
    ran 1.19x and 1.26x faster overlapped. Rule: overlap when the ARM files weigh
    at least half the base's.
    """
    if not arm_paths:
        return False
    arm_bytes = sum(p.stat().st_size for ap in arm_paths for p in ap.parent.glob(ap.name + "*"))
    return arm_bytes >= 0.5 * base_path.stat().st_size


def split_threads(cores: int, n_arms: int, parallel: bool) -> tuple[int, int]:
    """(base threads, threads per ARM). Sequential: every forward gets all cores.
    Overlapped: the cores are split so that llama.cpp's and onnxruntime's threads
    do not fight over the same cores (FACTS.md: spinning threads on 2 cores)."""
    if not parallel or n_arms == 0:
        return cores, cores
    arm = max(1, cores // (n_arms + 1))
    return max(1, cores - arm * n_arms), arm


def load(
    weights: str,
    arms: list[str] | dict[str, float] | None = None,
    *,
    n_ctx: int = 4096,
    threads: int | None = None,
    gpu_layers: int = 0,
    arm_device: str = "cpu",
    arm_threads: int | None = None,
    parallel: bool | None = None,
    chat_template: str | None = None,
    verify: bool = True,
) -> Engine:
    """Load a bundle folder (or a bare .gguf) and the chosen ARMs.

    `arms`: None loads every ARM of the bundle at its default weight; a list of
    "name=weight" / "path.onnx=weight" specs, or a {name: weight} dict, chooses.
    `parallel` overlaps base and ARM forwards in threads, with the cores split;
    None decides by size (see `overlap_pays`).
    """
    bundle = Bundle.open(weights, verify=verify)
    specs = _arm_specs(bundle, arms)
    if parallel is None:
        paths = [resolve_arm(bundle, n).path for n, _ in specs]
        parallel = overlap_pays(bundle.base_path, paths)
    auto_base, auto_arm = split_threads(default_threads(), len(specs), parallel)
    base = LlamaBase(bundle.base_path, n_ctx=n_ctx, threads=threads or auto_base, gpu_layers=gpu_layers)
    entries = []
    for name, weight in specs:
        entry = resolve_arm(bundle, name)
        check_arm_tokens(
            entry.name, load_arm_tokens(entry.tokens_path, entry.name), base.info.tokens, base.path.name
        )
        entries.append((entry, weight))
    # Sessions are created side by side: reading a large ONNX file dominates a warm start.
    with ThreadPoolExecutor(max_workers=max(1, len(entries))) as pool:
        futures = [
            pool.submit(OnnxARM, e.path, e.name, device=arm_device, threads=arm_threads or auto_arm)
            for e, _ in entries
        ]
        loaded = {e.name: f.result() for (e, _), f in zip(entries, futures)}
    w = {e.name: e.default_weight if weight is None else weight for e, weight in entries}
    engine = Engine(base, loaded, w, chat_template=chat_template or bundle.chat_template, parallel=parallel)
    nudges = bundle.manifest.get("nudges")
    if nudges:
        engine.nudge_table = NudgeTable.load(bundle.root / nudges["file"], base.info.tokens)
    return engine


def _arm_specs(bundle: Bundle, arms) -> list[tuple[str, float | None]]:
    if arms is None:
        return [(n, None) for n in bundle.arms]
    if isinstance(arms, dict):
        return [(n, float(w) if w is not None else None) for n, w in arms.items()]
    return [parse_arm_spec(s) for s in arms]
