"""The `edge-genarm eval` report: the markdown table, the plots, the front's hypervolume.

Pure presentation of the rows `evaluate.summarize` makes; matplotlib only when plotting.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from .batch import LOOP_RATIO
from .errors import ConfigError
from .paths import atomic_write_json, atomic_write_text


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """The area that the points dominate beyond `ref` (both coordinates higher is better):
    the front's hypervolume against the unguided point when the points are paired gains."""
    pts = sorted({(x, y) for x, y in points if x > ref[0] and y > ref[1]}, key=lambda p: (-p[0], -p[1]))
    area, y_done = 0.0, ref[1]
    for x, y in pts:  # by decreasing x: each point adds the strip above what is already covered
        if y > y_done:
            area += (x - ref[0]) * (y - y_done)
            y_done = y
    return area


# ---------------------------------------------------------------------------
# the report: markdown table + PNG plots
# ---------------------------------------------------------------------------


def format_table(rows: list[dict], judges: list[str]) -> str:
    head = ["method", *judges, *[f"Δ {j}" for j in judges], "loops", "blank", "NLL", "generated", "finished",
            "tok/s", "fwd/tok"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['method']}`"]
        cells += [f"{r[j][0]:+.3f} ± {r[j][1]:.3f}" for j in judges]
        cells += [f"{r[j + '_diff'][0]:+.3f} ± {r[j + '_diff'][1]:.3f}" if j + "_diff" in r else "-" for j in judges]
        cells += [
            f"{100 * r['loop_rate']:.1f}%", f"{100 * r.get('blank_rate', 0.0):.1f}%", f"{r['nll'][0]:.3f}", f"{r['gen_tokens'][0]:.1f}",
            f"{100 * r['finish_rate']:.0f}%", f"{r['tok_per_s']:.1f}", f"{r['forwards_per_token']:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_positive_table(rows: list[dict], judges: list[str]) -> str:
    """The share of replies each sentiment judge calls positive, and its paired change; "" when
    no judge here has a sign (evaluate.POSITIVE_FROM)."""
    polar = [j for j in judges if rows and f"{j}_positive" in rows[0]]
    if not polar:
        return ""
    head = ["method", *[f"{j}: positive" for j in polar], *[f"Δ {j} positive (points)" for j in polar]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['method']}`", *[f"{100 * r[j + '_positive']:.1f}%" for j in polar]]
        cells += [
            f"{100 * r[j + '_positive_diff'][0]:+.1f} ± {100 * r[j + '_positive_diff'][1]:.1f}"
            if j + "_positive_diff" in r else "-" for j in polar
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_reward_vs_speed(rows: list[dict], judge: str, path: Path) -> None:
    """Judged gain over the first method (paired, ± s.e.) against tok/s, one point per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in rows:
        y, e = r.get(f"{judge}_diff", (0.0, 0.0))
        ax.errorbar(r["tok_per_s"], y, yerr=0 if e != e else e, fmt="o", capsize=3)
        ax.annotate(r["method"], (r["tok_per_s"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("tokens per second (measured)")
    ax.set_ylabel(f"paired gain in '{judge}' over '{rows[0]['method']}'")
    ax.set_title("judged reward vs speed")
    fig.tight_layout()
    _save(fig, path)


def front_series(rows: list[dict]) -> dict[str, list[dict]]:
    """GenARM rows (no nudging) grouped by what follows '@' in their label (e.g. a decoding
    mode), each one series of the front; '' is the plain series."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "genarm" and not r["method"].split("@")[0].endswith("nudge"):
            out.setdefault(r["method"].partition("@")[2], []).append(r)
    return out


def front_hypervolumes(rows: list[dict], judge_x: str, judge_y: str) -> dict[str, float]:
    """Each series' hypervolume in (paired gain x, paired gain y) against the first method."""
    return {k: hypervolume([(_gain(r, judge_x), _gain(r, judge_y)) for r in v])
            for k, v in front_series(rows).items()}


def _gain(r: dict, judge: str) -> float:
    return r.get(f"{judge}_diff", (0.0, 0.0))[0]


def plot_front(rows: list[dict], judge_x: str, judge_y: str, path: Path) -> None:
    """The weight grid on two objectives (paired gains): one line per series with its Pareto
    front, baselines as markers named in the legend with their forwards per token. Points are
    labelled by one ARM's weight only (the first of the grid's, named in the title), alternately above and below, so labels stay apart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
    ax.plot([0], [0], "k*", ms=10, label=f"{rows[0]['method']} (reference)")
    hv = front_hypervolumes(rows, judge_x, judge_y)
    # the ARM whose weight labels the points: the first one of the grid (a row's weights omit zeros)
    first_arm = next(iter(max((r["weights"] for r in rows), key=len, default={})), "")
    for k, (series, rs) in enumerate(front_series(rows).items()):
        pts = sorted(((_gain(r, judge_x), _gain(r, judge_y), r) for r in rs), key=lambda p: p[0])
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=0.8, ms=4,
                       label=f"GenARM {series or 'grid'} (hypervolume {hv[series]:.4f})")[0]  # fmt: skip
        front = pareto([(x, y) for x, y, _ in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color=line.get_color(), lw=1.5, alpha=0.5)
        for j, (x, y, r) in enumerate(pts):
            dy = (6 if j % 2 == 0 else -11) * (1 if k % 2 == 0 else -1)
            ax.annotate(f"{r['weights'].get(first_arm, 0.0):g}", (x, y), textcoords="offset points", xytext=(3, dy), fontsize=6,
                        color=line.get_color())  # fmt: skip
    markers = iter("sD^vP<>X")
    for r in rows:
        if r["kind"] in ("bon", "args"):
            ax.plot([_gain(r, judge_x)], [_gain(r, judge_y)], next(markers, "x"), ms=7,
                    label=f"{r['method']} ({r['forwards_per_token']:.1f} fwd/tok)")  # fmt: skip
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(f"paired gain in '{judge_x}'")
    ax.set_ylabel(f"paired gain in '{judge_y}'")
    ax.set_title(f"two objectives over the weight grid (labels: weight of '{first_arm}')", fontsize=9)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (higher is better), by x."""
    pts = sorted(set(points), key=lambda p: (-p[0], -p[1]))
    front, best_y = [], -math.inf
    for x, y in pts:
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the eval plots need matplotlib: pip install 'edge-genarm[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clf()
    from .paths import atomic_write_bytes

    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def write_report(out: Path, cfg, rows: list[dict], methods: list, judges: list[str],
                 command: str) -> Path:  # fmt: skip
    """report.md, summary.json and the plots; returns the report's path. `cfg` is the
    evaluate.EvalConfig (not imported: evaluate imports this module)."""
    plots = []
    if rows:
        plot_reward_vs_speed(rows, judges[-1], out / "reward_vs_speed.png")
        plots.append(("Judged reward vs speed", "reward_vs_speed.png"))
    hv = front_hypervolumes(rows, judges[0], judges[1]) if rows and len(judges) >= 2 else {}
    if hv and sum(len(v) for v in front_series(rows).values()) >= 2:
        plot_front(rows, judges[0], judges[1], out / "front.png")
        plots.append(("Two objectives over the GenARM settings", "front.png"))
    atomic_write_json(out / "summary.json", {"config": asdict(cfg), "rows": rows})
    lines = [
        "# edge-genarm eval",
        "",
        f"`{command}`",
        "",
        f"{rows[0]['n'] if rows else 0} prompts (lines {cfg.skip + 1}-{cfg.skip + cfg.n_prompts} of "
        f"`{Path(cfg.prompts).name}`), {cfg.max_tokens} tokens at most, the same seed per prompt for every "
        f"method (base seed {cfg.seed}). Judges: {', '.join(judges)}. Δ: paired difference from "
        f"`{rows[0]['method'] if rows else '-'}` (mean ± standard error). loops: replies whose distinct-bigram "
        f"ratio is < {LOOP_RATIO}. blank: replies of fewer than two words (which that ratio cannot see). NLL: nats/token under the base. fwd/tok: positions evaluated by any "
        "model beyond the prompt, per generated token.",
        "",
        format_table(rows, judges),
        "",
    ]
    polar = format_positive_table(rows, judges)
    if polar:
        lines += ["Replies judged positive (VADER compound >= 0.05; AFINN > 0), paired change in points:", "",
                  polar, ""]  # fmt: skip
    for series, v in hv.items():
        lines += [f"Front hypervolume ({judges[0]} x {judges[1]} paired gains, against `{rows[0]['method']}`), "
                  f"{series or 'grid'}: {v:.4f}", ""]  # fmt: skip
    for title, f in plots:
        lines += [f"## {title}", "", f"![{title}]({f})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


