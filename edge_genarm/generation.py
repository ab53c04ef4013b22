"""One request, decoded: forward -> combine -> penalize -> choose -> record -> stop checks.

A `Generation` holds what one request asked for (sampling, weights, seed, stops, nudging)
and what came of it (`finish_reason`, `timings`, `nudge`). Iterating it runs `_decode`, the
loop, on its engine, which owns the models and their KV caches: one Generation at a time
holds them (`Engine.hold`), from its first token until it ends, is closed, or is dropped.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import guidance as G
from .backends.units import Partial
from .errors import ConfigError, EdgeGenarmError
from .fastmode import FAST_CANDIDATES
from .nudge import NudgeConfig, NudgeReport, apply_site, is_site
from .text import TextStream

if TYPE_CHECKING:
    from .engine import Engine

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
    guided: bool = True  # the active ARMs ran at this step (fast mode skips confident steps)


@dataclass
class Timings:
    steps: int = 0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    base_s: float = 0.0
    arm_s: dict[str, float] = field(default_factory=dict)  # per ARM unit (an ARM, or heads sharing a trunk)
    forward_s: float = 0.0  # wall time of the (overlapped) forward section
    total_s: float = 0.0  # wall time of the decode steps
    guided: int = 0  # steps at which the active ARMs ran (all of them in the exact mode)

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
            "guided_fraction": self.guided / n if self.steps else 0.0,
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
class Scores:
    """One step's combined scores and the pieces they were made of."""

    scores: np.ndarray  # log p_base + sum_i w_i log p_arm_i (the base's log-probs when no ARM ran)
    base_lp: np.ndarray
    entropy: float  # of the base's distribution
    arm: dict[str, tuple[np.ndarray, float]]  # name -> (raw logits on the base's ids, logZ)
    fallback: list[str]  # ARMs skipped this step (NaN/inf logits)

    def arm_term(self, tok: int, active: dict[str, float]) -> float:
        """sum_i w_i log p_arm_i(tok) over the ARMs that ran this step."""
        return sum(active[n] * (float(z[tok]) - lse) for n, (z, lse) in self.arm.items() if tok < z.size)


@dataclass
class Choice:
    """What one step chose: `token`, and what sampling alone drew (`sampled`) before a nudge."""

    token: int
    sampled: int
    base_pick: int | None = None  # explain: what the base's own scores drew with the same uniform
    site: bool = False
    rollouts: list[tuple[int, float]] | None = None  # (candidate, rollout score) at a verified site
    rollout_forwards: int = 0


