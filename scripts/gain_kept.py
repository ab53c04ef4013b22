"""How much of a reference pack's judged gain another pack keeps, from `edge-genarm eval` folders.

Both folders must come from the same prompts, seeds and judges (eval records its config in
eval.json); each must hold `unguided` and the methods compared. Per method and judge: each
pack's paired gain over its own unguided replies, their ratio, and the paired difference of
the two packs' replies to the same prompt and seed, with its standard error.

    python scripts/gain_kept.py REF_DIR DIR [DIR ...] [--method SPEC ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def records(folder: Path) -> tuple[dict, dict]:
    cfg = json.loads((folder / "eval.json").read_text())
    out = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[(r["method"], r["prompt_index"])] = r
    return cfg, out


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("others", type=Path, nargs="+")
    ap.add_argument("--method", action="append", help="methods to compare (default: every non-unguided one)")
    a = ap.parse_args()
    ref_cfg, ref = records(a.ref)
    for folder in a.others:
        cfg, got = records(folder)
        same = ("prompts", "skip", "n_prompts", "max_tokens", "seed")
        if any(cfg.get(k) != ref_cfg.get(k) for k in same):
            raise SystemExit(f"{folder}: other prompts/seeds/lengths than {a.ref}: not comparable")
        methods = a.method or [m for m in cfg["methods"] if m and m != "unguided" and m in ref_cfg["methods"]]
        for m in methods:
            idx = sorted(i for (mm, i) in ref if mm == m and (m, i) in got and ("unguided", i) in got)
            parts = []
            for j in cfg["judges"]:
                u_ref = [ref[("unguided", i)]["scores"][j] for i in idx]
                u_got = [got[("unguided", i)]["scores"][j] for i in idx]
                g_ref = mean_se([ref[(m, i)]["scores"][j] - u for i, u in zip(idx, u_ref)])[0]
                g_got = mean_se([got[(m, i)]["scores"][j] - u for i, u in zip(idx, u_got)])[0]
                d, se = mean_se([got[(m, i)]["scores"][j] - ref[(m, i)]["scores"][j] for i in idx])
                ratio = f"{g_got / g_ref:.0%}" if g_ref else "n/a"
                parts.append(f"{j} {g_got:+.3f} vs {g_ref:+.3f} = {ratio} (paired diff {d:+.3f} ± {se:.3f})")
            print(f"{folder.name}  {m}  ({len(idx)} prompts): " + "; ".join(parts))


if __name__ == "__main__":
    main()
