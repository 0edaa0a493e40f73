"""Small HTTP helpers shared by the routes: request ids, JSON and SSE responses (bodies: body.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.protocol import ReplicaInfo

if TYPE_CHECKING:
    from serve_app.admission import Principal


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


def principal_of(request: Request) -> Principal | None:
    """The request's API-key principal (set by AuthMiddleware), None with keys off."""
    return request.scope.get("state", {}).get("principal")


def served_headers(replica: ReplicaInfo) -> dict[str, str]:
    """Which model, replica and node answered: the first thing an operator asks."""
    return {"x-served-model": replica.model, "x-served-replica": replica.replica_id, "x-served-node": replica.node_id}


def json_response(body: Any, replica: ReplicaInfo | None = None, status: int = 200) -> Response:
    return JSONResponse(body, status_code=status, headers=served_headers(replica) if replica else None)


def sse_response(events: AsyncIterator[Any], replica: ReplicaInfo) -> StreamingResponse:
    async def encode() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                if isinstance(event, bytes):  # already SSE-framed (an LLM replica's coalesced events)
                    yield event
                    continue
                payload = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
                yield f"data: {payload}\n\n".encode()
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **served_headers(replica)}
    return ClosingStreamingResponse(encode(), media_type="text/event-stream", headers=headers)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends however it ended: Starlette leaves a generator that
    a client disconnect stopped at a `yield` for the garbage collector, so its `finally` (cancel
    the replica's work, settle the request's usage) would run whenever that comes."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(RuntimeError):  # still running elsewhere: it ends on its own
                    await close()
