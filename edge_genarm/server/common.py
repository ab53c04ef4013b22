"""What the app and both APIs share: the server's state, error answers, reading a body, and
`JobResponse`, which runs a job while watching the client. Imports no other server module
but params, presets and worker (so app.py, openai_api.py and ollama_api.py form no circle)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .params import ApiError
from .presets import Models
from .worker import Job, QueueFull, Scheduler

log = logging.getLogger("edge_genarm.server")
MAX_BODY = 4 << 20  # bytes: a 4096-token chat is ~16 KB; anything near this is a mistake


@dataclass
class State:
    """What the endpoints serve: one engine, its model ids, the queue in front of it."""

    engine: object
    models: Models
    scheduler: Scheduler
    max_body: int = MAX_BODY
    started: float = field(default_factory=time.time)

    def digest(self) -> str:
        return hashlib.sha256(f"{self.models.name}:{self.engine.base.path}".encode()).hexdigest()


# ---------------------------------------------------------------------------
# errors and JSON
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


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit} bytes: shorten the conversation", None,
                    "request_too_large")  # fmt: skip


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
