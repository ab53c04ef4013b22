"""`edge-genarm generate | chat | bench`: one reply, the chat REPL (repl.py), speed (bench.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_common import (
    default_weights,
    fail,
    gen_kwargs,
    load_engine,
    model_options,
    nudge_options,
    prompt_text,
    sampling_options,
    weights_or_default,
)
from .errors import ConfigError, EdgeGenarmError


@click.command()
@click.argument("prompt", required=False)
@model_options
@sampling_options
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, records and timings.")
@click.option("--no-stream", is_flag=True, help="Print the text when done.")
@nudge_options
@click.option("--explain", is_flag=True, help="Mark nudged tokens «new|was» and list what nudging did.")
def generate(prompt, raw, as_json, no_stream, explain, **o):
    """Generate a reply to PROMPT (or to standard input when PROMPT is absent or '-')."""
    prompt = prompt_text(prompt)
    try:
        engine = load_engine(o)
        kw = gen_kwargs(o)
        if explain or as_json or no_stream:
            c = engine.generate(prompt, raw=raw, **kw)
            if explain:
                click.echo(explain_text(engine, c))
            elif as_json:
                click.echo(json.dumps(completion_json(c)))
            else:
                click.echo(c.text)
            return
        gen = engine.stream(prompt, raw=raw, **kw)
        for rec in gen:
            click.echo(rec.text, nl=False)
        click.echo()
        s = gen.timings.summary()
        click.echo(f"[{s['tokens']} tokens, {s['tok_per_s']:.1f} tok/s]", err=True)
    except EdgeGenarmError as e:
        fail(e)


def explain_text(engine, c) -> str:
    """The reply with nudged tokens marked «new|was» and, in the fast mode, tokens decoded without
    the ARMs (a confident step) marked ‹token›; then the nudge and fast-mode summaries."""
    piece = engine.base.token_bytes
    parts = []
    for r in c.records:
        if r.nudged_from is not None:
            was = piece(r.nudged_from).decode("utf-8", "replace")
            parts.append(f"«{r.text}|{was}»")
        elif not r.guided:
            parts.append(f"‹{r.text}›")
        else:
            parts.append(r.text)
    out = "".join(parts)
    skipped = sum(not r.guided for r in c.records)
    if skipped:
        out += f"\n[fast: {len(c.records) - skipped} of {len(c.records)} steps guided; ‹skipped›]"
    if c.nudge is not None:
        s = c.nudge.summary()
        out += (
            f"\n[nudge: {s['sites']} sites in {s['steps']} steps ({s['trigger_rate']:.0%}), "
            f"{s['changed']} changed the token]"
        )
    return out


RECORD_FIELDS = (
    "token", "text", "base_logprob", "combined_logprob", "entropy", "arm_contrib", "fallback", "site",
    "nudged_from", "guided",
)  # fmt: skip


def completion_json(c) -> dict:
    """`generate --json`: the completion with one object per token record."""
    return {
        "text": c.text,
        "finish_reason": c.finish_reason,
        "tokens": c.tokens,
        "weights": c.weights,
        "timings": c.timings.summary(),
        "nudge": None if c.nudge is None else {**c.nudge.summary(), "changes": c.nudge.changes},
        "records": [{k: getattr(r, k) for k in RECORD_FIELDS} for r in c.records],
    }


@click.command()
@model_options
@sampling_options
@nudge_options
def chat(**o):
    """A streaming chat REPL. /help lists the commands."""
    from concurrent.futures import ThreadPoolExecutor

    from .repl import run_repl

    try:
        o = {**o, "weights": weights_or_default(o["weights"])}  # a first-run pack build: in the foreground
    except EdgeGenarmError as e:
        fail(e)
    # The models load while the prompt is already up: typing the first message overlaps
    # the seconds ORT spends creating ARM sessions. The first reply waits for them.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
    pending = pool.submit(load_engine, o)
    pool.shutdown(wait=False)
    try:
        run_repl(pending, gen_kwargs(o))
    except EdgeGenarmError as e:
        fail(e)


@click.command()
@model_options
@click.option("--prompt", default="Write a short story about a lighthouse keeper.", show_default=True)
@click.option("--max-tokens", "-n", default=128, show_default=True)
@click.option("--repeats", default=2, show_default=True, help="Runs per mode; the best is reported.")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--record", is_flag=True, help="Save the faster placement (sequential/overlapped) in the bundle."
)
@click.option("--objectives", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also the cost curve over 1..N objectives, exact and fast modes interleaved; past the "
              "bundle's ARMs, stand-ins (copies of its first ARM's head, run as heads of their own).")  # fmt: skip
@click.option("--no-modes", is_flag=True, help="Only the cost curve (with --objectives).")
def bench(prompt, max_tokens, repeats, as_json, record, objectives, no_modes, **o):
    """Tokens/s unguided vs guided, ms per step for each part, peak RSS, disk."""
    from .bench import format_report, record_placement, run_bench

    try:
        report = {} if no_modes else run_bench(
            lambda parallel, trunk: load_engine({**o, "parallel": parallel, "trunk": trunk}),
            prompt, max_tokens, repeats, trunk=o["trunk"],
        )  # fmt: skip
        if objectives:
            report["cost_curve"] = _cost_curve(o, prompt, max_tokens, repeats, objectives)
        if record:
            rec = record_placement(o.get("weights") or default_weights(), report)
            report["recorded"] = rec
    except EdgeGenarmError as e:
        fail(e)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from .bench import format_curve

        click.echo("\n".join(([format_report(report)] if not no_modes else [])
                              + ([format_curve(report["cost_curve"])] if objectives else [])))  # fmt: skip
    if record and report.get("recorded"):
        click.echo(
            f"recorded: {'overlapped' if report['recorded']['parallel'] else 'sequential'} for these ARMs"
        )


def _cost_curve(o: dict, prompt: str, n: int, repeats: int, k: int) -> dict:
    """bench --objectives K: the curve on the bundle, with stand-ins past its ARMs."""
    import tempfile

    from .bench import CURVE_PROMPTS, objective_curve, stand_in_view
    from .bundle import Bundle

    root = Path(weights_or_default(o["weights"]))
    have = len(Bundle.open(root, verify=False).arms)
    if not have:
        raise ConfigError(f"bench --objectives: bundle '{root}' has no ARM")
    with tempfile.TemporaryDirectory(prefix="edge-genarm-standins-") as d:
        view = stand_in_view(root, k - have, Path(d) / "bundle") if k > have else root
        engine = load_engine({**o, "weights": str(view), "arms": ()})
        try:
            return objective_curve(engine, (prompt, *CURVE_PROMPTS), n, repeats, k)
        finally:
            engine.close()


COMMANDS = [generate, chat, bench]  # registered on `edge-genarm` by cli.py
