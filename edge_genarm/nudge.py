"""Entropy-triggered nudging (GGRO, edge variant: ALGORITHMS.md sections 2-3).

Pure NumPy. At a *site* (the first content token, then any step whose base
entropy H >= tau at least `min_gap` tokens after the previous site) the step is
restricted to the base's top-K candidates and each gets

    pick(v) = log p_base(v) + sum_i w_i log p_arm_i(v) + strength * z(v)

where z is the precomputed nudge score <d, E[v]> standardised over the K
candidates (d: a reward-gradient direction computed at export time, globally
or for the context's cluster). Mode "force" emits argmax pick (faithful to
GGRO); mode "bias" adds strength * z to the candidates' scores and samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError, ConfigError
from .gguf import vocab_fingerprint
from .guidance import top_k_ids

MODES = ("force", "bias")
NUDGE_FORMAT = "edge-genarm-nudges"


@dataclass(frozen=True)
class NudgeConfig:
    """Nudging settings; the single home of their defaults (GGRO's chat settings)."""

    tau: float = 1.5  # entropy threshold in nats
    min_gap: int = 3  # a site needs step - last_site >= min_gap
    top_k: int = 25
    mode: str = "force"
    strength: float = 1.0  # weight of the standardised nudge score
    context: int = 8  # recent tokens that choose the context cluster
    # forward-only verification: roll the best `rollouts` candidates out `rollout_len` tokens
    # (greedy on the combined scores) and keep the one with the highest summed ARM term
    rollouts: int = 0
    rollout_len: int = 4

    def __post_init__(self) -> None:
        if (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, (int, float))
            or not math.isfinite(self.tau)
        ):
            raise ConfigError(f"nudge tau must be a number of nats, got {self.tau!r}")
        if self.tau < 0:
            raise ConfigError(f"nudge tau must be >= 0 nats (entropy is never negative), got {self.tau}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"nudge top-K must be an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.min_gap, int) or self.min_gap < 1:
            raise ConfigError(f"nudge gap must be an integer >= 1, got {self.min_gap!r}")
        if self.mode not in MODES:
            raise ConfigError(f"nudge mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("rollouts", "rollout_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "rollouts" else 1):
                raise ConfigError(
                    f"nudge {name} must be an integer >= {0 if name == 'rollouts' else 1}, got {v!r}"
                )
        if not math.isfinite(self.strength):
            raise ConfigError(f"nudge strength must be finite, got {self.strength!r}")


def is_site(step: int, entropy: float, last_site: int | None, cfg: NudgeConfig) -> bool:
    """The trigger rule: first content token always; then H >= tau and a gap since the last site."""
    if step == 0:
        return True
    return entropy >= cfg.tau and (last_site is None or step - last_site >= cfg.min_gap)


def choose_tau(entropies: list[list[float]], target_rate: float, min_gap: int = 3) -> float:
    """The tau whose trigger rule fires on about `target_rate` of all steps (bisection)."""
    if not 0.0 < target_rate < 1.0:
        raise ConfigError(f"target trigger rate must be in (0, 1), got {target_rate}")
    total = sum(len(e) for e in entropies)
    if total == 0:
        raise ConfigError("no steps to calibrate on: generate from a few prompts first")

    def rate(tau: float) -> float:
        cfg, fired = NudgeConfig(tau=tau, min_gap=min_gap), 0
        for seq in entropies:
            last = None
            for i, h in enumerate(seq):
                if is_site(i, h, last, cfg):
                    fired, last = fired + 1, i
        return fired / total

    lo, hi = 0.0, max(max(e) for e in entropies if e) + 1e-6
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > target_rate else (lo, mid)
    return round(hi, 4)


# ---------------------------------------------------------------------------
# the nudge table: precomputed <d, E[v]> per direction, plus context clusters
# ---------------------------------------------------------------------------


