"""`edge-genarm compare`: the same prompts and seeds under several guidance settings, judged.

A setting is "unguided", or ARM weights "positive=1,concise=0.5", optionally with
"+nudge" (entropy-triggered nudging at the default tau). Every setting decodes
every prompt with the same seed; each reply is scored by every judge; the table
holds means and standard errors, the nudge trigger rate and tokens/s, then each
setting's paired difference from the first one (same prompt, same seed: prompt-to-prompt
variation cancels, so the paired standard error is the one to read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .nudge import NudgeConfig


@dataclass
class Setting:
    label: str
    weights: dict[str, float]
    nudge: bool = False


def parse_setting(spec: str, arms: list[str]) -> Setting:
    from .bundle import parse_arm_spec

    body, plus_nudge = (spec[: -len("+nudge")], True) if spec.endswith("+nudge") else (spec, False)
    weights = {a: 0.0 for a in arms}
    if body not in ("unguided", "none", ""):
        for part in body.split(","):
            name, w = parse_arm_spec(part)
            if name not in weights:
                raise ConfigError(
                    f"setting {spec!r}: unknown ARM '{name}' (loaded: {', '.join(arms) or 'none'})"
                )
            weights[name] = 1.0 if w is None else w
    return Setting(spec, weights, plus_nudge)


def run_compare(
    engine,
    prompts: list[str],
    settings: list[Setting],
    judges: dict,
    max_tokens: int,
    seed: int = 0,
    progress=None,
) -> list[dict]:
    rows = []
    for s in settings:
        scores = {j: [] for j in judges}
        tokens, seconds, sites, steps = 0, 0.0, 0, 0
        for i, p in enumerate(prompts):
            c = engine.generate(
                p,
                seed=seed + i,
                max_tokens=max_tokens,
                weights=s.weights,
                nudge=NudgeConfig() if s.nudge else None,
            )
            for name, judge in judges.items():
                scores[name].append(float(judge(p, c.text)))
            tokens += len(c.tokens)
            seconds += c.timings.total_s
            if c.nudge is not None:
                sites, steps = sites + len(c.nudge.sites), steps + c.nudge.steps
            if progress:
                progress(s.label, i + 1, len(prompts))
        row = {
            "setting": s.label,
            "tok_per_s": tokens / seconds if seconds else 0.0,
            "mean_tokens": tokens / max(1, len(prompts)),
        }
        for name, v in scores.items():
            row[name] = (_mean(v), _sem(v))
        row["_scores"] = scores
        if s.nudge:
            row["trigger_rate"] = sites / max(1, steps)
        rows.append(row)
    for row in rows[1:]:
        for name in judges:
            d = [a - b for a, b in zip(row["_scores"][name], rows[0]["_scores"][name])]
            row[f"{name}_diff"] = (_mean(d), _sem(d))
    return rows


def _mean(v):
    return sum(v) / len(v) if v else float("nan")


def _sem(v):
    if len(v) < 2:
        return float("nan")
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))


def format_rows(rows: list[dict], judges: list[str]) -> str:
    head = f"{'setting':<34}" + "".join(f"{j:>22}" for j in judges) + f"{'tokens':>8}{'tok/s':>8}{'nudge':>7}"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[j][0]:>+13.3f} ± {r[j][1]:<6.3f}" for j in judges)
        rate = f"{100 * r['trigger_rate']:>6.0f}%" if "trigger_rate" in r else f"{'-':>7}"
        lines.append(f"{r['setting']:<34}{cells}{r['mean_tokens']:>8.1f}{r['tok_per_s']:>8.1f}{rate}")
    if len(rows) > 1:
        lines += ["", f"paired difference from '{rows[0]['setting']}' (same prompts and seeds):"]
        for r in rows[1:]:
            cells = "".join(f"{r[j + '_diff'][0]:>+13.3f} ± {r[j + '_diff'][1]:<6.3f}" for j in judges)
            lines.append(f"{r['setting']:<34}{cells}")
    return "\n".join(lines)
