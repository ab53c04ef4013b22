"""The FastAPI app: models and presets, the gate (key, body size, one log line per request),
errors as OpenAI error objects, and `JobResponse`, which runs a job while watching the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .params import ApiError
from .worker import Job, QueueFull, Scheduler

log = logging.getLogger("edge_genarm.server")
MAX_BODY = 4 << 20  # bytes: a 4096-token chat is ~16 KB; anything near this is a mistake


# ---------------------------------------------------------------------------
# models: the bundle under one name, and presets as model ids
# ---------------------------------------------------------------------------


@dataclass
class Preset:
    """A model id: the engine with these weights over its defaults, guidance on or off."""

    id: str
    weights: dict[str, float] = field(default_factory=dict)
    guidance: bool = True
    about: str = ""


def model_name(engine) -> str:
    """A short id from the GGUF metadata (general.basename, else general.name, else the file)."""
    info = engine.base.info
    raw = info.get("general.basename") or info.get("general.name") or engine.base.path.stem
    return re.sub(r"[^a-z0-9._-]+", "-", str(raw).lower()).strip("-") or "model"


class Models:
    """`<name>` (the server's defaults), `<name>+<arm>` (that ARM alone: its default weight, or 1
    when the default is 0) and `<name>+base` (no guidance), for front-ends that can only pick a model."""

    def __init__(self, engine, name: str, guidance: bool = True):
        self.name = name
        d = engine.weights
        self.presets = [Preset(name, {}, guidance, "the server's default weights")]
        for arm in engine.arms:
            w = {a: 0.0 for a in engine.arms} | {arm: d.get(arm) or 1.0}
            self.presets.append(Preset(f"{name}+{arm}", w, True, f"ARM '{arm}' alone"))
        if engine.arms and "base" not in engine.arms:
            self.presets.append(Preset(f"{name}+base", {}, False, "the base model alone"))
        self._by_id = {p.id: p for p in self.presets}

    def resolve(self, model) -> Preset:
        if model is None:
            return self.presets[0]
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model")
        p = self._by_id.get(model.removesuffix(":latest"))
        if p is None:
            have = ", ".join(self._by_id)
            raise ApiError(404, f"model '{model}' does not exist: this server has {have}", "model",
                           "model_not_found")  # fmt: skip
        return p


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(err: ApiError, path: str) -> dict:
    """The OpenAI error object; Ollama's own {"error": "..."} on /api/ (its clients read a string)."""
    return {"error": err.message} if is_ollama(path) else err.openai()


def error_response(err: ApiError, path: str) -> JSONResponse:
    return JSONResponse(error_body(err, path), err.status, headers=err.headers)


def finite(x: float | None, floor: float = -9999.0) -> float | None:
    """JSON has no infinities: -inf (a token outside the candidates) becomes -9999, as OpenAI does."""
    if x is None:
        return None
    return x if math.isfinite(x) else floor


# ---------------------------------------------------------------------------
# the gate: API key, body size, and one log line per request
# ---------------------------------------------------------------------------


