"""The guidance math: pure NumPy, no I/O.

GenARM decoding (ALGORITHMS.md section 1), per step:

    scores(v) = log p_base(v) + sum_i w_i * log p_arm_i(v)

Each model is normalised with log-softmax before combining. Temperature,
top-k, top-p and min-p then apply to the combined scores, in that order, and a
token is drawn by inverse CDF from one uniform number. Nothing is divided by
``1 + sum(w)``: temperature 1 samples exactly from ``p_base * prod p_arm_i^w_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# ---------------------------------------------------------------------------
# normalisation: logits -> log-probabilities (+ entropy, for free)
# ---------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p = x - max(x) - log(sum(exp(x - max(x)))), in float32; returns a new array."""
    return log_softmax_entropy(logits)[0]


def log_softmax_entropy(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """(log p, H) where H = -sum p log p in nats; one exp pass serves both.

    Non-finite input (NaN, +inf) gives NaN entropy: check with `is_finite` first.
    """
    x = np.asarray(logits, dtype=np.float32)
    m = x.max()
    lp = np.subtract(x, m)
    e = np.exp(lp)
    s = float(e.sum())
    lp -= np.float32(math.log(s)) if s > 0 and s == s else np.float32("nan")
    with np.errstate(invalid="ignore"):
        d = float(np.dot(e, lp))
    if d != d and s == s and m == m:  # -inf logits (masked): 0 * -inf is NaN, their true term is 0
        d = float(np.dot(e, np.where(e > 0, lp, 0.0)))
    return lp, -d / s


def logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x - np.float32(m)).sum()))


def entropy(logits: np.ndarray) -> float:
    """Shannon entropy in nats of softmax(logits)."""
    return log_softmax_entropy(logits)[1]


def is_finite(logits: np.ndarray) -> bool:
    """True when no NaN and no +inf is present (-inf is a legal mask value).

    One reduction: max() is NaN if any element is NaN, +inf if any is +inf.
    """
    m = logits.max()
    return bool(m == m) and m != np.inf


def combine(
    base_logprobs: np.ndarray,
    arm_logprobs: list[np.ndarray],
    weights: list[float],
) -> np.ndarray:
    """scores = log p_base + sum_i w_i * log p_arm_i (unnormalised; logZ dropped)."""
    if len(arm_logprobs) != len(weights):
        raise ValueError(f"{len(arm_logprobs)} ARM log-probs but {len(weights)} weights")
    scores = np.array(base_logprobs, dtype=np.float32, copy=True)
    for lp, w in zip(arm_logprobs, weights):
        if w != 0.0:
            scores += np.float32(w) * lp
    return scores


