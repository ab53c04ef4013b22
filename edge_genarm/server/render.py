"""What both APIs say about a generation: token text, log-probs, explain items, the genarm summary."""

from __future__ import annotations

from .common import finite
from .params import Spec
from .worker import Job, Piece


def token_text(engine, tok: int | None) -> str | None:
    if tok is None or tok < 0:
        return None
    return engine.base.token_bytes(tok).decode("utf-8", "replace")


def logprob_entry(engine, piece: Piece) -> dict | None:
    """OpenAI's per-token log-prob object (Ollama's is the same minus `bytes`)."""
    if piece.logprob is None:
        return None

    def one(tok, lp):
        b = engine.base.token_bytes(tok)
        return {"token": b.decode("utf-8", "replace"), "logprob": finite(lp), "bytes": list(b)}

    return {**one(piece.rec.token, piece.logprob), "top_logprobs": [one(t, lp) for t, lp in piece.top or []]}


def explain_item(engine, piece: Piece) -> dict:
    """What guidance and nudging did at this token: the ARM terms w_i log p_arm_i(token), the
    token the base's own scores would have drawn with the same uniform, and a nudge's change."""
    r = piece.rec
    changed = None
    if r.nudged_from is not None:
        changed = "nudge"
    elif r.base_pick is not None and r.base_pick != r.token:
        changed = "guidance"
    return {
        "id": r.token,
        "token": token_text(engine, r.token),
        "arm_terms": {k: finite(v) for k, v in r.arm_contrib.items()},
        "base_pick": None if r.base_pick is None else {"id": r.base_pick, "token": token_text(engine, r.base_pick)},
        "nudged_from": None if r.nudged_from is None else {"id": r.nudged_from,
                                                           "token": token_text(engine, r.nudged_from)},
        "site": r.site,
        "changed": changed,
    }  # fmt: skip


def genarm_summary(job: Job, spec: Spec, preset_id: str, done: bool) -> dict:
    """The weights this request used (every loaded ARM's), and when done its speed and nudges."""
    g = job.gen
    out = {"model": preset_id, "weights": dict(g.weights), "guidance": spec.guidance,
           "active": sorted(g.active), "nudge": spec.nudge is not None, "explain": spec.explain}  # fmt: skip
    if done:
        s = g.timings.summary()
        out["timings"] = {"queue_s": round(job.queue_s, 4), "prompt_ms": round(s["prompt_ms"], 2),
                          "tokens": s["tokens"], "tok_per_s": round(s["tok_per_s"], 2),
                          "prompt_tokens": s["prompt_tokens"], "prompt_evaluated": job.prompt_evaluated}  # fmt: skip
        if g.nudge is not None:
            ns = g.nudge.summary()
            out["nudge"] = {"sites": ns["sites"], "changed": ns["changed"], "steps": ns["steps"]}
    return out


def usage(job: Job) -> dict:
    p, c = job.gen.timings.prompt_tokens, job.steps
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