class Gate:
    """Pure ASGI (no BaseHTTPMiddleware: it would get between a stream and its disconnect)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [0]
        scope.setdefault("state", {})
        err = self._check(scope, path)
        if err is not None:
            scope["state"]["error"] = err.message

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if err is not None:
                await error_response(err, path)(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        except Exception:  # the app has answered 500 already (see create_app's `crash`): log, go on
            log.exception("unexpected error on %s", path)
        finally:
            log.info(_log_line(scope, path, status[0], time.perf_counter() - t0))

    def _check(self, scope, path: str) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.api_key and (path.startswith("/v1/") or is_ollama(path)):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = (
                auth[7:]
                if auth[:7].lower() == "bearer "
                else headers.get(b"x-api-key", b"").decode("latin-1")
            )
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                why = "no API key was sent" if not given else "the API key is wrong"
                return ApiError(401, f"{why}: send 'Authorization: Bearer <key>' with the server's --api-key",
                                None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip
        size = headers.get(b"content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            return too_large(self.max_body)
        return None


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit} bytes: shorten the conversation", None,
                    "request_too_large")  # fmt: skip


def _log_line(scope, path: str, status: int, seconds: float) -> str:
    line = f"{scope['method']} {path} {status} {1e3 * seconds:.0f}ms"
    if scope["state"].get("error"):
        line += f" error: {scope['state']['error']}"
    job: Job | None = scope["state"].get("job")
    if job is not None and job.gen is not None:
        t = job.gen.timings
        tps = t.steps / t.total_s if t.total_s else 0.0
        w = {k: v for k, v in job.gen.weights.items() if v} if job.gen.active else "unguided"
        line += (f" {job.label} {job.status} tokens={t.steps} tok/s={tps:.1f} prompt={t.prompt_tokens}"
                 f" weights={w} queue_wait={job.queue_s:.3f}s")  # fmt: skip
    return line


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) past `limit` bytes even when no Content-Length was sent."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------
# running a job as an HTTP response
# ---------------------------------------------------------------------------


class JobResponse(Response):
    """Admit `job`, run it, and send what `render(pieces)` makes of it.

    The status line goes out with the first chunk, so a request refused at admission (503)
    or failing before its first token still gets its error status. A task listens for
    the client's disconnect meanwhile and cancels everything: a queued job leaves the
    line, a running one stops within a token (worker.Scheduler)."""

    def __init__(self, scheduler: Scheduler, job: Job, render, media_type: str, path: str):
        self.scheduler, self.job, self.render, self.path = scheduler, job, render, path
        self.media_type, self.background = media_type, None

    async def __call__(self, scope, receive, send):
        scope.setdefault("state", {})["job"] = self.job
        try:
            self.scheduler.admit()
        except QueueFull as e:
            err = ApiError(503, f"{e}; retry after {e.retry_after} s (--max-queue {self.scheduler.max_queue})",
                           None, "queue_full", {"Retry-After": str(e.retry_after)})  # fmt: skip
            return await self._fail(err, scope, receive, send)
        async with anyio.create_task_group() as tg:

            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self._stream(scope, receive, send)
            tg.cancel_scope.cancel()

    async def _fail(self, err: ApiError, scope, receive, send):
        scope["state"]["error"] = err.message
        await error_response(err, self.path)(scope, receive, send)

    async def _stream(self, scope, receive, send):
        started = False
        body = self.render(self.job, self.scheduler.run(self.job))
        try:
            async for chunk in body:
                if not started:
                    started = True
                    headers = [(b"content-type", self.media_type.encode()), (b"cache-control", b"no-cache"),
                               (b"x-accel-buffering", b"no")]  # fmt: skip
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except QueueFull as e:  # admitted above, but another request took the last place meanwhile
            err = ApiError(503, str(e), None, "queue_full", {"Retry-After": str(e.retry_after)})
            return await self._fail(err, scope, receive, send)
        except ApiError as e:
            if started:
                raise
            return await self._fail(e, scope, receive, send)
        except Exception as e:  # the engine failed: report it, keep serving
            log.exception("generation failed")
            if started:
                return
            err = ApiError(500, f"generation failed: {e}", None, "generation_failed")
            return await self._fail(err, scope, receive, send)
        finally:
            await body.aclose()
        if not started:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", self.media_type.encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------


@dataclass
class State:
    engine: object
    models: Models
    scheduler: Scheduler
    max_body: int = MAX_BODY
    started: float = field(default_factory=time.time)

    def digest(self) -> str:
        return hashlib.sha256(f"{self.models.name}:{self.engine.base.path}".encode()).hexdigest()


def create_app(engine, *, name: str | None = None, api_key: str | None = None, max_queue: int = 16,
               guidance: bool = True, max_body: int = MAX_BODY):  # fmt: skip
    """The ASGI app serving `engine` (one generation at a time, `max_queue` more waiting)."""
    from . import ollama_api, openai_api

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
                "waiting": s.waiting, "max_queue": s.max_queue, "served": s.served,
                "dropped": s.dropped, "rss_mb": rss_mb()}  # fmt: skip

    openai_api.register(app, state)
    ollama_api.register(app, state)
    gate = Gate(app, api_key, max_body)
    gate.state = state  # for tests and the command
    return gate


def rss_mb() -> float | None:
    """This process's resident memory (Linux), for /health and the load test."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None
