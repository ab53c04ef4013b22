"""`edge-genarm serve`: the click command (FastAPI and uvicorn are imported only when it runs)."""

from __future__ import annotations

import ipaddress
import logging
import os

import click

from ..errors import EdgeGenarmError


def serve_command(model_options, load_engine) -> click.Command:
    """The command, built from the CLI's model options and loader (no import cycle with cli.py)."""

    @click.command("serve")
    @model_options
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback).")
    @click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
    @click.option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 and /api.")
    @click.option(
        "--max-queue",
        default=16,
        show_default=True,
        type=click.IntRange(0),
        help="Requests that may wait while one generates; past it: 503 with Retry-After.",
    )
    @click.option("--model-name", help="The model id clients see (default: from the GGUF, e.g. smollm2).")
    @click.option(
        "--allow-origin",
        "allow_origins",
        multiple=True,
        metavar="ORIGIN",
        help="A web origin (e.g. http://localhost:3000) whose pages may call the server; repeatable, "
        "'*' for any. Also $EDGE_GENARM_ORIGINS (comma-separated). Default: only the server's own page.",
    )
    def serve(host, port, api_key, max_queue, model_name, allow_origins, **o):
        """OpenAI- and Ollama-compatible server with per-request ARM weights, and a chat page at /."""
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise click.ClickException(
                f"the server needs '{e.name}': pip install 'edge-genarm[serve]'"
            ) from None
        from .app import create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("edge_genarm.server").setLevel(logging.INFO)
        if not _loopback(host) and not api_key:
            click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
                       err=True)  # fmt: skip
        from .. import memory

        memory.one_arena()  # before the engine's threads allocate: see memory.py
        try:
            engine = load_engine(o)
            # warm-up: the first request should not pay for onnxruntime's first runs and lazy tables
            engine.generate("Hello", max_tokens=2, seed=0)
        except EdgeGenarmError as e:
            raise click.ClickException(str(e)) from None
        app = create_app(engine, name=model_name, api_key=api_key, max_queue=max_queue,
                         guidance=not o["no_guidance"], allow_origins=allow_origins)  # fmt: skip
        sched = app.state.scheduler
        sched.stop_grace, sched.on_stuck = STOP_GRACE_S, _exit_mid_forward
        ids = ", ".join(p.id for p in app.state.models.presets)
        click.echo(
            f"serving {ids} on http://{host}:{port}/  (OpenAI: /v1, Ollama: /api, chat page: /)", err=True
        )
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=5)  # fmt: skip
        finally:
            engine.close()

    return serve


# On SIGTERM or Ctrl+C, how long a running generation gets to stop between tokens before the
# process exits without it (uvicorn first gives open responses 5 s).
STOP_GRACE_S = 2.0


def _exit_mid_forward(job) -> None:
    """Exit now: the engine thread is inside one forward (a long prompt's prefill) that nothing can
    interrupt; waiting for it kept a stopped server alive to the end of the prefill (SIGTERM 6 s into
    a 3,300-token prompt on 2 cores: exit after 20 s; now after 7 s, exit status 0). Nothing is
    lost: the KV caches live in memory only."""
    logging.getLogger("edge_genarm.server").warning(
        "stopping without waiting for request %s, which is inside a forward", getattr(job, "id", "?")
    )
    logging.shutdown()
    os._exit(0)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
