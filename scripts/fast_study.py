"""What skipping the ARMs at a step would change, by the base's entropy (issue 21's exactness report).

    .venv/bin/python scripts/fast_study.py [--weights BUNDLE] [--prompts FILE --skip 1500 -n 32]
        [--max-tokens 64] [--arm positive=0.5 ...] [--json OUT]

Decodes each prompt in the exact mode (every ARM at every step, the default sampler, seed = the
prompt's index) and, at every step, also builds what the fast mode would sample from had it
skipped the ARMs there: the base's own penalised log-probs through the same sampler. Per step it
records the base's entropy H and
- KL(exact || skipped) of the raw distributions (temperature 1, no truncation, penalties off):
  how far the model-level distributions are apart;
- TV: the total-variation distance of the two sampler distributions (temperature, top-k, top-p,
  min-p, penalties): the least probability that a draw differs under any coupling;
- pick differs: whether the draw with the step's own uniform differs (the runtime's inverse-CDF
  coupling, i.e. what `--explain`'s base pick reports).
It prints them by entropy bucket, with the share of steps in each, and which buckets the fast
mode skips at fastmode.FAST_TAU. At steps with H >= FAST_TAU the fast mode runs the ARMs (after
catching their caches up), so its difference there is only float rounding
(tests/test_fastmode.py); the "if skipped" columns above the threshold show what a higher
threshold would cost. A one-step measure: after a different pick the sequences part.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from edge_genarm import generation, load
from edge_genarm import guidance as G
from edge_genarm.fastmode import FAST_TAU

TOP_K = (16, 32, 64, 128, 256)  # candidate sets for a restricted ARM LM head
EOS_FLOORS = (-2.0, -4.0, -6.0, -8.0, -10.0, -14.0)  # nats: log p_base(end of reply)
EDGES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, float("inf"))


def read_prompts(path: str, skip: int, n: int) -> list[str]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            if len(out) == n:
                break
            row = json.loads(line)
            out.append(row.get("prompt") or row.get("text"))
    return out


def study(engine, prompts: list[str], max_tokens: int, weights: dict | None) -> list[dict]:
    """One row per decoded step: H, KL, TV, pick differs."""
    rows: list[dict] = []
    real = generation.penalize
    pending: list = []

    def spy(scores, base_lp, seq, p, breakers):  # the loop's penalize: keep both score vectors
        out = real(scores, base_lp, seq, p, breakers)
        if scores is not base_lp:  # the combined scores (the exact mode's); the base's follow
            pending.append((out, real(base_lp, base_lp, seq, p, breakers), scores, base_lp, p))
        return out

    generation.penalize = spy
    try:
        for i, prompt in enumerate(prompts):
            pending.clear()
            c = engine.generate(prompt, max_tokens=max_tokens, seed=i, weights=weights, exact=True, explain=True)
            for rec, (exact_s, base_s, raw, base_lp, p) in zip(c.records, pending):
                pe, pb = G.sampling_distribution(exact_s, p), G.sampling_distribution(base_s, p)
                le = G.log_softmax(raw.astype(np.float64))
                lb = base_lp.astype(np.float64)
                kl = float(np.sum(np.exp(le) * (le - lb)))
                order = np.argsort(-base_lp)
                outside = {k: float(1.0 - pe[order[:k]].sum()) for k in TOP_K}  # exact's mass past the base's top k
                eos = engine.eos_candidates
                rows.append({"H": rec.entropy, "kl": kl, "tv": 0.5 * float(np.abs(pe - pb).sum()),
                             "differs": rec.base_pick != rec.token, "outside": outside,
                             "eos_lp": float(base_lp[eos].max()) if eos.size else -np.inf,
                             "eos_pick": bool(np.isin(rec.token, eos)),
                             "pick_rank": int(np.flatnonzero(order == rec.token)[0])})  # fmt: skip
    finally:
        generation.penalize = real
    return rows


def report(rows: list[dict]) -> list[dict]:
    out = []
    for lo, hi in zip(EDGES, EDGES[1:]):
        b = [r for r in rows if lo <= r["H"] < hi]
        if not b:
            continue
        out.append({"H": f"[{lo:g}, {hi:g})", "share": len(b) / len(rows), "steps": len(b),
                    "kl": float(np.mean([r["kl"] for r in b])), "tv": float(np.mean([r["tv"] for r in b])),
                    "differs": float(np.mean([r["differs"] for r in b])), "skipped": hi <= FAST_TAU})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="bundle (default: the default pack)")
    ap.add_argument("--prompts", default="../shared/data/prompts-train.jsonl")
    ap.add_argument("--skip", type=int, default=1500, help="held-out prompts start here (as the README's eval)")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=W")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    engine = load(a.weights)
    weights = {k: float(v) for k, v in (s.split("=") for s in a.arm)} or None
    rows = study(engine, read_prompts(a.prompts, a.skip, a.n), a.max_tokens, weights)
    table = report(rows)
    w = weights or dict(engine.weights)
    print(f"{len(rows)} steps, weights {w}, fast mode skips H < {FAST_TAU} nats")
    print(f"{'base entropy':>14} {'share':>6} {'steps':>6} {'KL raw':>8} {'TV':>7} {'pick differs':>13}  fast mode")
    for t in table:
        print(f"{t['H']:>14} {t['share']:6.1%} {t['steps']:6d} {t['kl']:8.4f} {t['tv']:7.4f} {t['differs']:13.1%}  "
              + ("skips" if t["skipped"] else "runs the ARMs"))  # fmt: skip
    sk = [r for r in rows if r["H"] < FAST_TAU]
    if sk:
        print(f"skipped steps: {len(sk) / len(rows):.1%}; there mean KL {np.mean([r['kl'] for r in sk]):.4f}, "
              f"mean TV {np.mean([r['tv'] for r in sk]):.4f}, pick differs {np.mean([r['differs'] for r in sk]):.1%}; "
              f"over all steps the pick differs at {sum(r['differs'] for r in sk) / len(rows):.2%} of them")
    if sk:  # the end of the reply: a length objective moves it where the base is sure of going on
        ends = [r for r in sk if r["differs"] and r["eos_pick"]]
        print(f"of the skipped steps' different picks, {len(ends)} of {sum(r['differs'] for r in sk)} are the exact "
              "mode ending the reply; guiding the skipped steps whose base log-prob of the end is at least F too:")
        for floor in EOS_FLOORS:
            add = [r for r in sk if r["eos_lp"] >= floor]
            print(f"  F={floor:4g}: {len(add) / len(rows):6.2%} of steps more guided; they hold "
                  f"{sum(r['differs'] for r in add)} of the skipped steps' {sum(r['differs'] for r in sk)} different picks, "
                  f"{sum(r['differs'] and r['eos_pick'] for r in add)} of the {len(ends)} endings")
    print("the exact mode's sampler mass outside the base's top k (what an ARM LM head restricted to them "
          "cannot draw), mean / max over steps; and the share of exact picks outside it:")
    for k in TOP_K:
        m = [r["outside"][k] for r in rows]
        print(f"  k={k:4d}: mass mean {np.mean(m):.2e}, max {np.max(m):.3f}; picks outside "
              f"{np.mean([r['pick_rank'] >= k for r in rows]):.2%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"weights": w, "tau": FAST_TAU, "buckets": table, "steps": len(rows),
                       "outside_top_k": {k: float(np.mean([r["outside"][k] for r in rows])) for k in TOP_K},
                       "picks_outside_top_k": {k: float(np.mean([r["pick_rank"] >= k for r in rows])) for k in TOP_K}},
                      f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
