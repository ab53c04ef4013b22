"""Unguided vs guided with heads on the base's own layer, interleaved in one process.

    .venv/bin/python scripts/bench_tap.py [--weights BUNDLE] [-n 128] [--repeats 3]

Two engines stay loaded side by side: the plain base (no eval callback: the unguided
reference) and the tapped one (`--trunk base`). Each round runs, one after the other, plain
unguided, tapped unguided (what the callback costs the base), one ARM (positive=0.5) and
every ARM at its default weight, greedy, EOS ignored; the best round per mode is kept, so a
noisy moment on a shared machine hits every mode alike. `edge-genarm bench` measures the
modes one engine after another instead.
"""

from __future__ import annotations

import argparse

from edge_genarm import load
from edge_genarm.guidance import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper."


def tok_s(engine, weights: dict, n: int) -> float:
    c = engine.generate(PROMPT, max_tokens=n, sampling=SamplingParams(0.0, 0, 1.0, 0.0), seed=0,
                        weights=weights, guidance=any(weights.values()), ignore_eos=True)  # fmt: skip
    return c.timings.summary()["tok_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="bundle (default: the default pack)")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    plain, tapped = load(a.weights, arms=[], trunk="graph"), load(a.weights, trunk="base")
    off = {n: 0.0 for n in tapped.arms}
    one = {**off, next(iter(tapped.arms)): tapped.weights[next(iter(tapped.arms))] or 0.5}
    modes = {
        "unguided": (plain, {}),
        "unguided_tap": (tapped, off),
        f"one ARM {one}": (tapped, one),
        f"defaults {dict(tapped.weights)}": (tapped, dict(tapped.weights)),
    }
    for engine, w in modes.values():
        tok_s(engine, w, 8)  # warm-up
    best = dict.fromkeys(modes, 0.0)
    for _ in range(a.repeats):
        for m, (engine, w) in modes.items():
            best[m] = max(best[m], tok_s(engine, w, a.n))
    ref = best["unguided"]
    for m, v in best.items():
        print(f"{m:<48} {v:7.1f} tok/s  {v / ref:5.2f}x unguided")


if __name__ == "__main__":
    main()
