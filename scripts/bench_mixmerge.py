"""The mix head as shipped (LoRAs as float nodes beside its int4 weights) against the head merged
at one alpha (backends/mix_merge.py), each run as the fast mode runs it: one base step, then the
head's step on it (restricted LM head included), alternating.

    .venv/bin/python scripts/bench_mixmerge.py [--weights BUNDLE] [--rounds 4] [--alpha 0.5,0.5]

Per round and head, 128 steps after a 130-token prefill: the median base step and the median
head step (ms). "none" runs no head: the base's step alone, for what the head's bytes cost the
base's next step. Heads alternate within each round, so a noisy moment hits each alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge_genarm import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="bundle (default: the default pack)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--alpha", default="0.5,0.5")
    a = ap.parse_args()
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    from edge_genarm.backends.mix import MixUnit

    e = load(a.weights, trunk="base", merge_mix=True)
    if e.mix is None:
        raise SystemExit(f"{a.weights} has no mix head")
    b, mix = e.base, e.mix
    alpha = np.array([float(x) for x in a.alpha.split(",")], np.float32)
    shipped = MixUnit(mix.shipped.path, mix.objectives, mix.tap_layer, mix.group, merge=False)
    merged = MixUnit(mix.shipped.path, mix.objectives, mix.tap_layer, mix.group, merge=True)
    heads = {"none": None, "shipped": shipped, "merged": merged}
    for u in (shipped, merged):
        u.set_alpha(alpha)
    if merged.graph is merged.shipped:
        raise SystemExit(f"the head could not be merged: {merged.merge}")
    ids = np.arange(129)  # the restricted LM head's candidates, as many as the fast mode's
    res = {k: ([], []) for k in heads}
    for _ in range(a.rounds):
        for k, u in heads.items():
            b.prefill(list(range(100, 230)))
            if u is not None:
                u.reset()
                u.run("prefill", b.tokens, None, ids)
            tb, th = [], []
            for i in range(128):
                t0 = time.perf_counter()
                b.step(200 + i % 50)
                t1 = time.perf_counter()
                if u is not None:
                    u.run("prefill", b.tokens, None, ids)
                tb.append(t1 - t0)
                th.append(time.perf_counter() - t1)
            res[k][0].append(1e3 * float(np.median(tb)))
            res[k][1].append(1e3 * float(np.median(th)))
    print(f"alpha {alpha.tolist()}: median ms per step, each round, and the best round")
    for k, (tb, th) in res.items():
        print(f"  {k:<8} base " + " ".join(f"{t:5.2f}" for t in tb) + f"  min {min(tb):5.2f}   head "
              + " ".join(f"{t:5.2f}" for t in th) + f"  min {min(th):5.2f}   sum {min(tb) + min(th):5.2f}")  # fmt: skip
    e.close()


if __name__ == "__main__":
    main()
