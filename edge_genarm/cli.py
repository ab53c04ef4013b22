"""The command line: the `edge-genarm` group, its settings, and the one place its commands are registered.

The commands live beside what they drive: cli_run (generate, chat, bench), cli_export (export
..., calibrate-tau), cli_train (prefs, train-arm, train-rm), cli_eval (eval, compare), cli_batch
(batch), cli_pack (pack ..., bundle inspect, doctor), server/command (serve). They share options
and helpers from cli_common and import nothing from here, so nothing imports this module back.
"""

from __future__ import annotations

import os

import click

from . import cli_batch, cli_eval, cli_export, cli_pack, cli_run, cli_train
from .cli_common import fail, load_engine, model_options
from .errors import EdgeGenarmError
from .server.command import serve_command


@click.group()
@click.version_option(package_name="edge-genarm")
@click.option("-v", "--verbose", is_flag=True, help="Show the log on stderr, llama.cpp's own lines included.")
@click.pass_context
def main(ctx, verbose):
    """edge-genarm: steer a local LLM with autoregressive reward models, offline.

    Settings: command line > EDGE_GENARM_<KEY> environment > config file
    (~/.config/edge-genarm/config.toml) > built-in defaults; see `config show`.
    """
    from .config import default_map, effective

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if verbose:
        from .backends.llama_log import show_log

        show_log()
    if ctx.invoked_subcommand == "config":
        return  # `config show` reports problems itself
    try:
        ctx.default_map = default_map(effective())
    except EdgeGenarmError as e:
        fail(e)


@main.group("config")
def config_group():
    """The effective settings and where each came from."""


@config_group.command("show")
def config_show():
    from .config import config_path, effective

    try:
        settings = effective()
    except EdgeGenarmError as e:
        fail(e)
    click.echo(f"# config file: {config_path()}")
    for k, (v, src) in settings.items():
        click.echo(f"{k:<16}= {v!r:<30} ({src})")


for module in (cli_run, cli_export, cli_train, cli_eval, cli_batch, cli_pack):
    for command in module.COMMANDS:
        main.add_command(command)
main.add_command(serve_command(model_options, load_engine))

if __name__ == "__main__":
    main()
