"""`edge-genarm eval | compare`: the command lines of evaluate.py (methods, judges, plots,
report) and compare.py (guidance settings side by side, paired differences)."""

from __future__ import annotations

import shlex
import sys
from functools import partial
from pathlib import Path

import click

from .cli_common import default_weights, fail, load_engine, load_options, model_options, weights_or_default
from .distributed import ray_options, runner_from_options
from .errors import EdgeGenarmError
from .records import DataError, read_prompts


@click.command("eval")
@model_options
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL of {"prompt": ...}; use a held-out part (--skip) never used for pairs.')  # fmt: skip
@click.option("--skip", default=0, show_default=True, help="Skip the first N prompts.")
@click.option("-n", "n_prompts", default=64, show_default=True, help="Prompts to use.")
@click.option("--method", "methods", multiple=True, metavar="SPEC",
              help="unguided | nudge | NAME=W[,NAME=W][+nudge] | bon:N[:SCORER] | args:K[:W], repeatable "
              "(default: unguided, each ARM at its default weight, all defaults, nudge, bon:4); GenARM methods "
              "run in the exact mode unless @exact=0 (SPEC@KEY=V,.. sets sampling settings).")  # fmt: skip
@click.option("--grid", "grid", multiple=True, metavar="A:B|NAME=W1,..",
              help="A:B (the 11-point front between two ARMs at their default strength) or NAME=W1,W2,.. (one axis per ARM: every combination), repeatable.")  # fmt: skip
@click.option("--judge", "judges", multiple=True, default=("sentiment", "afinn"), show_default=True,
              help="A judge spec as for `prefs`, repeatable; the last one is the plot's y axis.")  # fmt: skip
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Report folder: records.jsonl (resumable), report.md, summary.json, PNG plots.")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_cmd(prompts_file, skip, n_prompts, methods, grid, judges, max_tokens, seed, out, no_progress, **o):
    """Compare decoding methods on the same prompts and seeds: judged gain, loops, NLL, speed."""
    from .evaluate import EvalConfig, evaluate, expand_grid, parse_method

    try:
        if o["weights"]:  # `pack:NAME` as everywhere else; the eval folder records the bundle's path
            o["weights"] = weights_or_default(o["weights"])
        items = read_prompts(prompts_file)[skip : skip + n_prompts]
        engine = load_engine(o)
        arms = list(engine.arms)
        rm = None
        if any(m.split("@")[0].startswith("args:") or m.split("@")[0].endswith(":rm") for m in methods):
            from .baselines import load_reward_model

            rm = load_reward_model(o["weights"] or default_weights(), threads=o["threads"])
        has_nudges = engine.nudge_table is not None
        specs = list(methods) or default_methods(engine, has_nudges)
        parsed = [parse_method(s, arms, has_nudges, rm is not None) for s in specs]
        parsed += [m for m in expand_grid(list(grid), arms, defaults=engine.weights) if m.label not in {p.label for p in parsed}]
        cfg = EvalConfig(
            _recorded_weights(o), str(Path(prompts_file).resolve()),
            skip, n_prompts, [m.label for m in parsed], list(judges), max_tokens, seed,
        )  # fmt: skip
        command = "edge-genarm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        rows, report = evaluate(engine, cfg, items, parsed, Path(out), command, rm, not no_progress)
    except EdgeGenarmError as e:
        fail(e)
    from .evaluate import format_table

    click.echo(format_table(rows, list(judges)))
    click.echo(f"\nreport: {report}")


def default_methods(engine, has_nudges: bool) -> list[str]:
    """unguided, each ARM at its default weight, all defaults together, nudge, Best-of-4."""
    arms = {a: w for a, w in engine.weights.items()}
    out = ["unguided"]
    out += [f"{a}={w:g}" for a, w in arms.items() if w]
    if sum(1 for w in arms.values() if w) > 1:
        out.append(",".join(f"{a}={w:g}" for a, w in arms.items() if w))
    if has_nudges:
        out.append("nudge")
    if arms:
        out.append(f"bon:4:{next(iter(arms))}")
    return out


def _recorded_weights(o: dict) -> str:
    """The models an eval folder records (a rerun over other models is refused, not mixed)."""
    weights = str(Path(o["weights"]).resolve()) if o["weights"] else "default"
    return weights if not o.get("base") else f"{weights} --base {Path(o['base']).resolve()}"


@click.command()
@model_options
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--skip", default=0, show_default=True, help="Skip the first N prompts (held-out split).")
@click.option("-n", "n_prompts", default=16, show_default=True, help="Prompts to use.")
@click.option("--setting", "settings", multiple=True, metavar="SPEC",
              help="unguided | NAME=W[,NAME=W] [+nudge], repeatable (default: unguided and each ARM).")  # fmt: skip
@click.option("--judge", "judges", multiple=True, default=("sentiment", "length"), show_default=True,
              help="A judge spec as for `prefs`, repeatable.")  # fmt: skip
@click.option("--max-tokens", default=48, show_default=True)
@click.option("--seed", default=0, show_default=True)
@ray_options
def compare(prompts_file, skip, n_prompts, settings, judges, max_tokens, seed, **o):
    """Same prompts and seeds, several guidance settings, judged scores (mean ± s.e.)."""
    from .compare import format_rows, parse_setting, run_compare
    from .loader import load

    try:
        spec = load_options(o, portable=True)
        runner = runner_from_options(o, spec)
        items = read_prompts(prompts_file)[skip : skip + n_prompts]
        if not items:
            raise DataError(f"{prompts_file} has no prompts after --skip {skip}: lower --skip")
        arms = list(spec.arm_weights())
        parsed = [parse_setting(s, arms) for s in settings or ["unguided", *[f"{a}=1" for a in arms]]]
        rows = run_compare(partial(load, spec), items, parsed, list(judges), max_tokens, seed, runner)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(
        f"{len(items)} prompts from {prompts_file} (from line {skip + 1}), --seed {seed} (one seed "
        f"per prompt, shared by the settings); judges: {', '.join(judges)}"
    )
    click.echo(format_rows(rows, list(judges)))


COMMANDS = [eval_cmd, compare]  # registered on `edge-genarm` by cli.py
