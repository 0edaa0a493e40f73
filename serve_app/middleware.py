"""Cross-cutting ASGI middleware for the router: request ids and error shaping.

Plain ASGI callables (as in starlette's own middleware), so every route gets the same
behaviour without repeating it in handlers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import stories
from serve_app.errors import ApiError, InvalidRequest, from_exception

logger = logging.getLogger("ray.serve")
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,256}")
# Set only by the batch worker's in-process calls (an HTTP scope from Serve never has it): the
# line's owner, already resolved from the key name the batch was stored with.
BATCH_SCOPE = "serve_app.batch_principal"


class RequestIdMiddleware:
    """Puts the request id in `scope["state"]` and guarantees an `X-Request-ID` response header.

    Serve's proxy (and its HAProxy ingress) already assigns one and echoes the client's back, so
    the header is only added here when it was missing from the request, e.g. in unit tests. A
    client id we would not write into logs (not 1-256 visible ASCII characters) is refused with a
    400 rather than replaced: Serve echoes the client's header whatever we do, so a replacement
    would leave the body and the header naming two different ids.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope.get("headers") or [] if k == b"x-request-id"]
        state = scope.setdefault("state", {})
        if not given:
            rid = state["request_id"] = uuid.uuid4().hex

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
                await send(message)

            await self.app(scope, receive, send_with_id)
            return
        if len(given) > 1 or not _VALID_ID.fullmatch(given[0]):
            await send_error(send, InvalidRequest(
                "header X-Request-ID must be one value of 1 to 256 visible ASCII characters", "X-Request-ID"), None)
            return
        state["request_id"] = given[0].decode("ascii")
        await self.app(scope, receive, send)


class ErrorMiddleware:
    """Any exception becomes OpenAI's error shape; client mistakes are 4xx, never 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - this is the one place errors are shaped
            err = from_exception(exc)
            rid = scope.get("state", {}).get("request_id")
            if err.status >= 500:
                logger.exception("request %s failed: %s", rid, type(exc).__name__)
            if started:  # a stream already sent its status; it reports errors in-band
                return
            stories.note_error(err)
            await send_error(send, err, rid)


async def send_error(send: Send, err: ApiError, rid: str | None) -> None:
    body = json.dumps(err.body(rid)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status in (429, 503):
        headers.append((b"retry-after", str(err.retry_after or 1).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Authenticates every request except liveness/readiness and the status, API and schema pages;
    the principal goes in scope state.

    `/ready` stays open for load-balancer probes but shows details only to admin keys. When the
    response has ended (a stream: after its last byte, long after its handler returned), the
    key's in-flight slot taken by the handler's admission is given back, however it ended.
    """

    # /status, /docs: HTML shells without data (and /docs/static/: Swagger UI's files); /openapi.json:
    # the API's shape, public as vLLM's
    OPEN_PATHS = frozenset({"/health", "/ready", "/status", "/docs", "/openapi.json"})
    OPEN_PREFIXES = ("/docs/static/",)

    def __init__(self, app: ASGIApp, admission) -> None:  # admission: serve_app.admission.Admission
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.admission.enabled:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1") or None
            state = scope.setdefault("state", {})
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):  # Serve keeps the app's route_prefix in root_path
                path = path[len(root):]
            if BATCH_SCOPE in scope:  # a batch line, run in-process as its owner (serve_app/batches/worker.py)
                state["principal"] = scope[BATCH_SCOPE]
            elif path in self.OPEN_PATHS or path.startswith(self.OPEN_PREFIXES):
                try:
                    state["principal"] = self.admission.authenticate(auth) if auth else None
                except ApiError:
                    state["principal"] = None
            else:
                state["principal"] = self.admission.authenticate(auth)  # raises 401
        try:
            await self.app(scope, receive, send)
        finally:
            quota = scope.get("state", {}).get("quota") if scope["type"] == "http" else None
            if quota is not None and quota.slot is not None:  # given back off the event loop (a Redis round trip)
                self.admission.store.background("release", lambda: self.admission.release(quota))


class MetricsMiddleware:
    """Requests by model, route and status, and their latency (streams: until the last byte)."""

    def __init__(self, app: ASGIApp, metrics) -> None:  # metrics: serve_app.metrics.RouterMetrics
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import time

        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["started"] = t0
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except asyncio.CancelledError:
            status = 499  # the client went away (or a batch line was preempted): not a server error
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.response(state.get("model", "-"), path, status, (time.perf_counter() - t0) * 1000)
