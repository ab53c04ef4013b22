"""The baselines GenARM is compared against: Best-of-N and ARGS-k. NumPy + onnxruntime only.

Both rank text with a trajectory-level reward, r(x, y) for a prompt x and a (partial) reply y:

- a reward model (`edge-genarm train-rm`, added to a bundle by `export rm`): a causal-LM graph
  whose single "logit" at position t is the reward of the sequence up to t, so a KV cache
  gives r of every prefix at one step each (`RewardModel`);
- an ARM's summed log-prob of the reply, r = sum_t log p_arm(y_t | x, y_<t) (`ArmScorer`).

Best-of-N (`best_of_n`): N unguided samples, each scored in one prefill, the best returned.
ARGS-k (`args_decode`, Khanov et al. 2024): per step the base's top-k tokens c are scored by
s(c) = log p_base(c | x, y) + w * r(x, y + c), and the pick is argmax s (temperature 0) or a
draw from softmax(s / T) over the k with the engine's sampler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import guidance as G
from .backends.onnx_arm import OnnxARM
from .backends.units import reusable
from .errors import ConfigError, ModelFileError
from .generation import after_token
from .text import TextStream

RM_SECTION = "reward_models"  # the manifest section export/rm_export.py writes


# ---------------------------------------------------------------------------
# the reward model: an ONNX graph with KV cache and one output per position
# ---------------------------------------------------------------------------


class _BranchingGraph(OnnxARM):
    """OnnxARM whose cache can be kept and put back without a copy: ORT never writes the
    past-key/value values it is given, so holding the previous ones is a checkpoint (hence no
    in-place cache: every candidate of a branch would write the same position of one buffer)."""

    in_place = False

    def snapshot(self):
        return self._past, list(self.tokens)

    def restore(self, state) -> None:
        self._past, self.tokens = state[0], list(state[1])


class RewardModel:
    """r(prefix) for every prefix through a KV cache; counts its forwards and evaluated positions."""

    def __init__(self, path: str | Path, name: str = "rm", device: str = "cpu", threads: int = 2,
                 cache: bool = True):  # fmt: skip
        self.name = name
        self.graph = _BranchingGraph(path, name, device=device, threads=threads, cache=cache)
        if self.graph.vocab_size != 1:
            raise ModelFileError(
                f"'{path}' is not a reward-model graph (it gives {self.graph.vocab_size} values per "
                "position, a reward model gives 1): export one with `edge-genarm export rm`"
            )
        self.forwards = 0
        self.tokens_evaluated = 0
        self.prompt_evaluated = 0  # of those, positions inside the prompt (see `score`)

    def _feed(self, new: list[int]) -> np.ndarray:
        self.forwards += 1
        self.tokens_evaluated += len(new)
        return self.graph.feed(new)[:, 0]

    def score(self, tokens: list[int], n_prompt: int = 0) -> float:
        """r(tokens): the output at the last position, evaluating only what the cache lacks
        (the first `n_prompt` tokens are the prompt, for the bookkeeping)."""
        tokens = list(tokens)
        self.graph.truncate(reusable(self.graph.tokens, tokens))
        self.prompt_evaluated += max(0, n_prompt - len(self.graph.tokens))
        return float(self._feed(tokens[len(self.graph.tokens) :])[-1])

    def score_reply(self, prompt_ids: list[int], reply_ids: list[int]) -> float:
        return self.score(list(prompt_ids) + list(reply_ids), len(prompt_ids))

    def branch(self, candidates) -> tuple[np.ndarray, list]:
        """(r(cached + [c]) for each c, the cache state after each); the cache is left as it was.
        One single-token step per candidate from the cached prefix."""
        base = self.graph.snapshot()
        rewards, states = np.empty(len(candidates), dtype=np.float32), []
        for i, c in enumerate(candidates):
            rewards[i] = self._feed([int(c)])[-1]
            states.append(self.graph.snapshot())
            self.graph.restore(base)
        return rewards, states

    def adopt(self, state) -> None:
        """Continue from a state `branch` returned (the chosen candidate's)."""
        self.graph.restore(state)


def load_reward_model(weights: str | Path, name: str | None = None, *, device: str = "cpu",
                      threads: int | None = None, verify: bool = True) -> RewardModel:  # fmt: skip
    """The bundle's reward model `name` (the only one when None), checked against the base's tokens."""
    from .backends.llama_base import default_threads
    from .bundle import Bundle
    from .gguf import read_gguf
    from .tokens import check_token_ids, load_arm_tokens

    b = Bundle.open(weights, verify=verify)
    rms = b.manifest.get(RM_SECTION) or {}
    if not rms:
        raise ConfigError(
            f"bundle '{b.root}' has no reward model: train one with `edge-genarm train-rm` and add it "
            "with `edge-genarm export rm RM_DIR -o BUNDLE --name NAME`"
        )
    if name is None and len(rms) > 1:
        raise ConfigError(f"bundle '{b.root}' has reward models {', '.join(rms)}: name one")
    name = name if name is not None else next(iter(rms))
    if name not in rms:
        raise ConfigError(f"unknown reward model '{name}': bundle '{b.root}' has {', '.join(rms)}")
    e = rms[name]
    check_token_ids(
        name, load_arm_tokens(b.root / e["tokens"], name), read_gguf(b.base_path).tokens, b.base_path.name,
        kind="reward model",
    )  # fmt: skip
    return RewardModel(b.root / e["file"], name, device=device, threads=threads or default_threads())


class ArmScorer:
    """r(x, y) = sum_t log p_arm(y_t | x, y_<t) over the reply tokens (EOS included when the reply
    ended with it), from one forward over the positions the ARM's cache lacks."""

    def __init__(self, engine, name: str):
        if name not in engine.arms:
            have = ", ".join(engine.arms) or "none loaded"
            raise ConfigError(f"unknown ARM '{name}' to score with: loaded ARMs are {have}")
        self.name, self.arm = name, engine.arms[name]
        self.forwards = 0
        self.tokens_evaluated = 0
        self.prompt_evaluated = 0

    def score_reply(self, prompt_ids: list[int], reply_ids: list[int]) -> float:
        seq, n_p = list(prompt_ids) + list(reply_ids), len(prompt_ids)
        if not reply_ids:
            return 0.0
        # the cached prompt is reused up to the position that predicts the first reply token
        first, rows = self.arm.logits_from(seq, n_p - 1)
        self.forwards += 1
        self.tokens_evaluated += len(seq) - first
        self.prompt_evaluated += max(0, n_p - first)
        rows = rows[n_p - 1 - first : len(seq) - 1 - first].astype(np.float64)
        lse = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
        return float(
            sum(rows[i, t] - lse[i] if t < rows.shape[1] else -np.inf for i, t in enumerate(reply_ids))
        )


# ---------------------------------------------------------------------------
# compute bookkeeping
# ---------------------------------------------------------------------------


@dataclass
class Compute:
    """What a call spent. Forwards are model calls (a prefill of many positions is one call)."""

    base_forwards: int = 0  # llama.cpp decode calls: prefills and single steps
    base_tokens: int = 0  # positions the base evaluated (the prompt where not cached, + steps)
    base_prompt_tokens: int = 0  # of base_tokens, those inside the prompt (a cached prompt: 1 or 0)
    scorer_forwards: int = 0  # ONNX calls of the reward model / scoring ARM
    scorer_tokens: int = 0  # positions the scorer evaluated
    scorer_prompt_tokens: int = 0  # of scorer_tokens, those inside the prompt
    sampled: int = 0  # tokens sampled, EOS included (every sample, for Best-of-N)
    seconds: float = 0.0

    def per_token(self, n: int) -> dict:
        """Forwards per output token (n: the returned reply's tokens, at least 1)."""
        n = max(1, n)
        return {"base_forwards": self.base_forwards / n, "scorer_forwards": self.scorer_forwards / n,
                "forwards": (self.base_forwards + self.scorer_forwards) / n}  # fmt: skip


def _check_count(name: str, v, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if hi is not None and v > hi:
        raise ConfigError(f"{name} must be at most {hi} (the base's vocabulary), got {v}")
    return int(v)


# ---------------------------------------------------------------------------
# Best-of-N
# ---------------------------------------------------------------------------


def sample_seed(seed: int | None, i: int) -> int | None:
    """Seed of sample i: `seed` itself for i = 0 (so sample 0 is the unguided reply for `seed`),
    else the first word of numpy's SeedSequence([seed, i]); None stays None (fresh entropy)."""
    if seed is None:
        return None
    return int(seed) if i == 0 else int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])


