"""The quantization gate: a quantized ARM against its fp32 self, on held-out preference pairs.

For each held-out pair (the same seeded split train-arm held out) both versions score
both responses, r(x, y) = sum_t log pi(y_t | x, y_<t) over response tokens, so the gate
reports what matters for guidance: the ARM's preference accuracy before and after, plus
the mean KL(fp32 || quantized) and top-1 agreement of the next-token distributions over
the response positions. A quantized ARM that loses more than MAX_ACCURACY_DROP (and more
than MAX_PAIRS_LOST pairs) is refused: `within_gate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edge_genarm.guidance import log_softmax

MAX_ACCURACY_DROP = 0.02
MAX_PAIRS_LOST = 1  # n held-out pairs cannot resolve a drop below 1/n: one flipped pair is noise


def within_gate(drop: float, n: int) -> bool:
    """Whether an accuracy drop on n held-out pairs passes: at most MAX_ACCURACY_DROP, or at
    most MAX_PAIRS_LOST pairs (on the concise ARM's 17 pairs one pair is 0.059; on 120, 0.008)."""
    return drop <= MAX_ACCURACY_DROP + 1e-9 or (n > 0 and round(drop * n) <= MAX_PAIRS_LOST)


def max_drop_text() -> str:
    return f"max {MAX_ACCURACY_DROP} or {MAX_PAIRS_LOST} pair"


def heldout_pairs(
    bundle: Path, data: Path, max_len: int, eval_frac: float, seed: int = 0, training: dict | None = None
):
    """[(prompt ids, chosen ids, rejected ids)] held out exactly as train-arm held them out.
    `training`: the ARM's training record; for an ARM trained relative to its init
    (`train-arm --reference`) each pair gets a 4th item, the init's margin that train-arm
    recorded, and the gate then scores r - r_init as training did (`gate`, `pair_margin`)."""
    from edge_genarm.export.gguf_tokenizer import build_tokenizer
    from edge_genarm.export.train import encode_pairs, load_pairs
    from edge_genarm.export.train_loop import split

    from edge_genarm.bundle import Bundle
    from edge_genarm.gguf import read_gguf

    b = Bundle.open(bundle, verify=False)
    info = read_gguf(b.base_path)
    tok = build_tokenizer(info)
    tok.chat_template = b.chat_template or info.get("tokenizer.chat_template") or tok.chat_template
    enc = encode_pairs(tok, load_pairs(data), max_len, "truncate", {})
    held = [enc[i][:3] for i in split(len(enc), eval_frac, seed)[1]]
    margins = reference_margins(training, len(held))
    return [(*e, m) for e, m in zip(held, margins)] if margins is not None else held


RELATIVE = "relative to the init"  # train_loop's record of a `--reference` ARM ("reward")


def reference_margins(training: dict | None, n: int) -> list[float] | None:
    """The init's margins on the held-out pairs of an ARM trained relative to it, None for a
    plain ARM. Its raw summed log-prob says little (for length pairs the init already prefers
    the shorter reply); without the recorded margins (a record older than them, or another
    split) the gate falls back to raw accuracy and says so."""
    t = training or {}
    if t.get("reward") != RELATIVE:
        return None
    margins = t.get("heldout_reference_margins")
    if margins is None or len(margins) != n:
        why = "not recorded" if margins is None else f"recorded for {len(margins)} pairs, not {n}"
        print(
            f"note: the ARM was trained relative to its init, but the init's held-out margins are {why}: "
            "the gate scores raw summed log-probs (retrain with train-arm --reference to record them)",
            file=sys.stderr,
        )
        return None
    return [float(m) for m in margins]


def reward_kind(pairs) -> str:
    """How `pairs` are scored: relative to the init when they carry its margins (4-tuples)."""
    return RELATIVE if any(len(e) > 3 for e in pairs) else "summed log-prob"


def pair_margin(r_chosen: float, r_rejected: float, pair: tuple) -> float:
    """The margin the gate counts a win on: r_w - r_l, less the init's for a relative ARM."""
    return r_chosen - r_rejected - (pair[3] if len(pair) > 3 else 0.0)


def _response_lp(logits: np.ndarray, n_prompt: int, resp: list[int]) -> tuple[float, np.ndarray]:
    """(summed response log-prob, the log-softmax rows that predict the response)."""
    rows = logits[n_prompt - 1 : n_prompt - 1 + len(resp)].astype(np.float64)
    lp = np.stack([log_softmax(r) for r in rows])
    return float(lp[np.arange(len(resp)), resp].sum()), lp


def gate(ref_logits, got_logits, pairs) -> dict:
    """`ref_logits(ids)`/`got_logits(ids)` -> logits at every position (fp32 and quantized);
    `pairs` from `heldout_pairs` (4-tuples for a relative ARM: accuracy beyond the init's)."""
    wins = {"fp32": 0, "quantized": 0}
    kls, agree, n_pos = [], 0, 0
    for pair in pairs:
        p, w, lo = pair[:3]
        r = {}
        for which, fn in (("fp32", ref_logits), ("quantized", got_logits)):
            r[which] = [_response_lp(fn(p + y), len(p), y) for y in (w, lo)]
        for which in wins:
            wins[which] += int(pair_margin(r[which][0][0], r[which][1][0], pair) > 0)
        for (_, a), (_, b) in zip(r["fp32"], r["quantized"]):
            kls.append(float(np.sum(np.exp(a) * (a - b), axis=-1).mean()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n_pos += a.shape[0]
    n = max(1, len(pairs))
    out = {
        "pairs": len(pairs),
        "accuracy_fp32": wins["fp32"] / n,
        "accuracy_quantized": wins["quantized"] / n,
        "mean_kl": float(np.mean(kls)) if kls else 0.0,
        "top1_agreement": agree / max(1, n_pos),
        "reward": reward_kind(pairs),
    }
    out["accuracy_drop"] = out["accuracy_fp32"] - out["accuracy_quantized"]
    out["passed"] = within_gate(out["accuracy_drop"], len(pairs))
    return out


def format_gate(name: str, g: dict) -> str:
    return (
        f"gate ARM '{name}': held-out preference accuracy{_relative(g)} {g['accuracy_fp32']:.3f} fp32 -> "
        f"{g['accuracy_quantized']:.3f} quantized on {g['pairs']} pairs (drop {g['accuracy_drop']:+.3f}, "
        f"{max_drop_text()}); KL {g['mean_kl']:.3e}, top-1 {g['top1_agreement']:.3f}: "
        f"{'passed' if g['passed'] else 'REFUSED'}"
    )


def _relative(g: dict) -> str:
    return f" ({RELATIVE})" if g.get("reward") == RELATIVE else ""
