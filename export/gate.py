"""The quantization gate: a quantized ARM against its fp32 self, on held-out preference pairs.

For each held-out pair (the same seeded split train-arm held out) both versions score
both responses, r(x, y) = sum_t log pi(y_t | x, y_<t) over response tokens, so the gate
reports what matters for guidance: the ARM's preference accuracy before and after, plus
the mean KL(fp32 || quantized) and top-1 agreement of the next-token distributions over
the response positions. A quantized ARM that loses more than MAX_ACCURACY_DROP is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_genarm.guidance import log_softmax

MAX_ACCURACY_DROP = 0.02


def heldout_pairs(bundle: Path, data: Path, max_len: int, eval_frac: float, seed: int = 0):
    """[(prompt ids, chosen ids, rejected ids)] held out exactly as train-arm held them out."""
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
    return [enc[i] for i in split(len(enc), eval_frac, seed)[1]]


def _response_lp(logits: np.ndarray, n_prompt: int, resp: list[int]) -> tuple[float, np.ndarray]:
    """(summed response log-prob, the log-softmax rows that predict the response)."""
    rows = logits[n_prompt - 1 : n_prompt - 1 + len(resp)].astype(np.float64)
    lp = np.stack([log_softmax(r) for r in rows])
    return float(lp[np.arange(len(resp)), resp].sum()), lp


def gate(ref_logits, got_logits, pairs) -> dict:
    """`ref_logits(ids)`/`got_logits(ids)` -> logits at every position (fp32 and quantized)."""
    wins = {"fp32": 0, "quantized": 0}
    kls, agree, n_pos = [], 0, 0
    for p, w, lo in pairs:
        r = {}
        for which, fn in (("fp32", ref_logits), ("quantized", got_logits)):
            r[which] = [_response_lp(fn(p + y), len(p), y) for y in (w, lo)]
        for which in wins:
            wins[which] += int(r[which][0][0] > r[which][1][0])
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
    }
    out["accuracy_drop"] = out["accuracy_fp32"] - out["accuracy_quantized"]
    out["passed"] = out["accuracy_drop"] <= MAX_ACCURACY_DROP
    return out


def format_gate(name: str, g: dict) -> str:
    return (
        f"gate ARM '{name}': held-out preference accuracy {g['accuracy_fp32']:.3f} fp32 -> "
        f"{g['accuracy_quantized']:.3f} quantized on {g['pairs']} pairs (drop {g['accuracy_drop']:+.3f}, "
        f"max {MAX_ACCURACY_DROP}); KL {g['mean_kl']:.3e}, top-1 {g['top1_agreement']:.3f}: "
        f"{'passed' if g['passed'] else 'REFUSED'}"
    )