@dataclass
class BestOfN:
    text: str
    tokens: list[int]
    finish_reason: str
    index: int  # which sample won (the first of equal scores)
    scores: list[float]  # every sample's reward
    samples: list  # every sample's Completion
    seeds: list[int | None]
    compute: Compute = field(default_factory=Compute)


def best_of_n(engine, prompt, n: int, seed: int | None, scorer, **gen) -> BestOfN:
    """N unguided samples of `engine` (seeds: `sample_seed(seed, i)`), each scored in one prefill
    by `scorer` (an ARM name of `engine.arms`, an ArmScorer or a RewardModel) on prompt + reply
    (+ EOS when the reply ended with it); the highest wins. `gen` goes to `engine.stream`."""
    from .engine import Completion

    n = _check_count("n", n)
    for key in ("guidance", "weights", "nudge"):
        if key in gen:
            raise ConfigError(f"best_of_n draws unguided samples: drop {key}=")
    scorer = ArmScorer(engine, scorer) if isinstance(scorer, str) else scorer
    if not hasattr(scorer, "score_reply"):
        raise ConfigError(f"scorer must be an ARM name, an ArmScorer or a RewardModel, got {scorer!r}")
    eos = engine.base.info.get("tokenizer.ggml.eos_token_id")
    c, t0 = Compute(), time.perf_counter()
    f0, k0, p0 = scorer.forwards, scorer.tokens_evaluated, scorer.prompt_evaluated
    samples, scores, seeds = [], [], [sample_seed(seed, i) for i in range(n)]
    for s in seeds:
        g = engine.stream(prompt, seed=s, guidance=False, **gen)
        records = list(g)
        toks = [r.token for r in records if r.token >= 0]
        by_eos = g.finish_reason == "stop" and not g.text.stopped
        samples.append(Completion("".join(r.text for r in records), toks, g.finish_reason,
                                  [r for r in records if r.token >= 0], g.timings, None, g.weights))  # fmt: skip
        steps = max(0, g.timings.steps - (0 if by_eos else 1))  # the last token is fed only before EOS
        c.base_forwards += 1 + steps
        c.base_tokens += engine.base.last_prefill_evaluated + steps
        c.base_prompt_tokens += engine.base.last_prefill_evaluated
        c.sampled += len(toks) + int(by_eos)
        scores.append(scorer.score_reply(g.ids, toks + ([int(eos)] if by_eos and eos is not None else [])))
    c.scorer_forwards, c.scorer_tokens = scorer.forwards - f0, scorer.tokens_evaluated - k0
    c.scorer_prompt_tokens = scorer.prompt_evaluated - p0
    c.seconds = time.perf_counter() - t0
    best = int(np.argmax(scores))
    w = samples[best]
    return BestOfN(w.text, w.tokens, w.finish_reason, best, scores, samples, seeds, c)


