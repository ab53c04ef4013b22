"""How much of the exact mode's judged gain the fast mode keeps, from one `edge-genarm eval` folder.

    python scripts/fast_kept.py DIR

DIR holds `unguided` and methods run both ways, `SPEC@exact=1` and `SPEC@exact=0` (e.g. the
grid: `--method positive=0.2,concise=0.8@exact=1 --method positive=0.2,concise=0.8@exact=0`).
Per grid point and judge: each mode's paired gain over the unguided replies (same prompt and
seed), the fast mode's share of the exact mode's gain, and the paired difference fast - exact
with its standard error; then each mode's loops (distinct-bigram ratio < 0.6) and NLL under the
base. A share is printed only where the exact gain is at least two standard errors from 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gain_kept import mean_se, records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    a = ap.parse_args()
    cfg, recs = records(a.folder)
    judges = cfg["judges"]
    prompts = sorted({i for (m, i) in recs if m == "unguided"})
    specs = [m[: -len("@exact=1")] for m in cfg["methods"] if m.endswith("@exact=1")]
    for spec in specs:
        ex, fa = f"{spec}@exact=1", f"{spec}@exact=0"
        both = [i for i in prompts if (ex, i) in recs and (fa, i) in recs]
        if not both:
            continue
        print(f"{spec}  ({len(both)} prompts)")
        for j in judges:
            u = [recs[("unguided", i)]["scores"][j] for i in both]
            ge = mean_se([recs[(ex, i)]["scores"][j] - x for i, x in zip(both, u)])
            gf = mean_se([recs[(fa, i)]["scores"][j] - x for i, x in zip(both, u)])
            d = mean_se([recs[(fa, i)]["scores"][j] - recs[(ex, i)]["scores"][j] for i in both])
            share = f"{gf[0] / ge[0]:6.0%}" if abs(ge[0]) >= 2 * ge[1] and ge[0] else "     -"
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
