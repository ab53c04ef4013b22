"""Parity: an exported model against the Hugging Face model it came from.

Same prompts, same token ids; the exported side runs through the runtime's own
backends (prefill + one step at a time, so the KV-cache path is what is checked).
Reported: top-1 agreement, max |logit difference|, mean KL(p_source || p_export).
"""

from __future__ import annotations

import numpy as np

from edge_genarm.guidance import log_softmax

PROMPTS = [
    "The weather today is",
    "Write a short note to a friend who lost their job.",
    "def fibonacci(n):",
    "Les montagnes sont",
]

# per export type: (max mean KL, min top-1 agreement)
THRESHOLDS = {
    "f32": (1e-3, 0.98),
    "f16": (1e-2, 0.95),
    "bf16": (3e-2, 0.9),
    "q8_0": (3e-2, 0.9),
    "int8": (0.25, 0.6),
    # weight-only int4 drifts more; the real test is the preference gate (export/gate.py)
    "int4": (1.0, 0.5),
}


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def exported_logits(backend, ids: list[int], n_prompt: int) -> np.ndarray:
    """Logits at positions n_prompt-1 .. len(ids)-1 through prefill + step."""
    backend.reset()
    rows = [np.array(backend.prefill(ids[:n_prompt]), dtype=np.float64)]
    for t in ids[n_prompt:]:
        rows.append(np.array(backend.step(t), dtype=np.float64))
    return np.stack(rows)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    v = min(ref.shape[-1], got.shape[-1])
    ref, got = ref[:, :v], got[:, :v]
    lp_r = np.stack([log_softmax(r) for r in ref]).astype(np.float64)
    lp_g = np.stack([log_softmax(g) for g in got]).astype(np.float64)
    kl = float(np.mean(np.sum(np.exp(lp_r) * (lp_r - lp_g), axis=-1)))
    return {
        "top1_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))),
        "max_abs_logit_diff": float(np.max(np.abs(ref - got))),
        "mean_kl": max(kl, 0.0),
        "positions": int(ref.shape[0]),
    }


def run_parity(model, tok, backend, kind: str, continuation: int = 8) -> dict:
    """Compare on PROMPTS, each followed by `continuation` greedy tokens of the source."""
    ref_rows, got_rows = [], []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        full = list(ids)
        for _ in range(continuation):
            full.append(int(reference_logits(model, full)[-1].argmax()))
        ref = reference_logits(model, full)[len(ids) - 1 :]
        ref_rows.append(ref)
        got_rows.append(exported_logits(backend, full, len(ids)))
    result = compare(np.concatenate(ref_rows), np.concatenate(got_rows))
    max_kl, min_top1 = THRESHOLDS.get(kind, THRESHOLDS["int8"])
    result["type"] = kind
    result["passed"] = result["mean_kl"] <= max_kl and result["top1_agreement"] >= min_top1
    return result


def format_parity(label: str, r: dict) -> str:
    verdict = "passed" if r["passed"] else "FAILED"
    return (
        f"parity {label} ({r['type']}): top-1 {r['top1_agreement']:.3f}, max |dlogit| "
        f"{r['max_abs_logit_diff']:.2e}, mean KL {r['mean_kl']:.2e} over {r['positions']} positions: {verdict}"
    )
