"""Per-token cost of ARGS-k against unguided decoding (and Best-of-N's total), on a bundle with
a reward model (`edge-genarm export rm`).

    .venv/bin/python scripts/bench_baselines.py --weights BUNDLE [--rm NAME] [-k 5] [-n 64]
        [--prompts FILE] [--count 4] [--skip 1500]

Same prompts and seeds for every method; greedy (temperature 0) so that the replies run the
same way each time. Wall time of the whole call (prompt prefill included) per output token;
forwards per output token from the methods' own compute records.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--rm", default=None, help="reward model name (default: the bundle's only one)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("-w", type=float, default=1.0)
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--prompts", default="/work/shared/data/prompts-train.jsonl")
    ap.add_argument("--skip", type=int, default=1500)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    import edge_genarm
    from edge_genarm.baselines import args_decode, best_of_n, load_reward_model
    from edge_genarm.records import read_prompts

    prompts = [p for _, p in read_prompts(a.prompts)[a.skip : a.skip + a.count]]
    engine = edge_genarm.load(a.weights, arms=[], threads=a.threads)
    rm = load_reward_model(a.weights, a.rm, threads=a.threads)
    rows = {}

    def run(label, fn):
        toks = secs = 0.0
        fwd = {"base": 0, "scorer": 0}
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            n, base_f, scorer_f = fn(p, i)
            secs += time.perf_counter() - t0
            toks += n
            fwd["base"] += base_f
            fwd["scorer"] += scorer_f
        rows[label] = (toks, secs, fwd)

    def unguided(p, i):
        c = engine.generate(p, max_tokens=a.max_tokens, seed=i, temperature=0, guidance=False)
        return len(c.tokens), c.timings.steps + (1 if c.finish_reason == "stop" else 0), 0

    def args(p, i):
        r = args_decode(engine, p, rm, k=a.k, w=a.w, seed=i, max_tokens=a.max_tokens, temperature=0)
        return len(r.tokens), r.compute.base_forwards, r.compute.scorer_forwards

    def bon(p, i):
        r = best_of_n(engine, p, a.best_of, i, rm, max_tokens=a.max_tokens)
        return len(r.tokens), r.compute.base_forwards, r.compute.scorer_forwards

    run("warm-up", unguided)
    run("unguided", unguided)
    run(f"ARGS-{a.k} (w={a.w})", args)
    run(f"Best-of-{a.best_of} (reward model)", bon)
    del rows["warm-up"]
    print(f"{len(prompts)} prompts, up to {a.max_tokens} tokens, threads {engine.base.threads}")
    print(
        f"{'method':32} {'tokens':>7} {'tok/s':>7} {'ms/tok':>7} {'base fwd/tok':>13} {'scorer fwd/tok':>15}"
    )
    for label, (toks, secs, fwd) in rows.items():
        n = max(1, toks)
        print(f"{label:32} {int(toks):7d} {toks / secs:7.1f} {1e3 * secs / n:7.1f} "
              f"{fwd['base'] / n:13.2f} {fwd['scorer'] / n:15.2f}")  # fmt: skip
    engine.close()


if __name__ == "__main__":
    main()
