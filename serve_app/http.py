"""Small HTTP helpers shared by the routes: strict body parsing, JSON and SSE responses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.protocol import ReplicaInfo
from serve_app.errors import InvalidRequest, PayloadTooLarge, UnsupportedParameter

M = TypeVar("M", bound=BaseModel)


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


async def parse_body(request: Request, model: type[M], max_bytes: int, unsupported: Iterable[str] = ()) -> M:
    """Parse and validate a JSON body; every failure is a 4xx that names the problem."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body of {len(raw)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    for name in unsupported:
        if data.get(name) is not None:
            raise UnsupportedParameter(f"parameter '{name}' is not supported by this server", name)
        data.pop(name, None)  # explicitly null: the client asked for nothing, accept it
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UnsupportedParameter(f"unknown parameter '{loc}'", loc) from None
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise InvalidRequest(f"invalid request: {detail}", loc or None) from None


def served_headers(replica: ReplicaInfo) -> dict[str, str]:
    """Which model, replica and node answered: the first thing an operator asks."""
    return {"x-served-model": replica.model, "x-served-replica": replica.replica_id, "x-served-node": replica.node_id}


def json_response(body: Any, replica: ReplicaInfo | None = None, status: int = 200) -> Response:
    return JSONResponse(body, status_code=status, headers=served_headers(replica) if replica else None)


def sse_response(events: AsyncIterator[Any], replica: ReplicaInfo) -> StreamingResponse:
    async def encode() -> AsyncIterator[bytes]:
        async for event in events:
            payload = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
            yield f"data: {payload}\n\n".encode()

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", **served_headers(replica)}
    return StreamingResponse(encode(), media_type="text/event-stream", headers=headers)
