"""What the in-place KV cache saves (backends.onnx_arm.KVGraph), by context length.

    .venv/bin/python scripts/bench_kv.py [--weights BUNDLE] [--lengths 50,200,500,1000,2000] [-n 64]

First each head alone (onnxruntime only): the median time of one step with L positions cached,
the copying cache (each forward returns a new cache, the old one copied in) against the in-place
one, for the pack's mix head and an ARM head. Then the engine end to end on a prompt of about
`--prompt-tokens` tokens (a document to summarise), greedy, EOS ignored: unguided, the exact mode
and the fast mode at the default weights, each with both caches, alternating in one process, best
of `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge_genarm import load
from edge_genarm.guidance import SamplingParams


def head_steps(cls, path, extra: dict, lengths: list[int], width: int) -> list[tuple[int, float, float]]:
    hidden = np.random.default_rng(0).normal(0, 1, (1, max(lengths) + 70, width)).astype(np.float32)
    graphs = {}
    for in_place in (False, True):
        g = cls(path, "bench", threads=1, cache=False)
        g._inplace = g._inplace and in_place
        graphs[in_place] = g
    rows = []
    for n in lengths:
        ms = []
        for in_place in (False, True):
            g = graphs[in_place]
            g.reset()
            g.feed(list(range(n)), hidden[:, :n], extra=extra)
            ts = []
            for i in range(n, n + 60):
                t0 = time.perf_counter()
                g.feed([i], hidden[:, i : i + 1], extra=extra)
                ts.append(time.perf_counter() - t0)
            ms.append(1e3 * float(np.median(ts)))
        rows.append((n, ms[0], ms[1]))
    return rows


def set_cache(engine, in_place: bool) -> None:
    for unit in [*engine.units, *([engine.mix] if engine.mix is not None else [])]:
        for g in unit.graphs:
            if not hasattr(g, "_inplace"):  # the shared LM head: no cache
                continue
            if not hasattr(g, "_inplace_ok"):
                g._inplace_ok = g._inplace
            g._inplace = g._inplace_ok and in_place
            g.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="bundle (default: the default pack)")
    ap.add_argument("--lengths", default="50,200,500,1000,2000")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    from pathlib import Path

    from edge_genarm.backends.mix import _MixGraph
    from edge_genarm.backends.trunk import _Head
    from edge_genarm.bundle import Bundle

    b = Bundle.open(a.weights)
    m = b.manifest
    lengths = [int(x) for x in a.lengths.split(",")]
    width = None
    heads = []
    if "mix" in m:
        n_obj = len(m["mix"]["objectives"])
        heads.append((f"mix head ({m['mix']['objectives']})", _MixGraph, Path(a.weights) / m["mix"]["file"],
                      {"alpha": np.full(n_obj, 1 / n_obj, np.float32)}))  # fmt: skip
    for name, arm in m.get("arms", {}).items():
        if arm.get("trunk"):
            heads.append((f"ARM head '{name}'", _Head, Path(a.weights) / arm["file"], {}))
            break
    engine = load(a.weights, trunk="base")
    width = engine.base.hidden.shape[1] if engine.base.taps else 576
    print("one step of a head alone (onnxruntime, 1 thread), median of 60:")
    print(f"  {'head':<36} {'cached':>6} {'copying':>9} {'in place':>9}  ratio")
    for label, cls, path, extra in heads:
        for n, copy_ms, inplace_ms in head_steps(cls, path, extra, lengths, width):
            print(f"  {label:<36} {n:6d} {copy_ms:7.3f} ms {inplace_ms:6.3f} ms  {inplace_ms / copy_ms:.2f}")
    words = ("The lighthouse stood on the rock for two hundred years, and every night its keeper climbed "
             "the stairs to light the lamp, whatever the weather and whoever was watching. ").split()  # fmt: skip
    doc = " ".join(words[i % len(words)] for i in range(int(a.prompt_tokens * 0.75)))
    prompt = "Summarise this in two sentences:\n\n" + doc
    n_prompt = len(engine.prompt_ids(prompt, False, None))
    defaults = dict(engine.weights)
    modes = {"unguided": ({}, True), "exact defaults": (defaults, True), "fast defaults": (defaults, False)}
    sp = SamplingParams(0.0, 0, 1.0, 0.0)
    best = {}
    for r in range(a.repeats + 1):  # the first round warms up
        for mode, (w, exact) in modes.items():
            for in_place in (False, True):
                set_cache(engine, in_place)
                engine.base.reset()
                c = engine.generate(prompt, max_tokens=a.n, sampling=sp, seed=0, weights=w, guidance=bool(w),
                                    ignore_eos=True, exact=exact)  # fmt: skip
                s = c.timings.summary()
                if r:
                    k = (mode, in_place)
                    best[k] = max(best.get(k, 0.0), s["tok_per_s"])
    print(f"\nthe engine on a {n_prompt}-token prompt, {a.n} tokens, best of {a.repeats} (decode tok/s):")
    ref = best[("unguided", True)]
    for mode in modes:
        c, i = best[(mode, False)], best[(mode, True)]
        print(f"  {mode:<16} copying {c:6.1f}  in place {i:6.1f}  ({i / c:.2f}x; {i / ref:.2f}x unguided)")


if __name__ == "__main__":
    main()
