"""What work between two base steps does to the next base step (docs/speed.md, "Why a guided base
step is slower than an unguided one").

    .venv/bin/python scripts/bench_between.py [--weights BUNDLE] [--rounds 4] [--ms 1.6]

The tapped base alone, 128 single-token steps per case, each step timed alone (median), with
between two steps: nothing; a busy loop of `--ms`; a 12 MB memcpy repeated for `--ms`; the mix
head's step (when the pack has one). Cases alternate within each round.
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
    ap.add_argument("--ms", type=float, default=1.6)
    a = ap.parse_args()
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    e = load(a.weights, trunk="base")
    b, mix = e.base, e.mix
    src = np.ones(12_000_000 // 4, dtype=np.float32)
    dst = np.empty_like(src)

    def for_ms(f):
        def g():
            t = time.perf_counter()
            while time.perf_counter() - t < a.ms / 1e3:
                f()

        return g

    cases = {"nothing": lambda: None, f"busy loop {a.ms:g} ms": for_ms(lambda: None),
             f"12 MB memcpy {a.ms:g} ms": for_ms(lambda: np.copyto(dst, src))}  # fmt: skip
    if mix is not None:
        mix.set_alpha(np.full(len(mix.objectives), 1 / len(mix.objectives), np.float32))
        cases["the mix head's step"] = lambda: mix.run("prefill", b.tokens, None, np.arange(129))
    res = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, f in cases.items():
            b.prefill(list(range(100, 130)))
            if mix is not None:
                mix.reset()
            ts = []
            for i in range(128):
                t0 = time.perf_counter()
                b.step(200 + i % 50)
                ts.append(time.perf_counter() - t0)
                f()
            res[k].append(1e3 * float(np.median(ts)))
    print("the base's step (ms, median of 128) with, between two steps:")
    for k, v in res.items():
        print(f"  {k:<24} " + " ".join(f"{t:6.2f}" for t in v) + f"   min {min(v):.2f}")


if __name__ == "__main__":
    main()