class Generation:
    """One request: iterate it for StepRecords; afterwards it holds the request's results
    (`finish_reason`, `timings`, `nudge`, `weights`). Nothing of it is stored on the engine.
    Iteration holds the engine until it ends; `close()` (or dropping the Generation) stops
    early and lets the engine go."""

    def __init__(self, engine: Engine, ids: list[int], budget: int, *, params, seed, weights, active, runs,
                 stop, on_step, eos, nudge, explain=False, fast_tau=None, mix_alpha=None):  # fmt: skip
        self.engine, self.ids, self.budget = engine, list(ids), budget
        self.params: G.SamplingParams = params
        self.rng = _rng(seed)
        self.seeded = seed is not None  # reproducible: start from exact cache entries (Engine.trim_for)
        self.weights: dict[str, float] = weights  # every loaded ARM's weight for this request
        self.active: dict[str, float] = active  # the ARMs that run (weight != 0, guidance on)
        self.runs = runs  # the forward units they need (Engine.units_for)
        self.text = TextStream(stop)
        self.on_step = on_step
        self.eos: set[int] = eos
        self.nudge_cfg: NudgeConfig | None = nudge
        self.nudge: NudgeReport | None = NudgeReport() if nudge is not None else None
        self.explain = explain  # fill StepRecord.base_pick
        self.fast_tau: float | None = fast_tau  # fast mode: skip the ARMs below this base entropy (fastmode.py)
        self.mix_alpha = mix_alpha  # fast mode on the mix head: its alpha (then `active` is {MIX: strength})
        self.timings = Timings(prompt_tokens=len(ids))
        self.finish_reason: str | None = None
        self._steps: Iterator[StepRecord] | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> StepRecord:
        if self._steps is None:
            # The loop sees this object through a weak proxy, so no reference cycle keeps a
            # Generation dropped half-way alive: freeing it closes the loop, which frees the engine.
            self._steps = _decode(weakref.proxy(self))
        return next(self._steps)

    def close(self) -> None:
        """Stop here: later iteration yields nothing, and the engine is free for another request."""
        if self._steps is None:
            self._steps = iter(())
        else:
            self._steps.close()

    def _choose(
        self, i: int, sc: Scores, scores: np.ndarray, seq: list[int], last_site: int | None
    ) -> Choice:
        """Sample with one uniform draw; at a nudge site the nudge may change the pick (same draw)."""
        p, u = self.params, self.rng.random()
        tok = G.sample_u(scores, p, u)
        base_pick = None
        if self.explain:
            base_pick = G.sample_u(penalize(sc.base_lp, sc.base_lp, seq, p, self.engine.dry_breakers), p, u)
        cfg = self.nudge_cfg
        if cfg is None or not is_site(i, sc.entropy, last_site, cfg):
            return Choice(tok, tok, base_pick)
        table = self.engine.nudge_table
        direction = table.direction_for(seq[-cfg.context :]) if table is not None else None
        site = apply_site(sc.base_lp, scores, cfg, direction)
        if cfg.rollouts and sc.arm:
            new, results, forwards = self._verify(seq, site.ranked[: cfg.rollouts], sc)
            return Choice(new, tok, base_pick, True, results, forwards)
        new = site.forced if site.forced is not None else G.sample_u(site.biased, p, u)
        return Choice(new, tok, base_pick, True)

    def _verify(self, seq: list[int], cands: list[int], sc: Scores) -> tuple[int, list, int]:
        """Forward-only verification: (the candidate whose rollout has the highest summed ARM term,
        [(candidate, score)], forwards spent).

        Each candidate c is fed, then followed greedily (argmax of the combined scores) until the
        rollout holds `rollout_len` tokens, ends in EOS, or fills the context; its score is the sum
        of sum_i w_i log p_arm_i over those tokens. Every rollout has the same horizon, so the sums
        compare like with like. The models are put back on `seq` afterwards (their KV caches keep
        the shared prefix; one token is re-evaluated).
        """
        engine, active, t = self.engine, self.active, self.timings
        # a rollout of h tokens feeds h - 1 of them after seq: never past the context
        horizon = min(self.nudge_cfg.rollout_len, engine.base.n_ctx - len(seq) + 1)
        results, forwards = [], 0
        for c in cands:
            score, tok = sc.arm_term(c, active), c
            for j in range(horizon - 1):
                if tok in self.eos:
                    break
                # the first forward feeds c after the shared prefix; the rest are single steps
                logits = engine.forward("prefill", seq + [c], self.runs, t) if j == 0 else (
                    engine.forward("step", tok, self.runs, t))  # fmt: skip
                forwards += 1
                step = combine(logits, active, engine.base.path.name)
                tok = int(np.argmax(step.scores))
                score += step.arm_term(tok, active)
            results.append((c, score))
        engine.forward("prefill", seq, self.runs, t)  # back to the real sequence
        return max(results, key=lambda r: r[1])[0], results, forwards


