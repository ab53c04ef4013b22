"""Where the fast mode's mix head ends replies less often than the exact mode's ARMs (issue 21).

    .venv/bin/python scripts/eos_study.py [--weights BUNDLE] [-n 32] [--max-tokens 64] [--arm concise=1 ...]
        [--shipped | --no-calibration | --int8 SPEC | --keep SPEC | --bias-correct N]

Decodes each held-out prompt in the exact mode (seed = the prompt's index), then reads the same
tokens again through the exact mode's ARMs and through the mix head at the fast mode's alpha, one
position at a time, and at each reply position compares the probability of ending the reply under
    exact:  log p_base + sum_i w_i log p_arm_i
    fast:   log p_base + S log pi_alpha          (S = sum of the weights, alpha = w / S)
(temperature 1, no truncation: the model-level distributions). It prints the mean probability of
the end under each, the expected number of ends per reply (the sum over its positions), and the
mean log-ratio fast / exact, with standard errors over prompts; and the same for the mix head's
own log-prob of the end against the ARMs' mixture.
"""

from __future__ import annotations

import argparse

import numpy as np
from fast_study import read_prompts  # scripts/ is on the path of a script run from it

from edge_genarm import guidance as G
from edge_genarm import load
from edge_genarm.backends.mix import MIX
from edge_genarm.fastmode import FAST_CANDIDATES, FAST_TAU

EDGES = (0.0, 0.5, 1.0, 2.0, 3.0, float("inf"))