# ---------------------------------------------------------------------------
# the sampler: combined scores -> candidate set -> one token
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings. The single home of their defaults (llama.cpp's)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    # llama.cpp's repeat penalty over the last `repeat_last_n` tokens (prompt included);
    # 1.0 is off, as in llama.cpp (Ollama uses 1.1 over 64)
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    # DRY ("don't repeat yourself", as in llama.cpp / koboldcpp): a token that would extend a
    # sequence already seen in the last `dry_last_n` tokens, by a match of length L >=
    # `dry_allowed_length`, loses dry_multiplier * dry_base ** (L - dry_allowed_length) from
    # its score. 0 is off (llama.cpp's default). None (the default) is "auto" (`auto_dry`):
    # GUIDED_DRY * (1 + sum |w|) when an ARM is active or nudging is on, 0 otherwise.
    dry_multiplier: float | None = None
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_last_n: int = 256

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, lo=0.0, fix="use 0 for greedy, 1 for plain sampling")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, fix="use 1.0 to disable it")
        _check_number("min_p", self.min_p, lo=0.0, hi=1.0, hi_open=True, fix="use 0 to disable it")
        _check_number(
            "repeat_penalty", self.repeat_penalty, lo=0.0, lo_open=True, fix="use 1.0 to disable it"
        )
        for name in ("repeat_last_n", "dry_allowed_length", "dry_last_n"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {n!r}")
        if self.dry_multiplier is not None:
            _check_number("dry_multiplier", self.dry_multiplier, lo=0.0, fix="use 0 to disable it")
        _check_number("dry_base", self.dry_base, lo=1.0, fix="llama.cpp's default is 1.75")
        check_sampling_limits(self)  # ranges the float32 sampler cannot overflow (end of this file)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def repeat_penalty(scores: np.ndarray, recent, penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty on the combined scores, in place: each token seen in
    `recent` has a positive score divided by `penalty` and a negative one multiplied
    (scores here are sums of log-probs, so in practice: multiplied, i.e. pushed down)."""
    if penalty == 1.0 or not len(recent):
        return scores
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[ids < scores.size]
    s = scores[ids]
    scores[ids] = np.where(s > 0, s / penalty, s * penalty).astype(scores.dtype)
    return scores


GUIDED_DRY = 0.8  # llama.cpp's suggested dry_multiplier, in the units of one model's log-probs
DRY_AUTO_RULE = f"{GUIDED_DRY} x (1 + sum |w|)"  # `auto_dry`, as eval folders record it
DRY_MAX_MATCH = 64  # longer matches get the same (already huge) penalty; bounds the work in a loop


def auto_dry(weights: dict[str, float], nudging: bool) -> float:
    """dry_multiplier "auto": off for the base alone; for a steered request GUIDED_DRY in the
    units of the scores it penalises. Those are log p_base + sum w_i log p_arm_i, about
    (1 + sum w) times one model's log-probs (ARMs are LMs of the base), so a fixed 0.8 grew
    weaker as the weights grew: positive=1 looped in 9.4% of replies at 0.8 and 3.1% at 1.6,
    with the same judged gain (README, "What the default ARMs do")."""
    active = [abs(w) for w in weights.values() if w]
    return GUIDED_DRY * (1.0 + sum(active)) if active or nudging else 0.0


def dry_penalty(scores: np.ndarray, seq, params: SamplingParams, breakers=frozenset()) -> np.ndarray:
    """DRY on the combined scores, in place (see SamplingParams). `seq` is the token history
    (prompt included); a match never runs across a token in `breakers` (ids whose text holds a
    newline, ':', '"' or '*', as llama.cpp's default sequence breakers)."""
    mult, allowed = params.dry_multiplier, max(1, params.dry_allowed_length)
    if not mult or len(seq) < 2:
        return scores
    s = list(seq[-params.dry_last_n :]) if params.dry_last_n else list(seq)
    n = len(s)
    cap = 0  # the suffix that may repeat stops at the newest breaker
    while cap < n and cap < DRY_MAX_MATCH and s[n - 1 - cap] not in breakers:
        cap += 1
    if cap < allowed:
        return scores
    arr = np.asarray(s, dtype=np.int64)
    longest: dict[int, int] = {}
    for j in np.flatnonzero(arr[:-1] == arr[-1]).tolist():  # earlier places where the last token was
        length = 1
        while length < cap and j - length >= 0 and s[j - length] == s[n - 1 - length]:
            length += 1
        if length >= allowed:
            nxt = s[j + 1]  # the token that continued the earlier copy
            if length > longest.get(nxt, 0):
                longest[nxt] = length
    for tok, length in longest.items():
        if tok < scores.size:
            scores[tok] -= np.float32(mult * params.dry_base ** (length - allowed))
    return scores


def _check_number(name, value, lo=None, hi=None, lo_open=False, hi_open=False, fix=""):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    bad |= lo is not None and (v <= lo if lo_open else v < lo)
    bad |= hi is not None and (v >= hi if hi_open else v > hi)
    if bad:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + str(lo)
        hi_s = "" if hi is None else str(hi) + (")" if hi_open else "]")
        raise ConfigError(f"{name} must be in {lo_s or '(-inf'}, {hi_s or 'inf)'}, got {value!r}: {fix}")


def candidates(scores: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Apply temperature, top-k, top-p, min-p; return (token ids, their log-probs).

    Each step renormalises over what the previous one kept (HF / llama.cpp
    semantics). The returned log-probs are normalised over the returned ids, which
    come sorted by decreasing score (unsorted when nothing truncates): sampling from them is the final distribution.
    """
    if params.greedy:
        return np.array([int(np.argmax(scores))]), np.zeros(1, dtype=np.float32)
    t = np.float32(params.temperature)
    if params.top_k > 0:  # top-k is blind to temperature and renormalises: no full softmax needed
        ids = top_k_ids(scores, params.top_k, width=12.0 * float(t))
        ids = ids[np.argsort(-scores[ids], kind="stable")]
        sub = log_softmax(scores[ids] / t)
    else:
        lp = log_softmax(scores / t)
        if params.top_p == 1.0 and params.min_p == 0.0:
            return np.arange(lp.size), lp  # plain sampling: nothing to sort
        ids = _prefilter(lp, params)
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        sub = lp[ids]
    if params.top_p < 1.0:
        cum = np.cumsum(np.exp(sub.astype(np.float64)))
        n = int(np.searchsorted(cum, params.top_p, side="left")) + 1
        ids, sub = ids[:n], sub[:n]
    if params.min_p > 0.0:
        keep = sub >= sub[0] + math.log(params.min_p)
        ids, sub = ids[keep], sub[keep]
    return ids, log_softmax(sub)


def top_k_ids(lp: np.ndarray, k: int, width: float = 12.0) -> np.ndarray:
    """The k highest ids, unordered. A cheap threshold pass first: partitioning
    the full vocabulary costs ~10x more than a comparison, and almost always
    the k best lie within `width` of the best (falls back to a full partition)."""
    if k >= lp.size:
        return np.arange(lp.size)
    pool = np.flatnonzero(lp >= lp.max() - width)
    if pool.size < k:
        pool = np.arange(lp.size)
    if pool.size > k:
        pool = pool[np.argpartition(-lp[pool], k - 1)[:k]]
    return pool


def _prefilter(lp: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Without top-k: a superset of the final candidates, so only it gets sorted.

    Top-p and min-p each keep a prefix of the tokens sorted by probability, so a
    threshold that provably contains that prefix is exact: min-p keeps
    p >= min_p * p_max; top-p needs at most the tokens with p >= (1-top_p)/V,
    since all the others together hold less than 1-top_p of the mass.
    """
    log_thr = -np.inf
    if params.min_p > 0.0:
        log_thr = max(log_thr, float(lp.max()) + math.log(params.min_p))
    if params.top_p < 1.0:
        log_thr = max(log_thr, math.log((1.0 - params.top_p) / lp.size) - 1e-3)
    if log_thr == -np.inf:
        return np.arange(lp.size)
    return np.flatnonzero(lp >= log_thr)


def sampling_distribution(scores: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The full-vocabulary distribution that `sample` draws from (for tests and reports)."""
    ids, sub = candidates(scores, params)
    p = np.zeros(scores.shape[-1], dtype=np.float64)
    p[ids] = np.exp(sub.astype(np.float64))
    return p / p.sum()


def sample(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Draw one token: inverse CDF over the candidates with one uniform from `rng`."""
    return sample_u(scores, params, rng.random())


def sample_u(scores: np.ndarray, params: SamplingParams, u: float) -> int:
    """Inverse CDF with a given uniform u in [0, 1): the same u on two score
    vectors shows what a change of scores did to the draw."""
    ids, sub = candidates(scores, params)
    if ids.size == 1:
        return int(ids[0])
    cum = np.cumsum(np.exp(sub), dtype=np.float64)
    u = u * cum[-1]
    j = min(int(np.searchsorted(cum, u, side="right")), ids.size - 1)
    return int(ids[j])


# ---------------------------------------------------------------------------
# the range of an ARM weight
# ---------------------------------------------------------------------------

# |w| <= 100 for every ARM. Why: the combine runs in float32. (1) Overflow: np.float32(w) is inf
# past 3.4e38, and w * log p overflows once |w| * |log p| passes it; masked or far tokens have
# |log p| up to ~1e4 nats, so even 1e34 can turn a score into inf and the whole softmax into NaN
# (an empty candidate set: "zero-size array to reduction operation"). (2) Degeneracy well before
# that: the spacing of float32 values near |w log p| is |w log p| * 2**-23; at |w| = 100 and a
# candidate's |log p| <= 100 that is ~1e-3 nats, so the base's own log-probs still count; at
# 1e6 it is ~10 nats and the base is rounded away. Weights used in practice lie in [-3, 3].
MAX_WEIGHT = 100.0


def check_weight(name: str, w) -> float:
    """`w` as a float, or a ConfigError naming the ARM when it is not a number in [-MAX_WEIGHT, MAX_WEIGHT]."""
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
        raise ConfigError(f"ARM weight for '{name}' must be a finite number, got {w!r}")
    try:
        v = float(w)
    except OverflowError:  # an integer past float64's range
        v = math.inf
    if not math.isfinite(v):
        raise ConfigError(f"ARM weight for '{name}' must be a finite number, got {str(w)[:40]}")
    if abs(v) > MAX_WEIGHT:
        raise ConfigError(f"ARM weight for '{name}' is {v:g}: weights must lie in [-{MAX_WEIGHT:g}, "
                          f"{MAX_WEIGHT:g}] (beyond that the ARM swamps the base in float32; 0-3 is usual)")  # fmt: skip
    return v


# Sampling settings the float32 sampler cannot overflow (scores stay within ~1e7 in magnitude
# with |w| <= MAX_WEIGHT): a temperature under 1e-6 rounds to 0 in float32 and divides by it;
# a repeat penalty outside [1e-4, 1e4] turns a score into inf (inf - inf is NaN: no candidates);
# dry_base ** 62 (DRY_MAX_MATCH) must stay a float64 number, so dry_base <= 100.
MIN_TEMPERATURE = 1e-6
REPEAT_PENALTY_RANGE = (1e-4, 1e4)
MAX_DRY_BASE = 100.0


def check_sampling_limits(p: SamplingParams) -> None:
    """A ConfigError naming the setting when it is inside its type's range but past the sampler's."""
    if 0.0 < p.temperature < MIN_TEMPERATURE:
        raise ConfigError(f"temperature {p.temperature:g} is too small to divide by in float32 "
                          f"(at least {MIN_TEMPERATURE:g}): use 0 for greedy")  # fmt: skip
    lo, hi = REPEAT_PENALTY_RANGE
    if not lo <= p.repeat_penalty <= hi:
        raise ConfigError(f"repeat_penalty {p.repeat_penalty:g} is outside [{lo:g}, {hi:g}]: 1.0 disables it, "
                          "1.1 is usual")  # fmt: skip
    if p.dry_base > MAX_DRY_BASE:
        raise ConfigError(f"dry_base {p.dry_base:g} is over {MAX_DRY_BASE:g}: llama.cpp's default is 1.75")
