"""`edge-genarm pack ... | bundle inspect | doctor`: the default pack, and what is in a bundle."""

from __future__ import annotations

import click

from .cli_common import default_weights, fail
from .errors import EdgeGenarmError


@click.group("pack")
def pack_group():
    """The built-in default pack: build, list, remove."""


@pack_group.command("build")
@click.argument("name", default="default")
@click.option("--force", is_flag=True, help="Rebuild from scratch.")
@click.option(
    "--retrain",
    is_flag=True,
    help="Train the ARMs from the recipe's pairs instead of its committed adapters.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show every tool's output, not one line per stage.")
def pack_build(name, force, retrain, verbose):
    """Build pack NAME from its recipe under models/ (resumes an interrupted build)."""
    import time

    from .pack import build_pack_quietly

    t0 = time.time()
    try:
        bundle = build_pack_quietly(name, force, retrain, verbose)
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"pack '{name}' ready at {bundle} ({time.time() - t0:.0f} s)")


@pack_group.command("list")
def pack_list():
    from .pack import list_packs

    for p in list_packs():
        click.echo(f"{p['name']:<12} {p['state']:<10} {p['mb']:>8.1f} MB  {p['path']}")


@pack_group.command("rm")
@click.argument("name", default="default")
def pack_rm(name):
    from .pack import remove_pack

    click.echo(f"removed pack '{name}'" if remove_pack(name) else f"pack '{name}' is not built")


@click.group("bundle")
def bundle_group():
    """Look inside bundles."""


@bundle_group.command("inspect")
@click.argument("path", type=click.Path(exists=True))
def bundle_inspect(path):
    """Models, sizes, vocab, chat template, ARMs, weights, beta_r, hashes, parity."""
    from edge_genarm.export.commands import inspect_bundle

    try:
        click.echo(inspect_bundle(path))
    except EdgeGenarmError as e:
        fail(e)


@click.command()
@click.option("--weights", "-m", help="Bundle folder or .gguf file to check (default: the default model).")
@click.option("--arm", "arms", multiple=True, metavar="NAME=W")
def doctor(weights, arms):
    """What this machine runs (llama.cpp backend, onnxruntime providers, threads) and a bundle check."""
    from .doctor import format_checks, run_checks

    checks = run_checks(weights or default_weights(), list(arms) or None)
    click.echo(format_checks(checks))
    if any(not ok for _, ok, _, _ in checks):
        raise SystemExit(1)


COMMANDS = [pack_group, bundle_group, doctor]  # registered on `edge-genarm` by cli.py
