"""The FastAPI app: the endpoints of both APIs, the chat page and /health, behind the gate
(gate.py: Host, Origin, key, content type, body size, one log line per request).

Module layout (no import circles): common.py holds what the app and both APIs share (State,
JobResponse, read_body, dumps, finite); openai_api.py and ollama_api.py import it, never this
module; only the entry point (command.py) and tests import create_app from here.
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, memory
from . import ollama_api, openai_api
from .common import MAX_BODY, State, error_response
from .gate import Gate
from .params import ApiError
from .presets import Models, model_name
from .worker import Scheduler


def create_app(engine, *, name: str | None = None, api_key: str | None = None, max_queue: int = 16,
               guidance: bool = True, max_body: int = MAX_BODY, allow_origins=()):  # fmt: skip
    """The ASGI app serving `engine` (one generation at a time, `max_queue` more waiting).
    `allow_origins`: web origins, besides the server's own, whose pages may call it (gate.py)."""
    state = State(
        engine, Models(engine, name or model_name(engine), guidance), Scheduler(max_queue), max_body
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.scheduler.close()

    app = FastAPI(title="edge-genarm", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.genarm = state
    _errors(app)
    _pages(app, state)
    openai_api.register(app, state)
    ollama_api.register(app, state)
    gate = Gate(app, api_key, max_body, allow_origins)
    gate.state = state  # for tests and the command
    return gate


def _errors(app) -> None:
    """Every error, ours or the framework's, as the API's error object."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        request.state.error = e.message
        return error_response(e, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        msg = (
            f"no such endpoint: {request.method} {request.url.path}"
            if e.status_code in (404, 405)
            else str(e.detail)
        )
        return await api_error(request, ApiError(e.status_code, msg, None, None, dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        return await api_error(request, ApiError(500, f"internal error: {e}"))


def _pages(app, state: State) -> None:
    """The chat page, its two assets, and /health (queue, counts, memory)."""
    static = resources.files("edge_genarm.server") / "static"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        f = static / name
        if name not in ("app.js", "style.css") or not f.is_file():
            raise ApiError(404, f"no such file: /static/{name}")
        return FileResponse(str(f), media_type="text/javascript" if name.endswith(".js") else "text/css")

    @app.get("/health")
    async def health():
        s = state.scheduler
        return {"status": "ok", "model": state.models.name, "running": s.running is not None,
                "waiting": s.waiting, "max_queue": s.max_queue, "started": s.started, "served": s.served,
                "dropped": s.dropped, "rss_mb": rss_mb(), "trims": memory.trims,
                "trim_ms": round(memory.last_ms, 2)}  # fmt: skip


def rss_mb() -> float | None:
    """This process's resident memory (Linux), for /health and the load test."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None
