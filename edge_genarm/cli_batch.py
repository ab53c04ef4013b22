"""`edge-genarm batch`: the command line of batch.py (locally, or on Ray with --ray)."""

from __future__ import annotations

import json
from functools import partial

import click

from .cli_common import (
    fail,
    load_options,
    model_options,
    nudge_options,
    nudge_params,
    sampling_options,
    sampling_params,
)
from .distributed import ray_options, runner_from_options
from .errors import ConfigError, EdgeGenarmError


@click.command("batch")
@model_options
@sampling_options
@nudge_options
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL of {"prompt": ...} lines.')  # fmt: skip
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Records JSONL (appended; a rerun skips what it holds).")  # fmt: skip
@click.option("--setting", "settings", multiple=True, metavar="SPEC",
              help="unguided | NAME=W[,NAME=W] [+nudge], repeatable (default: the --arm weights).")  # fmt: skip
@click.option("-k", default=1, show_default=True, help="Samples per prompt and setting.")
@click.option("--judge", "judges", multiple=True, help="A judge spec as for `prefs`, repeatable.")
@click.option("--skip", default=0, show_default=True, help="Skip the first N prompts.")
@click.option("--limit", type=int, help="Use only N prompts (after --skip).")
@click.option("--on-error", default="stop", show_default=True, type=click.Choice(["stop", "skip"]),
              help="A bad prompt line: stop with its line number, or skip it.")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@ray_options
def batch_cmd(prompts_file, out, settings, k, judges, skip, limit, on_error, no_progress, **o):
    """One JSON record per prompt, setting and sample: text, tokens, finish, timings, judges' scores.

    Every setting of a prompt uses the same seed (paired comparisons); seeds depend only on
    (--seed, prompt line, sample), so the records are the same locally and with --ray.
    """
    from .batch import BatchWork, default_setting, parse_setting, run_batch
    from .loader import load
    from .records import read_prompts

    try:
        if o["no_guidance"] and settings:
            raise ConfigError("--no-guidance with --setting: give '--setting unguided' instead")
        spec = load_options(o, portable=True)
        runner = runner_from_options(o, spec)
        items = read_prompts(prompts_file, on_error)[skip:][:limit]
        weights = spec.arm_weights()
        if settings:
            parsed = [parse_setting(s, list(weights)) for s in settings]
        else:
            base = {n: 0.0 for n in weights} if o["no_guidance"] else weights
            parsed = [default_setting(base, nudge=o["nudge"])]
        work = BatchWork(
            seed=o["seed"] or 0, k=k, max_tokens=o["max_tokens"], judges=tuple(judges),
            sampling=sampling_params(o), nudge=nudge_params(o),
            stop=tuple(o["stop"]), system=o["system"], exact=o.get("exact"),
        )  # fmt: skip
        stats = run_batch(partial(load, spec), items, parsed, out, work=work, runner=runner, progress=not no_progress)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(json.dumps({"out": out, **stats}))


COMMANDS = [batch_cmd]  # registered on `edge-genarm` by cli.py
