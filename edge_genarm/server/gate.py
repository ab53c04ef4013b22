"""The gate in front of every request: where it comes from (Host, Origin), what it carries
(API key, JSON content type, body size), and one log line per request.

Why: a web page the user visits can POST to a local server without a CORS preflight (a
`text/plain` fetch or a form), and a DNS-rebinding page reaches it under a foreign Host name.
So, as Ollama does:
- On a connection to a loopback address, the Host header must be a loopback name or address
  (localhost, *.localhost, 127.x, [::1], any port); else 403.
- A request with an Origin header must come from the server's own origin, the same port under
  another loopback name (http://localhost:8080 vs http://127.0.0.1:8080), or an origin given with
  `--allow-origin` / $EDGE_GENARM_ORIGINS (comma-separated; '*' allows any); else 403. A page on
  another local port is a foreign origin. Allowed foreign origins get CORS headers and preflights.
- POSTs to /v1 and /api must be `Content-Type: application/json`; else 415, before the body is read.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from urllib.parse import urlsplit

from .common import error_response, is_ollama, too_large
from .params import ApiError
from .worker import Job

log = logging.getLogger("edge_genarm.server")
ORIGINS_ENV = "EDGE_GENARM_ORIGINS"
DEFAULT_PORTS = {"http": 80, "https": 443}


def allowed_origins(given=()) -> tuple[str, ...]:
    """--allow-origin values plus $EDGE_GENARM_ORIGINS, normalised (lower case, no trailing '/')."""
    env = [o for o in os.environ.get(ORIGINS_ENV, "").split(",") if o.strip()]
    return tuple(dict.fromkeys(o.strip().rstrip("/").lower() for o in [*given, *env]))


def is_loopback_name(host: str | None) -> bool:
    if not host:
        return False
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_port(netloc: str, scheme: str = "http") -> tuple[str | None, int | None]:
    """(host, port) of 'host[:port]', the port defaulting by scheme; (None, None) when malformed."""
    try:
        u = urlsplit("//" + netloc)
        return u.hostname, u.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None, None


class Gate:
    """Pure ASGI (no BaseHTTPMiddleware: it would get between a stream and its disconnect)."""

    def __init__(self, app, api_key: str | None, max_body: int, origins=()):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.origins = allowed_origins(origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [0]
        scope.setdefault("state", {})
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        cors = self._cors(scope, headers)
        err = self._where_from(scope, headers)
        if (
            err is None
            and cors
            and scope["method"] == "OPTIONS"
            and "access-control-request-method" in headers
        ):
            return await self._preflight(cors, headers, send)
        err = err or self._check(scope, path, headers)
        if err is not None:
            scope["state"]["error"] = err.message

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                if cors and err is None:
                    msg = {**msg, "headers": [*msg.get("headers", []), *cors]}
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

    # -- where the request comes from -----------------------------------------------------------
    def _where_from(self, scope, headers: dict) -> ApiError | None:
        server = scope.get("server") or (None, None)
        host = headers.get("host", "")
        if is_loopback_name(server[0]) and not is_loopback_name(_host_port(host)[0]):
            return ApiError(403, f"Host '{host[:100]}' is not this machine: a server on a loopback address "
                            "answers only to localhost, 127.x or [::1] (a DNS-rebinding page sends another "
                            "name); bind --host to reach it by another name", None, "forbidden_host")  # fmt: skip
        origin = headers.get("origin")
        if origin is None or self._origin_ok(origin, scope, host):
            return None
        return ApiError(403, f"Origin '{origin[:100]}' may not use this server: a web page from another site "
                        f"or port cannot drive it; to allow one, start it with --allow-origin {origin[:100]} "
                        f"(or set {ORIGINS_ENV})", None, "forbidden_origin")  # fmt: skip

    def _origin_ok(self, origin: str, scope, host: str) -> bool:
        o = origin.strip().rstrip("/").lower()
        if o in self.origins or "*" in self.origins:
            return True
        try:
            u = urlsplit(o)
            o_host, o_port = u.hostname, u.port or DEFAULT_PORTS.get(u.scheme)
        except ValueError:
            return False
        if u.scheme not in DEFAULT_PORTS or o_host is None:
            return False  # 'null' (a file or sandboxed page) and other schemes
        scheme = scope.get("scheme", "http")
        if u.scheme != scheme:
            return False
        if (o_host, o_port) == _host_port(host.lower(), scheme):
            return True  # the server's own origin, as the browser addressed it
        server = scope.get("server") or (None, None)  # the same port under another loopback name
        return is_loopback_name(o_host) and is_loopback_name(server[0]) and o_port == server[1]

    def _cors(self, scope, headers: dict) -> list[tuple[bytes, bytes]]:
        """CORS response headers for an origin allowed by --allow-origin (none for others)."""
        origin = headers.get("origin")
        if origin is None or not (origin.strip().rstrip("/").lower() in self.origins or "*" in self.origins):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    async def _preflight(self, cors, headers: dict, send) -> None:
        allow = headers.get("access-control-request-headers", "authorization, content-type")
        out = [*cors, (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
               (b"access-control-allow-headers", allow.encode("latin-1")), (b"access-control-max-age", b"600")]  # fmt: skip
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})

    # -- what it carries ------------------------------------------------------------------------
    def _check(self, scope, path: str, headers: dict) -> ApiError | None:
        api = path.startswith("/v1/") or is_ollama(path)
        if self.api_key and api:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                why = "no API key was sent" if not given else "the API key is wrong"
                return ApiError(401, f"{why}: send 'Authorization: Bearer <key>' with the server's --api-key",
                                None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if api and scope["method"] in ("POST", "PUT", "PATCH") and kind != "application/json":
            got = f"'{kind[:60]}'" if kind else "none"
            return ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json' (got {got}; "
                            "curl: -H 'Content-Type: application/json')", None, "unsupported_media_type")  # fmt: skip
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            return too_large(self.max_body)
        return None


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
