"""The decoding loop: base + ARMs -> combined scores -> sampled token -> text.

Per step: one base decode and one forward per active ARM unit (overlapped in
threads: llama.cpp and onnxruntime both release the GIL), log-softmax of each,
the weighted sum, the sampler, and a StepRecord for whoever is listening.

The `Engine` holds what is loaded (models, KV caches, default weights); every
per-request value (sampling, weights, RNG, timings, finish reason, nudge report)
lives in a `Generation`, so two requests never read each other's results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from . import guidance as G
from .backends.llama_base import LlamaBase
from .chat import CHATML, render
from .config import DEFAULTS
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
    base_pick: int | None = None  # explain only: the base's own scores, same sampler and uniform, chose this


@dataclass
class Timings:
    steps: int = 0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    base_s: float = 0.0
    arm_s: dict[str, float] = field(default_factory=dict)  # per ARM unit (an ARM, or heads sharing a trunk)
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
    weights: dict[str, float] = field(default_factory=dict)  # the ARM weights this request used


@dataclass
class _Step:
    """One step's combined scores and the pieces they were made of."""

    scores: np.ndarray
    rec: StepRecord
    base_lp: np.ndarray
    arm: dict[str, tuple[np.ndarray, float]]  # name -> (raw logits on the base's ids, logZ)

    def arm_term(self, tok: int, active: dict[str, float]) -> float:
        """sum_i w_i log p_arm_i(tok) over the ARMs that ran this step."""
        return sum(active[n] * (float(z[tok]) - lse) for n, (z, lse) in self.arm.items() if tok < z.size)


class Generation:
    """One request: iterate it for StepRecords; afterwards it holds the request's results
    (`finish_reason`, `timings`, `nudge`, `weights`). Nothing of it is stored on the engine."""

    def __init__(self, engine: Engine, ids: list[int], budget: int, *, params, seed, weights, active,
                 stop, on_step, eos, nudge, explain=False):  # fmt: skip
        self.engine, self.ids, self.budget = engine, list(ids), budget
        self.params: G.SamplingParams = params
        self.rng = _rng(seed)
        self.seeded = seed is not None  # reproducible: start from exact cache entries (Engine._trim_for)
        self.weights: dict[str, float] = weights  # every loaded ARM's weight for this request
        self.active: dict[str, float] = active  # the ARMs that run (weight != 0, guidance on)
        self.text = TextStream(stop)
        self.on_step = on_step
        self.eos: set[int] = eos
        self.nudge_cfg: NudgeConfig | None = nudge
        self.nudge: NudgeReport | None = NudgeReport() if nudge is not None else None
        self.last_site: int | None = None
        self.explain = explain  # fill StepRecord.base_pick
        self.timings = Timings(prompt_tokens=len(ids))
        self.finish_reason: str | None = None
        self._it: Iterator[StepRecord] | None = None

    def __iter__(self) -> Iterator[StepRecord]:
        if self._it is None:
            self._it = self.engine._loop(self)
        return self._it

    def __next__(self) -> StepRecord:
        return next(iter(self))


