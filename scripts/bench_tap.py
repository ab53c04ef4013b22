"""Unguided vs guided with heads on the base's own layer, interleaved in one process.

    .venv/bin/python scripts/bench_tap.py [--weights BUNDLE] [-n 128] [--repeats 3] [--fast]

Two engines stay loaded side by side: the plain base (no eval callback: the unguided
reference) and the tapped one (`--trunk base`). Each round runs, one after the other, plain
unguided, tapped unguided (what the callback costs the base), one ARM (positive=0.5) and
every ARM at its default weight, greedy, EOS ignored; the best round per mode is kept, so a
noisy moment on a shared machine hits every mode alike. `edge-genarm bench` measures the
modes one engine after another instead. Each line also gives the base's and each guiding
ARM's forward time per step (the best round's), and the ARMs' time as a share of the base's.
`--fast` adds each guided mode again with `exact=False` (fastmode.py) and prints the share of
steps it guided. Every mode decodes the same prompts (PROMPTS: one long-form, one chat, one
list) and is timed over all of them, so a prompt the fast mode skips more of does not decide it.
"""

from __future__ import annotations

import argparse

from edge_genarm import load
from edge_genarm.guidance import SamplingParams

PROMPTS = ("Write a short story about a lighthouse keeper.", "How was your day?",
           "Give me three tips for a job interview.")  # fmt: skip


def run(engine, weights: dict, n: int, exact: bool = True, prompts=PROMPTS) -> dict:
    """Greedy, EOS ignored, over `prompts`: the per-step figures summed over them."""
    tot = {"tokens": 0, "s": 0.0, "base_s": 0.0, "py_s": 0.0, "guided": 0.0, "arm_s": {}}
    for prompt in prompts:
        c = engine.generate(prompt, max_tokens=n, sampling=SamplingParams(0.0, 0, 1.0, 0.0), seed=0,
                            weights=weights, guidance=any(weights.values()), ignore_eos=True, exact=exact)  # fmt: skip
        s, k = c.timings.summary(), c.timings.steps
        tot["tokens"] += k
        tot["s"] += k / s["tok_per_s"]
        tot["base_s"] += k * s["base_ms"] / 1e3
        tot["py_s"] += k * s["python_ms"] / 1e3
        tot["guided"] += k * s["guided_fraction"]
        for name, ms in s["arm_ms"].items():
            tot["arm_s"][name] = tot["arm_s"].get(name, 0.0) + k * ms / 1e3
    k = tot["tokens"]
    return {"tok_per_s": k / tot["s"], "base_ms": 1e3 * tot["base_s"] / k, "python_ms": 1e3 * tot["py_s"] / k,
            "guided_fraction": tot["guided"] / k, "arm_ms": {a: 1e3 * v / k for a, v in tot["arm_s"].items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="bundle (default: the default pack)")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fast", action="store_true", help="also each guided mode with exact=False")
    ap.add_argument("--merge-mix", action="store_true", default=None,
                    help="the fast mode's mix head merged at each alpha, even where the pack did not check its ends")
    ap.add_argument("--no-merge-mix", dest="merge_mix", action="store_false", help="the mix head as shipped")
    a = ap.parse_args()
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    plain, tapped = load(a.weights, arms=[], trunk="graph"), load(a.weights, trunk="base", merge_mix=a.merge_mix)
    off = {n: 0.0 for n in tapped.arms}
    one = {**off, next(iter(tapped.arms)): tapped.weights[next(iter(tapped.arms))] or 0.5}
    modes = {
        "unguided": (plain, {}, True),
        "unguided_tap": (tapped, off, True),
        f"one ARM {one}": (tapped, one, True),
        f"defaults {dict(tapped.weights)}": (tapped, dict(tapped.weights), True),
    }
    if a.fast:
        modes[f"fast one ARM {one}"] = (tapped, one, False)
        modes[f"fast defaults {dict(tapped.weights)}"] = (tapped, dict(tapped.weights), False)
    for engine, w, exact in modes.values():
        run(engine, w, 8, exact)  # warm-up
    best = {m: {"tok_per_s": 0.0} for m in modes}
    for _ in range(a.repeats):
        for m, (engine, w, exact) in modes.items():
            got = run(engine, w, a.n, exact)
            best[m] = got if got["tok_per_s"] > best[m]["tok_per_s"] else best[m]
    ref = best["unguided"]["tok_per_s"]
    for m, v in best.items():
        arms = " ".join(f"{k} {ms:.2f}" for k, ms in v["arm_ms"].items())  # per unit: a trunk's heads run as one
        cost = sum(v["arm_ms"].values()) / v["base_ms"]
        print(
            f"{m:<48} {v['tok_per_s']:7.1f} tok/s  {v['tok_per_s'] / ref:5.2f}x unguided  "
            f"base {v['base_ms']:.2f} ms/step  python {v['python_ms']:.2f} ms/step"
            + (f"  ARM units ms/step: {arms} ({cost:.2f} of the base's), guided {v['guided_fraction']:.0%}" if arms else "")
        )


if __name__ == "__main__":
    main()