def _decode(g: Generation) -> Iterator[StepRecord]:
    """The loop (`g`: a weak proxy, see Generation.__next__). The prompt's forward is timed as
    `prompt_s`; each step's as `total_s`, its forwards also as `forward_s`, `base_s`, `arm_s`."""
    engine, t, p, active, seq = g.engine, g.timings, g.params, g.active, list(g.ids)
    runs, text_out, eos, budget, report, on_step = g.runs, g.text, g.eos, g.budget, g.nudge, g.on_step
    with engine.hold():
        if g.mix_alpha is not None:
            engine.mix.set_alpha(g.mix_alpha)
        t.arm_s = {label: 0.0 for label, _, _ in runs[0] + runs[1]}
        t0 = time.perf_counter()
        if g.seeded:
            engine.trim_for(seq, runs)
        logits = engine.forward("prefill", seq, runs)
        t.prompt_s = time.perf_counter() - t0
        g.finish_reason, last_site, guided, base = "length", None, True, None
        for i in range(budget):
            t1 = time.perf_counter()
            sc = combine(logits, active if guided else {}, engine.base.path.name, base)
            t.guided += guided and bool(active)
            scores = penalize(sc.scores, sc.base_lp, seq, p, engine.dry_breakers)
            if on_step is not None:
                on_step(i, scores, p)
            pick = g._choose(i, sc, scores, seq, last_site)
            if report is not None:
                report.note(i, pick.site, pick.sampled, pick.token, pick.rollouts, pick.rollout_forwards)
            last_site = i if pick.site else last_site
            tok = pick.token
            seq.append(tok)
            text, finish = after_token(tok, eos, text_out, engine.base.token_bytes, i == budget - 1)
            if finish is not None:
                g.finish_reason = finish
            if text is None:  # EOS: it ends the reply and is not part of it
                t.total_s += time.perf_counter() - t1
                break
            t.steps += 1
            if finish is None:  # the next step's forwards run before this token is handed out
                if g.fast_tau is None:
                    logits = engine.forward("step", tok, runs, t)
                else:
                    logits, base, guided = fast_forward(engine, tok, seq, runs, g.fast_tau, t, g.nudge_cfg is None)
            t.total_s += time.perf_counter() - t1
            yield record(tok, text, sc, scores, active, pick)
            if finish is not None:
                return
        tail = text_out.flush()
        if tail:
            yield StepRecord(-1, tail, 0.0, 0.0, 0.0)


NO_UNITS = ([], [])


def fast_forward(engine, tok: int, seq: list[int], runs, tau: float, t: Timings, restrict: bool = True):
    """Fast mode's forwards for the next step: the base first; the ARM units only when the base's
    entropy reaches `tau`, catching up every position they skipped in one batch, and (`restrict`)
    asked for the logits of the base's FAST_CANDIDATES most likely tokens and the end-of-reply
    tokens only. Returns
    (logits, the base's (log-probs, entropy) for `combine`, guided)."""
    base_logits, _ = engine.forward("step", tok, NO_UNITS, t)
    base = G.log_softmax_entropy(base_logits)
    if base[1] < tau:
        return (base_logits, {}), base, False
    t0 = time.perf_counter()
    ids = None
    if restrict:  # the end of the reply stays drawable: a length objective moves it from far down
        ids = G.top_k_ids(base[0], FAST_CANDIDATES)
        ids = np.union1d(ids, engine.eos_candidates) if engine.eos_candidates.size else ids
    arm = engine.forward_units("prefill", seq, runs[0] + runs[1], t, ids)
    t.forward_s += time.perf_counter() - t0
    return (base_logits, arm), base, True


def combine(logits, active: dict[str, float], base_name: str, base=None) -> Scores:
    """scores = log p_base + sum_i w_i (z_i - logZ_i), z_i the ARM's raw logits.

    Only logZ_i is computed for each ARM (not its whole log-softmax): the
    sum of w_i * logZ_i is one scalar subtracted at the end. `base`: the base's
    (log-probs, entropy) when already computed (fast mode).
    """
    base_logits, arm_logits = logits
    base_lp, h = base if base is not None else G.log_softmax_entropy(base_logits)
    if h != h:  # NaN entropy <=> a NaN or +inf among the logits
        raise EdgeGenarmError(
            f"the base model '{base_name}' produced NaN/inf logits: the GGUF may be "
            "corrupt or GPU offload broken; re-export it or try --gpu-layers 0"
        )
    arm: dict[str, tuple[np.ndarray, float]] = {}
    fallback: list[str] = []
    if not active:
        return Scores(base_lp, base_lp, h, arm, fallback)
    v = base_lp.size
    if any(isinstance(arm_logits[n], Partial) for n in active):
        return _combine_on(base_lp, h, {n: arm_logits[n] for n in active}, active)
    for n in active:
        z = arm_logits[n][:v]
        lse = G.logsumexp(z)
        if not np.isfinite(lse):
            log.warning("ARM '%s' produced NaN/inf logits; skipping its guidance for this step", n)
            fallback.append(n)
            continue
        arm[n] = (z, lse)
    if not arm:
        return Scores(base_lp, base_lp, h, arm, fallback)
    names = list(arm)
    scores = G.combine(base_lp, [_pad(arm[n][0], v) for n in names], [active[n] for n in names])
    scores -= np.float32(sum(active[n] * arm[n][1] for n in names))
    short = min(arm[n][0].size for n in names)
    if short < v:
        scores[short:] = -np.inf  # ids the ARM does not have: not real shared tokens
    return Scores(scores, base_lp, h, arm, fallback)


