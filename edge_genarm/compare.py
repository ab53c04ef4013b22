"""`edge-genarm compare`: the same prompts and seeds under several guidance settings, judged.

A setting is "unguided", or ARM weights "positive=1,concise=0.5", optionally with
"+nudge" (entropy-triggered nudging at the default tau). The replies are batch records
(batch.py): every setting decodes every prompt with the same seed, each reply is scored by
every judge. The table holds means and standard errors, the nudge trigger rate and tokens/s,
then each setting's paired difference from the first one (same prompt, same seed:
prompt-to-prompt variation cancels, so the paired standard error is the one to read).
"""

from __future__ import annotations

import math

from .batch import BatchWork, Progress, Setting, local_runner, parse_setting, record_seed  # noqa: F401 (re-exported)


def run_compare(
    load, items, settings: list[Setting], judges: list[str], max_tokens: int, seed: int = 0, runner=None
) -> list[dict]:
    """Decode every prompt under every setting (prompt i has seed record_seed(seed, i)), with
    the engine `load()` gives or on `runner` (--ray), and summarize; a progress bar on stderr."""
    work = BatchWork(seed=seed, max_tokens=max_tokens, judges=tuple(judges))
    tasks, records = work.tasks(items, settings, set()), []
    bar = Progress(len(tasks), "compare")
    try:
        (runner or local_runner(load))(work, tasks, lambda r: (records.append(r), bar.update(1)))
    finally:
        bar.close()
    return summarize(records, settings, judges)


def summarize(records: list[dict], settings: list[Setting], judges: list[str]) -> list[dict]:
    """One row per setting from batch records: judge means ± s.e., tokens, tok/s, nudge trigger
    rate; then paired differences from the first setting over the (prompt, sample) keys both hold."""
    by = {s.label: {} for s in settings}
    for r in records:
        if r["setting"] in by:
            by[r["setting"]][(r["prompt_index"], r.get("sample", 0))] = r
    rows = []
    for s in settings:
        recs = [by[s.label][k] for k in sorted(by[s.label])]
        tokens = sum(r["n_tokens"] for r in recs)
        seconds = sum(r["timings"]["total_ms"] for r in recs) / 1e3
        row = {
            "setting": s.label,
            "tok_per_s": tokens / seconds if seconds else 0.0,
            "mean_tokens": tokens / max(1, len(recs)),
        }
        for name in judges:
            row[name] = (_mean([r["scores"][name] for r in recs]), _sem([r["scores"][name] for r in recs]))
        if s.nudge:
            sites = sum(r["nudge"]["sites"] for r in recs if r.get("nudge"))
            steps = sum(r["nudge"]["steps"] for r in recs if r.get("nudge"))
            row["trigger_rate"] = sites / max(1, steps)
        rows.append(row)
    first = by[settings[0].label] if settings else {}
    for s, row in zip(settings[1:], rows[1:]):
        keys = sorted(set(by[s.label]) & set(first))
        for name in judges:
            d = [by[s.label][k]["scores"][name] - first[k]["scores"][name] for k in keys]
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
