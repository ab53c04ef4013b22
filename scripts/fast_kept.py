"""How much of the exact mode's judged gain the fast mode keeps, from one `edge-genarm eval` folder.

    python scripts/fast_kept.py DIR [DIR ...]

DIR holds `unguided` and methods run both ways, `SPEC@exact=1` and `SPEC@exact=0` (e.g. the
grid: `--method positive=0.2,concise=0.8@exact=1 --method positive=0.2,concise=0.8@exact=0`).
Per grid point and judge: each mode's paired gain over the unguided replies (same prompt and
seed), the fast mode's share of the exact mode's gain, and the paired difference fast - exact
with its standard error; then each mode's loops (distinct-bigram ratio < 0.6) and NLL under the
base. A share is printed only where the exact gain is at least two standard errors above 0
("loss": as far below it).

Several folders (the same evaluation at other `--seed`s) are pooled: each prompt's differences
are averaged over the seeds first, and the standard errors are over prompts (the replies to one
prompt are not independent of each other).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gain_kept import mean_se, records  # noqa: E402


def pooled(keys: list, x: dict, y: dict) -> tuple[float, float]:
    """Mean and SE of x - y over (seed, prompt) keys: per prompt, the mean over its seeds first."""
    by: dict = {}
    for k in keys:
        by.setdefault(k[1], []).append(x[k] - y[k])
    return mean_se([sum(v) / len(v) for v in by.values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    a = ap.parse_args()
    cfg, recs, seeds = None, {}, []
    for folder in a.folders:
        c, r = records(folder)
        if cfg is not None and any(c[k] != cfg[k] for k in ("weights", "prompts", "skip", "max_tokens")):
            sys.exit(f"{folder}: another evaluation than {a.folders[0]} (not only another seed)")
        cfg = cfg or c
        seeds.append(c["seed"])
        recs.update({(m, (c["seed"], i)): x for (m, i), x in r.items()})
    if len(set(seeds)) != len(seeds):
        sys.exit(f"the folders repeat a seed ({seeds}): nothing to pool")
    judges = cfg["judges"]
    prompts = sorted({i for (m, i) in recs if m == "unguided"})
    specs = [m[: -len("@exact=1")] for m in cfg["methods"] if m.endswith("@exact=1")]
    for spec in specs:
        ex, fa = f"{spec}@exact=1", f"{spec}@exact=0"
        both = [i for i in prompts if (ex, i) in recs and (fa, i) in recs]
        if not both:
            continue
        n_prompts = len({i for _, i in both})
        print(f"{spec}  ({n_prompts} prompts x {len(both) // max(1, n_prompts)} seeds)")

        for j in judges:
            sc = {m: {k: recs[(m, k)]["scores"][j] for k in both} for m in ("unguided", ex, fa)}
            ge = pooled(both, sc[ex], sc["unguided"])
            gf = pooled(both, sc[fa], sc["unguided"])
            d = pooled(both, sc[fa], sc[ex])
            # a share of a gain only: where the exact mode loses on a judge (positive lengthens
            # replies: a loss on tokens) there is no gain to keep
            share = ("  loss" if ge[0] < 0 else f"{gf[0] / ge[0]:6.0%}") if abs(ge[0]) >= 2 * ge[1] and ge[0] else "     -"
            print(f"  {j:<10} exact {ge[0]:+8.3f} ± {ge[1]:.3f}   fast {gf[0]:+8.3f} ± {gf[1]:.3f}   kept {share}"
                  f"   fast - exact {d[0]:+.3f} ± {d[1]:.3f}")  # fmt: skip
        for name, m in (("exact", ex), ("fast", fa)):
            rs = [recs[(m, i)] for i in both]
            print(f"  {name:<5} loops {sum(r['loops'] for r in rs) / len(rs):5.1%}  "
                  f"NLL {sum(r['nll'] for r in rs) / len(rs):.3f}")
    u = [recs[("unguided", i)] for i in prompts]
    print(f"unguided loops {sum(r['loops'] for r in u) / len(u):.1%}  NLL {sum(r['nll'] for r in u) / len(u):.3f}")


if __name__ == "__main__":
    main()