def _combine_on(base_lp: np.ndarray, h: float, logits: dict, active: dict[str, float]) -> Scores:
    """combine() on the token ids of the Partial logits (the fast mode's restricted LM head): every
    other token scores -inf, and each ARM's logZ is taken over those ids (a constant per step: the
    sampler does not see it). An ARM that returned the whole vocabulary is read on the same ids."""
    v = base_lp.size
    limit = min(v, *(z.size for z in logits.values()))  # ids past an ARM's vocabulary are not shared tokens
    ids = next(z.ids for z in logits.values() if isinstance(z, Partial))
    ids = ids[ids < limit]  # every Partial of a step holds the same ids, in the same order
    arm: dict[str, tuple[np.ndarray, float]] = {}
    fallback: list[str] = []
    sub = base_lp[ids].astype(np.float32)
    for n, z in logits.items():
        zs = z.z[z.ids < limit] if isinstance(z, Partial) else z[ids]
        lse = G.logsumexp(zs)
        if not np.isfinite(lse):
            log.warning("ARM '%s' produced NaN/inf logits; skipping its guidance for this step", n)
            fallback.append(n)
            continue
        full = np.full(v, -np.inf, dtype=np.float32)
        full[ids] = zs
        arm[n] = (full, lse)
        sub += np.float32(active[n]) * (zs - np.float32(lse))
    if not arm:
        return Scores(base_lp, base_lp, h, arm, fallback)
    scores = np.full(v, -np.inf, dtype=np.float32)
    scores[ids] = sub
    return Scores(scores, base_lp, h, arm, fallback)


def penalize(scores: np.ndarray, base_lp: np.ndarray, seq: list[int], p, breakers) -> np.ndarray:
    """Repeat penalty and DRY on `scores` (copied first when they are the base's log-probs)."""
    if (p.repeat_penalty != 1.0 and p.repeat_last_n) or p.dry_multiplier:
        if scores is base_lp:  # no ARM ran: keep the base log-probs unpenalised
            scores = base_lp.copy()
        if p.repeat_last_n:
            G.repeat_penalty(scores, seq[-p.repeat_last_n :], p.repeat_penalty)
        G.dry_penalty(scores, seq, p, breakers)
    return scores


def after_token(tok: int, eos, text: TextStream, token_bytes, last: bool) -> tuple[str | None, str | None]:
    """The stop checks for a chosen token: (text it releases, finish reason or None to go on).

    EOS releases no text (None) and finishes "stop"; a stop string finishes "stop"; the last
    token of the budget finishes "length". A finished reply's held-back text is released with it.
    """
    if tok in eos:
        return None, "stop"
    out = text.push(token_bytes(tok))
    if text.stopped or last:
        return out + text.flush(), "stop" if text.stopped else "length"
    return out, None


def record(
    tok: int, text: str, sc: Scores, scores: np.ndarray, active: dict[str, float], pick: Choice
) -> StepRecord:
    """The StepRecord of a step that chose `tok` from `scores` (penalised) built from `sc`."""
    base = float(sc.base_lp[tok])
    return StepRecord(
        tok, text, base, (float(scores[tok]) - G.logsumexp(scores)) if sc.arm else base, sc.entropy,
        {n: active[n] * (float(z[tok]) - lse) if tok < z.size else float("-inf") for n, (z, lse) in sc.arm.items()},
        sc.fallback, pick.site, pick.sampled if pick.token != pick.sampled else None, pick.base_pick,
        bool(sc.arm) or not active or bool(sc.fallback),
    )  # fmt: skip


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