@dataclass
class NudgeTable:
    scores: np.ndarray  # [1 + C, V] float: row 0 global, rows 1.. per cluster
    ctx_proj: np.ndarray | None = None  # [V, r] token features for choosing a cluster
    centroids: np.ndarray | None = None  # [C, r]
    meta: dict = field(default_factory=dict)

    @property
    def n_vocab(self) -> int:
        return int(self.scores.shape[1])

    def direction_for(self, context: list[int]) -> np.ndarray:
        """Scores of the context's cluster (nearest centroid of its mean token feature), else global."""
        if self.centroids is None or self.ctx_proj is None or not context or len(self.scores) == 1:
            return self.scores[0]
        ids = [t for t in context if 0 <= t < self.ctx_proj.shape[0]]
        if not ids:
            return self.scores[0]
        f = self.ctx_proj[ids].astype(np.float32).mean(0)
        c = int(np.argmin(((self.centroids - f) ** 2).sum(1)))
        return self.scores[1 + c]

    def save(self, path: str | Path) -> None:
        from .paths import atomic_write_bytes

        arrays = {"scores": self.scores.astype(np.float16)}
        if self.centroids is not None:
            arrays["ctx_proj"] = self.ctx_proj.astype(np.float16)
            arrays["centroids"] = self.centroids.astype(np.float32)
        meta = {"format": NUDGE_FORMAT, "version": 1, **self.meta}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write_bytes(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path, base_tokens: list[str] | None = None) -> NudgeTable:
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(z["meta"]).decode())
            scores = z["scores"].astype(np.float32)
        except Exception as e:
            raise BundleError(
                f"nudge file '{path}' is unreadable ({type(e).__name__}): re-run `edge-genarm export nudges`"
            ) from None
        if meta.get("format") != NUDGE_FORMAT:
            raise BundleError(f"'{path}' is not an edge-genarm nudge file")
        table = cls(
            scores,
            z["ctx_proj"].astype(np.float32) if "ctx_proj" in z else None,
            z["centroids"] if "centroids" in z else None,
            meta,
        )
        if base_tokens is not None:
            table.check_vocab(base_tokens, path)
        return table

    def check_vocab(self, base_tokens: list[str], path) -> None:
        n = self.meta.get("n_vocab")
        fp = self.meta.get("vocab_fingerprint")
        if n != len(base_tokens) or fp != vocab_fingerprint(base_tokens):
            raise BundleError(
                f"nudge file '{path}' was computed for another tokenizer or model (vocab {n}, "
                f"fingerprint {str(fp)[:12]}) than this base (vocab {len(base_tokens)}): "
                "re-run `edge-genarm export nudges` for this bundle"
            )


# ---------------------------------------------------------------------------
# the step: which token a site gets
# ---------------------------------------------------------------------------


@dataclass
class NudgeReport:
    steps: int = 0
    sites: list[int] = field(default_factory=list)
    changes: list[tuple[int, int, int]] = field(default_factory=list)  # (step, original, nudged)
    # per verified site: (step, [(candidate, summed weighted ARM log-prob of its rollout)])
    rollouts: list[tuple[int, list[tuple[int, float]]]] = field(default_factory=list)
    rollout_tokens: int = 0  # forwards spent on rollouts (each: base + every ARM)

    def note(self, step: int, site: bool, sampled: int, chosen: int, rollouts=None, forwards: int = 0) -> None:
        """Record one step: whether it was a site, a changed pick, a site's rollouts and their forwards."""
        self.steps += 1
        if site:
            self.sites.append(step)
        if rollouts is not None:
            self.rollouts.append((step, rollouts))
            self.rollout_tokens += forwards
        if chosen != sampled:
            self.changes.append((step, sampled, chosen))

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "sites": len(self.sites),
            "changed": len(self.changes),
            "trigger_rate": len(self.sites) / self.steps if self.steps else 0.0,
            "verified": len(self.rollouts),
            "rollout_tokens": self.rollout_tokens,
        }


def candidate_scores(
    base_lp: np.ndarray, scores: np.ndarray, k: int, nudge: np.ndarray | None, strength: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate ids = base top-K, pick scores, standardised nudge z) at a site.

    `scores` are the combined scores (base + weighted ARM log-probs), so
    scores - base_lp is each candidate's ARM term: the exact immediate reward.
    """
    if k > base_lp.size:
        raise ConfigError(f"nudge top-K {k} is larger than the vocabulary ({base_lp.size})")
    ids = top_k_ids(base_lp, k)
    ids = ids[np.argsort(-base_lp[ids], kind="stable")]
    pick = scores[ids].astype(np.float64)
    z = np.zeros(ids.size)
    if nudge is not None:
        raw = nudge[ids].astype(np.float64)
        sd = raw.std()
        z = (raw - raw.mean()) / sd if sd > 0 else z
        pick = pick + strength * z
    return ids, pick, z


@dataclass
class SiteDecision:
    """What nudging decided at a site: in force mode the token (`forced`), in bias mode the scores
    to sample from (`biased`); `ranked` holds the candidate ids best first (by pick score in force
    mode, by biased score in bias mode): the ones rollouts verify."""

    forced: int | None
    biased: np.ndarray | None
    ranked: list[int]


def apply_site(base_lp, scores, cfg: NudgeConfig, nudge: np.ndarray | None) -> SiteDecision:
    """The nudge's decision at a site (`scores`: the combined scores the sampler would draw from)."""
    ids, pick, z = candidate_scores(base_lp, scores, cfg.top_k, nudge, cfg.strength)
    if cfg.mode == "force":
        ranked = [int(i) for i in ids[np.argsort(-pick, kind="stable")]]
        return SiteDecision(int(ids[int(np.argmax(pick))]), None, ranked)
    biased = scores.copy()
    biased[ids] += np.float32(cfg.strength) * z.astype(np.float32)
    return SiteDecision(None, biased, [int(i) for i in ids[np.argsort(-biased[ids], kind="stable")]])