# ---------------------------------------------------------------------------
# ARGS-k
# ---------------------------------------------------------------------------


@dataclass
class ArgsStep:
    candidates: np.ndarray  # the base's top-k token ids, by decreasing log p_base
    base_logprobs: np.ndarray  # log p_base(c)
    rewards: np.ndarray  # r(x, y + c)
    scores: np.ndarray  # log p_base(c) + w * r(x, y + c)
    token: int  # the pick


@dataclass
class ArgsResult:
    text: str
    tokens: list[int]  # the reply (EOS not included, as in Completion)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    steps: list[ArgsStep]
    prompt_tokens: int
    compute: Compute = field(default_factory=Compute)


def top_candidates(base_lp: np.ndarray, k: int) -> np.ndarray:
    """The k highest-probability ids, by decreasing log-prob (ties: lower id first)."""
    ids = G.top_k_ids(base_lp, k)
    return ids[np.lexsort((ids, -base_lp[ids]))]


def args_decode(engine, prompt, rm: RewardModel, k: int = 5, w: float = 1.0, seed: int | None = None,
                max_tokens: int | None = 256, *, sampling: G.SamplingParams | None = None,
                stop=(), raw: bool = False, system: str | None = None, **sampling_kw) -> ArgsResult:  # fmt: skip
    """ARGS-k decoding with reward model `rm` at weight `w` (module docstring). temperature=0 is
    ARGS-greedy; otherwise one uniform per step from default_rng(seed) picks among the k by the
    engine's sampler (temperature, then top-p / min-p over the k). Repeat and DRY penalties are
    not part of ARGS and are refused. The engine's base KV cache is used (and left on this reply)."""
    if not isinstance(rm, RewardModel):
        raise ConfigError(f"ARGS needs a RewardModel (load_reward_model), got {type(rm).__name__}")
    k = _check_count("k", k, engine.base.n_vocab)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
        raise ConfigError(f"the ARGS reward weight w must be a finite number, got {w!r}")
    params = sampling or G.SamplingParams(**sampling_kw)
    if params.repeat_penalty != 1.0 or params.dry_multiplier:
        raise ConfigError(
            "ARGS scores candidates by log p_base + w * r only: set repeat_penalty=1 and dry_multiplier=0"
        )
    base = engine.base
    ids = engine.prompt_ids(prompt, raw, system)
    budget = engine.budget(len(ids), max_tokens)
    rng, text, c, t0 = np.random.default_rng(seed), TextStream(stop), Compute(), time.perf_counter()
    f0, k0, p0 = rm.forwards, rm.tokens_evaluated, rm.prompt_evaluated
    steps, reply, out, finish = [], [], [], "length"
    with engine.hold():  # the base's KV cache, as a Generation's
        logits = base.prefill(ids)
        c.base_forwards = 1
        c.base_tokens = c.base_prompt_tokens = base.last_prefill_evaluated
        rm.score(ids, len(ids))
        for i in range(budget):
            lp = G.log_softmax(logits)
            cands = top_candidates(lp, k)
            rewards, states = rm.branch(cands)
            scores = lp[cands] + np.float32(w) * rewards
            j = G.sample_u(scores, params, rng.random())
            tok = int(cands[j])
            steps.append(ArgsStep(cands, lp[cands], rewards, scores, tok))
            rm.adopt(states[j])
            c.sampled += 1
            piece, finish = after_token(tok, base.eos_ids, text, base.token_bytes, i == budget - 1)
            if piece is None:  # EOS
                break
            reply.append(tok)
            out.append(piece)
            if finish is not None:
                break
            logits = base.step(tok)
            c.base_forwards, c.base_tokens = c.base_forwards + 1, c.base_tokens + 1
    out.append(text.flush())
    c.scorer_forwards, c.scorer_tokens = rm.forwards - f0, rm.tokens_evaluated - k0
    c.scorer_prompt_tokens = rm.prompt_evaluated - p0
    c.seconds = time.perf_counter() - t0
    return ArgsResult("".join(out), reply, finish, steps, len(ids), c)