class Engine:
    """A loaded bundle: one base, any number of ARMs with run-time weights.

    `arms` maps a name to an ARM backend (`prefill(tokens)`/`step(token)` -> logits). ARMs
    that share a trunk (backends.trunk) are one forward unit: the trunk runs once per step
    for all of its active heads.
    """

    def __init__(
        self,
        base: LlamaBase,
        arms: dict,
        weights: dict[str, float],
        chat_template: str | None = None,
        parallel: bool = True,
        nudge_table: NudgeTable | None = None,
    ):
        self.base, self.arms = base, arms
        self.weights: dict[str, float] = {n: 0.0 for n in arms}  # defaults for requests
        self.set_weights(weights)
        self.chat_template = chat_template or base.info.get("tokenizer.chat_template") or None
        self._units = _forward_units(arms)
        # One worker per unit: a unit's calls stay in order even when a reply was
        # interrupted (Ctrl+C) while its step was still running.
        self._pools = {label: ThreadPoolExecutor(max_workers=1) for label in self._units} if parallel else {}
        self.nudge_table: NudgeTable | None = nudge_table  # the bundle's (plan.LoadPlan), if any
        self.dry_breakers = _Breakers(lambda t: self.base.token_bytes(t))

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
        **sampling_kw,
    ) -> Generation:
        """A Generation: iterate it for one StepRecord per generated token.

        `weights` apply to this request only, over the engine's defaults (`set_weights`);
        `guidance=False` runs the base alone. `nudge` turns on entropy-triggered nudging
        (nudge.py) with the bundle's nudge table when it has one. `on_step(i, scores, params)`
        sees each step's scores (what the sampler draws from). `explain` records in each
        StepRecord the token the base alone would have drawn (`base_pick`). Bad arguments
        raise here, before any model runs.
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
        ids = (
            list(prompt)
            if _is_token_list(prompt)
            else self.tokenize_prompt(self.format_prompt(prompt, raw, system))
        )
        return Generation(
            self, ids, self._budget(len(ids), max_tokens), params=params, seed=seed, weights=w,
            active=active, stop=stop, on_step=on_step, eos=set() if ignore_eos else self.base.eos_ids,
            nudge=nudge, explain=explain,
        )  # fmt: skip

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

    def _loop(self, g: Generation) -> Iterator[StepRecord]:
        active, t, seq = g.active, g.timings, list(g.ids)
        g.finish_reason = "length"
        t.arm_s = {label: 0.0 for label, names in self._units.items() if any(n in active for n in names)}
        t0 = time.perf_counter()
        if g.seeded:
            self._trim_for(seq, active)
        logits = self._forward("prefill", seq, active, t, count=False)
        t.prompt_s = time.perf_counter() - t0
        for i in range(g.budget):
            t1 = time.perf_counter()
            st = self._combine(logits, active)
            p = g.params
            st.scores = self._penalize(st.scores, st.base_lp, seq, p)
            if g.on_step is not None:
                g.on_step(i, st.scores, p)
            tok = self._choose(i, st, g, seq)
            seq.append(tok)
            rec = st.rec
            rec.token = tok
            rec.base_logprob = float(st.base_lp[tok])
            for n, (z, lse) in st.arm.items():
                rec.arm_contrib[n] = active[n] * (float(z[tok]) - lse) if tok < z.size else float("-inf")
            rec.combined_logprob = (
                (float(st.scores[tok]) - G.logsumexp(st.scores)) if st.arm else rec.base_logprob
            )
            if tok in g.eos:
                g.finish_reason = "stop"
                t.total_s += time.perf_counter() - t1
                break
            rec.text = g.text.push(self.base.token_bytes(tok))
            t.steps += 1
            done = g.text.stopped or i == g.budget - 1
            if not done:
                logits = self._forward("step", tok, active, t)
            t.total_s += time.perf_counter() - t1
            if done:
                rec.text += g.text.flush()
                g.finish_reason = "stop" if g.text.stopped else "length"
                yield rec
                return
            yield rec
        tail = g.text.flush()
        if tail:
            yield StepRecord(-1, tail, 0.0, 0.0, 0.0)

    def _penalize(self, scores: np.ndarray, base_lp: np.ndarray, seq: list[int], p) -> np.ndarray:
        """Repeat penalty and DRY on `scores` (copied first when they are the base's log-probs)."""
        if (p.repeat_penalty != 1.0 and p.repeat_last_n) or p.dry_multiplier:
            if scores is base_lp:  # no ARM ran: keep the base log-probs unpenalised
                scores = base_lp.copy()
            if p.repeat_last_n:
                G.repeat_penalty(scores, seq[-p.repeat_last_n :], p.repeat_penalty)
            G.dry_penalty(scores, seq, p, self.dry_breakers)
        return scores

    def _trim_for(self, seq: list[int], active) -> None:
        """Start a seeded request from cache entries that a cold prefill would compute bit for bit
        (LlamaBase.trim_for): the same request and seed then give the same text whatever ran
        before it. A chat's earlier turns are still reused, but its last reply (decoded one token
        at a time) is evaluated again, in one batch; requests without a seed reuse everything."""
        self.base.trim_for(seq)
        for n in active:
            self.arms[n].trim_for(seq)

    def _choose(self, i: int, st: _Step, g: Generation, seq: list[int]) -> int:
        """Sample; at a nudge site, let the nudge change the pick (same uniform draw)."""
        u = g.rng.random()
        tok = G.sample_u(st.scores, g.params, u)
        if g.explain:
            st.rec.base_pick = G.sample_u(self._penalize(st.base_lp, st.base_lp, seq, g.params), g.params, u)
        cfg, report = g.nudge_cfg, g.nudge
        if cfg is None:
            return tok
        report.steps += 1
        if not is_site(i, st.rec.entropy, g.last_site, cfg):
            return tok
        g.last_site = i
        report.sites.append(i)
        st.rec.site = True
        table = self.nudge_table
        direction = table.direction_for(seq[-cfg.context :]) if table is not None else None
        ranked: list[int] = []
        forced, biased = apply_site(st.base_lp, st.scores, cfg, direction, ranked)
        new = forced if forced is not None else G.sample_u(biased, g.params, u)
        if cfg.rollouts and st.arm:
            new = self._verify(i, seq, ranked[: cfg.rollouts], st, g)
        if new != tok:
            report.changes.append((i, tok, new))
            st.rec.nudged_from = tok
        return new

    def _verify(self, i: int, seq: list[int], cands: list[int], st: _Step, g: Generation) -> int:
        """Forward-only verification: the candidate whose rollout has the highest summed ARM term.

        Each candidate c is fed, then followed greedily (argmax of the combined scores) until
        the rollout holds `rollout_len` tokens or ends in EOS; its score is the sum of
        sum_i w_i log p_arm_i over those tokens. Every rollout has the same horizon, so the
        sums compare like with like. The models are put back on `seq` afterwards (their KV
        caches keep the shared prefix; one token is re-evaluated).
        """
        active, t, horizon = g.active, g.timings, g.nudge_cfg.rollout_len
        results = []
        for c in cands:
            score, tok = st.arm_term(c, active), c
            for j in range(horizon - 1):
                if tok in g.eos:
                    break
                # the first forward feeds c after the shared prefix; the rest are single steps
                logits = self._forward("prefill", seq + [c], active, t) if j == 0 else (
                    self._forward("step", tok, active, t))  # fmt: skip
                g.nudge.rollout_tokens += 1
                step = self._combine(logits, active)
                tok = int(np.argmax(step.scores))
                score += step.arm_term(tok, active)
            results.append((c, score))
        self._forward("prefill", seq, active, t)  # back to the real sequence
        g.nudge.rollouts.append((i, results))
        return max(results, key=lambda r: r[1])[0]

    def _forward(self, kind: str, arg, active, t: Timings, count: bool = True):
        """`kind` ("prefill" tokens / "step" token) on the base and on each unit with an active
        ARM, overlapped when pools exist. Returns (base logits, {name: ARM logits})."""
        t0 = time.perf_counter()
        jobs = {}
        for label, names in self._units.items():
            run = [n for n in names if n in active]
            if run:
                jobs[label] = run
        futures = {}
        if self._pools:  # heads on the base's own trunk (a tap) need the base's decode first
            futures = {lb: self._pools[lb].submit(self._run_unit, run, kind, arg)
                       for lb, run in jobs.items() if not _after_base(self.arms[run[0]])}  # fmt: skip
        tb = time.perf_counter()
        base_logits = getattr(self.base, kind)(arg)
        t.base_s += time.perf_counter() - tb
        arm_logits = {}
        for label, run in jobs.items():
            out, dt = futures[label].result() if label in futures else self._run_unit(run, kind, arg)
            arm_logits.update(out)
            t.arm_s[label] = t.arm_s.get(label, 0.0) + dt
        if count:
            t.forward_s += time.perf_counter() - t0
        else:
            t.base_s, t.arm_s = 0.0, {k: 0.0 for k in t.arm_s}
        return base_logits, arm_logits

    def _run_unit(self, names: list[str], kind: str, arg):
        t0 = time.perf_counter()
        unit = self.arms[names[0]]
        group = getattr(unit, "group", None)
        if group is not None:  # heads sharing a trunk: one call runs the trunk once
            out = group.run(kind, arg, names)
        else:
            out = {names[0]: getattr(unit, kind)(arg)}
        return out, time.perf_counter() - t0

    def _combine(self, logits, active) -> _Step:
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
        arm: dict[str, tuple[np.ndarray, float]] = {}
        if not active:
            return _Step(base_lp, rec, base_lp, arm)
        v = base_lp.size
        for n in active:
            z = arm_logits[n][:v]
            lse = G.logsumexp(z)
            if not np.isfinite(lse):
                log.warning("ARM '%s' produced NaN/inf logits; skipping its guidance for this step", n)
                rec.fallback.append(n)
                continue
            arm[n] = (z, lse)
        if not arm:
            return _Step(base_lp, rec, base_lp, arm)
        names = list(arm)
        scores = G.combine(base_lp, [_pad(arm[n][0], v) for n in names], [active[n] for n in names])
        scores -= np.float32(sum(active[n] * arm[n][1] for n in names))
        short = min(arm[n][0].size for n in names)
        if short < v:
            scores[short:] = -np.inf  # ids the ARM does not have: not real shared tokens
        return _Step(scores, rec, base_lp, arm)

    def reset(self) -> None:
        """Empty every KV cache (base, ARMs, shared trunks): the next request evaluates its whole
        prompt afresh. A cached prefix is evaluated in other batches than a fresh prefill, which
        changes the numerics slightly (FACTS.md), so independent prompts that must give the same
        result however they are grouped (batch, eval, Ray) start from here."""
        self.base.reset()
        groups = {}
        for arm in self.arms.values():
            group = getattr(arm, "group", None)
            if group is None:
                arm.reset()
            else:
                groups[id(group)] = group
        for group in groups.values():
            group.reset()

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


def _forward_units(arms: dict) -> dict[str, list[str]]:
    """label -> ARM names run by one call: a plain ARM alone, heads sharing a trunk together."""
    units: dict[str, list[str]] = {}
    by_group: dict[int, list[str]] = {}
    for name, arm in arms.items():
        group = getattr(arm, "group", None)
        if group is None:
            units[name] = [name]
        else:
            by_group.setdefault(id(group), []).append(name)
    for names in by_group.values():
        units["+".join(names)] = names
    return units


def _after_base(arm) -> bool:
    return bool(getattr(getattr(arm, "group", None), "after_base", False))


def _pad(lp: np.ndarray, v: int) -> np.ndarray:
    if lp.size >= v:
        return lp
    out = np.zeros(v, dtype=np.float32)
    out[: lp.size] = lp
    return out


def _rng(seed) -> np.random.Generator:
    """A seeded RNG; a seed that is not an integer >= 0 is a ConfigError, not NumPy's traceback."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng(seed)


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(i, (int, np.integer)) for i in x)