def se(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def calibrate(engine, prompts, max_tokens, weights, alpha) -> dict:
    """{(layer, matrix): the mean input of that projection of the shipped mix head} over the exact
    mode's replies to `prompts` (their prompt and reply positions): mix_merge.input_means."""
    from edge_genarm.backends.mix_merge import input_means

    mix, hiddens = engine.mix, []
    for i, prompt in enumerate(prompts):
        c = engine.generate(prompt, max_tokens=max_tokens, seed=i, weights=weights, exact=True)
        seq = engine.prompt_ids(prompt) + [t for t in c.tokens if t not in set(engine.eos_candidates.tolist())]
        engine.base.prefill(seq)
        hiddens.append(np.array(engine.base.hidden_at(mix.tap_layer)[: len(seq)], dtype=np.float32))
    return input_means(mix.shipped.path, hiddens, alpha)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--prompts", default="../shared/data/prompts-train.jsonl")
    ap.add_argument("--skip", type=int, default=1500)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=W")
    ap.add_argument("--shipped", action="store_true", help="the mix head as shipped (LoRAs beside), not merged")
    ap.add_argument("--no-calibration", action="store_true", help="merged without the pack's bias (mix-calib.npz)")
    ap.add_argument("--int8", default="", help="merged projections in int8: LAYER.MATRIX,... or LAYER,... or all")
    ap.add_argument("--keep", default="", help="projections left as shipped (LoRA beside): same form")
    ap.add_argument("--block", type=int, default=None, help="merged int4 in blocks of this size")
    ap.add_argument("--bias-correct", type=int, default=0, metavar="N",
                    help="merged projections get the mean output error (on N calibration prompts from 1400) as a bias")
    a = ap.parse_args()
    if a.int8 or a.keep or a.block or a.bias_correct:
        from edge_genarm.backends import mix_merge

        plain, keys = mix_merge.merged_model, [(L, m) for L in range(26, 30) for m in ("q", "k", "v", "o", "gate", "up", "down")]

        def pick(spec):
            if spec == "all":
                return set(keys)
            out = set()
            for part in filter(None, spec.split(",")):
                layer, _, m = part.partition(".")
                out |= {k for k in keys if k[0] == int(layer) and (not m or k[1] == m)}
            return out

        state = {"x_mean": None}
        def merged(path, gguf, alpha, block_size=None, x_mean=None):
            x_mean = state["x_mean"] if a.bias_correct else x_mean
            return plain(path, gguf, alpha, a.block, bits={k: 8 for k in pick(a.int8)}, keep=pick(a.keep), x_mean=x_mean)

        mix_merge.merged_model = merged
    if a.weights is None:
        from edge_genarm.pack import default_bundle

        a.weights = str(default_bundle())
    engine = load(a.weights)
    weights = {k: float(v) for k, v in (s.split("=") for s in a.arm)} or dict(engine.weights)
    active = {k: w for k, w in weights.items() if w}
    mix = engine.mix
    mix.merge = "off (--shipped)" if a.shipped else True  # merged even where the pack's build did not check it
    if a.no_calibration:
        mix.calibration = None
    kind = "shipped" if a.shipped else "merged, " + ("with the pack's bias" if mix.calibration else "no bias")
    alpha, strength = mix.plan(active)
    if a.bias_correct:
        state["x_mean"] = calibrate(engine, read_prompts(a.prompts, 1400, a.bias_correct), a.max_tokens, weights, alpha)
    mix.set_alpha(alpha)
    eos = engine.eos_candidates
    per_prompt, steps = [], []
    params = G.SamplingParams()
    for i, prompt in enumerate(read_prompts(a.prompts, a.skip, a.n)):
        c = engine.generate(prompt, max_tokens=a.max_tokens, seed=i, weights=weights, exact=True)
        ids = engine.prompt_ids(prompt)
        reply = [t for t in c.tokens if t not in set(eos.tolist())]
        n_pos = len(reply) + (c.finish_reason == "stop")  # the position where the exact mode ended, too
        rows = []
        for k in range(n_pos):
            seq = ids + reply[:k]
            base_lp = G.log_softmax(np.asarray(engine.base.prefill(seq), dtype=np.float64))
            arm_lp = {}
            for unit in engine.units:
                names = [n for n in unit.names if n in active]
                if names:
                    out = unit.prefill(seq, names)
                    arm_lp.update({n: G.log_softmax(np.asarray(v, dtype=np.float64)) for n, v in out.items()})
            mix_lp = G.log_softmax(np.asarray(mix.prefill(seq)[MIX], dtype=np.float64))
            mixture = sum(alpha[j] * arm_lp[n] for j, n in enumerate(mix.objectives) if n in arm_lp)
            exact = G.log_softmax(base_lp + sum(w * arm_lp[n] for n, w in active.items()))
            fast = G.log_softmax(base_lp + strength * mix_lp)
            # the fast mode as it samples: the base alone below FAST_TAU, else the mix head on the
            # base's FAST_CANDIDATES likeliest tokens + the end ids (every other token -inf)
            H = float(-np.sum(np.exp(base_lp) * base_lp))
            if H < FAST_TAU:
                fast_s = base_lp.copy()
            else:
                fast_s = np.full_like(base_lp, -np.inf)
                keep = np.union1d(np.argsort(-base_lp)[:FAST_CANDIDATES], eos)
                fast_s[keep] = (base_lp + strength * mix_lp)[keep]
            pe, pf = G.sampling_distribution(exact, params), G.sampling_distribution(fast_s, params)
            on = np.isfinite(fast_s)  # KL on the fast mode's support, the exact mass past it apart
            le, lf = G.log_softmax(exact[on]), G.log_softmax(fast_s[on])
            steps.append((H, float(np.sum(np.exp(le) * (le - lf))), 0.5 * float(np.abs(pe - pf).sum()),
                          int(np.argmax(exact) != np.argmax(fast_s)), float(np.exp(exact[~on]).sum())))  # fmt: skip
            end = lambda lp: float(np.logaddexp.reduce(lp[eos]))  # noqa: E731
            mixture_n = G.log_softmax(mixture)
            rows.append((np.exp(end(exact)), np.exp(end(fast)), end(fast) - end(exact), end(mix_lp) - end(mixture_n),
                         float(np.sum(np.exp(mixture_n) * (mixture_n - mix_lp)))))  # fmt: skip
        if rows:
            r = np.array(rows)
            per_prompt.append({"n": len(rows), "p_exact": r[:, 0].mean(), "p_fast": r[:, 1].mean(),
                               "sum_exact": r[:, 0].sum(), "sum_fast": r[:, 1].sum(), "dlog": r[:, 2].mean(),
                               "dlog_head": r[:, 3].mean(), "kl_head": r[:, 4].mean()})  # fmt: skip
    P = {k: np.array([p[k] for p in per_prompt]) for k in per_prompt[0]}
    print(f"{len(per_prompt)} prompts, {int(P['n'].sum())} reply positions, weights {weights}, "
          f"alpha {np.round(alpha, 3).tolist()} strength {strength:g}, mix head {kind}"
          f"{f' int8 {a.int8}' if a.int8 else ''}{f' keep {a.keep}' if a.keep else ''}{f' block {a.block}' if a.block else ''}")
    print(f"  p(end) per position, mean      exact {P['p_exact'].mean():.4f} ± {se(P['p_exact']):.4f}   "
          f"fast {P['p_fast'].mean():.4f} ± {se(P['p_fast']):.4f}")
    print(f"  expected ends per reply        exact {P['sum_exact'].mean():.3f}   fast {P['sum_fast'].mean():.3f}   "
          f"fast - exact {np.mean(P['sum_fast'] - P['sum_exact']):+.3f} ± {se(P['sum_fast'] - P['sum_exact']):.3f}")
    print(f"  log p(end) fast - exact        {P['dlog'].mean():+.3f} ± {se(P['dlog']):.3f} nats")
    print(f"  the head's own log pi(end) - the ARMs' mixture's  {P['dlog_head'].mean():+.3f} ± {se(P['dlog_head']):.3f} nats;"
          f" KL(mixture || head) {P['kl_head'].mean():.4f}")
    st = np.array(steps)
    print(f"per step, exact vs the fast mode as it samples (gate {FAST_TAU} nats, {FAST_CANDIDATES} candidates + ends), by the "
          f"base's entropy: KL(exact || fast) at temperature 1 on the fast mode's tokens (exact mass past them apart), TV of the samplers ({params.temperature=}, top-k "
          f"{params.top_k}, top-p {params.top_p}, min-p {params.min_p}; the least chance a draw differs), greedy pick differs")
    for lo, hi in zip(EDGES, EDGES[1:]):
        b = st[(st[:, 0] >= lo) & (st[:, 0] < hi)]
        if len(b):
            print(f"  H [{lo:g}, {hi:g})  {len(b) / len(st):6.1%} of steps   KL {b[:, 1].mean():.4f}   TV {b[:, 2].mean():.4f}"
                  f"   greedy differs {b[:, 3].mean():6.1%}   exact mass past {b[:, 4].mean():.1e}")  # fmt: skip
    print(f"  all            {len(st)} steps   KL {st[:, 1].mean():.4f}   TV {st[:, 2].mean():.4f}   greedy differs {st[:, 3].mean():6.1%}")


if __name__ == "__main__":
    main()
