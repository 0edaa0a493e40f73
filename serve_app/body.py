"""Strict request bodies: the one parser every route uses, built so no body can crash it.

- the size is counted while reading, so a body without Content-Length (chunked) is cut off at
  the limit instead of being read whole first;
- orjson parses: strict JSON (no NaN/Infinity), UTF-8 that must be valid (lone surrogates,
  raw or escaped, are refused), numbers past float range refused, and no Python recursion;
- nesting is limited to `MAX_DEPTH` levels: no route takes more than a few, and deep
  structures are how JSON parsers and validators are made to recurse;
- pydantic validates the shape; its first error names the parameter.

Every failure is an `ApiError` (400 or 413) naming the problem.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from serve_app.errors import InvalidRequest, PayloadTooLarge, UnsupportedParameter

M = TypeVar("M", bound=BaseModel)
MAX_DEPTH = 32


async def parse_body(request: Request, model: type[M], max_bytes: int, unsupported: Iterable[str] = ()) -> M:
    """Read, parse and validate a JSON body; every failure is a 4xx that names the problem."""
    data = await read_object(request, max_bytes)
    for name in unsupported:
        if data.get(name) is not None:
            raise UnsupportedParameter(f"parameter '{name}' is not supported by this server", name)
        data.pop(name, None)  # explicitly null: the client asked for nothing, accept it
    return validate(model, data)


async def read_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, strictly parsed, for routes that forward it (LLM routes)."""
    data = loads(await read_body(request, max_bytes))
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


async def read_body(request: Request, max_bytes: int) -> bytes:
    chunks = []
    try:
        async for chunk in limited(request, max_bytes).stream():
            chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidRequest("the client closed the connection before the body was complete") from None
    return b"".join(chunks)


def limited(request: Request, max_bytes: int, param: str | None = None) -> Request:
    """The request whose body stops with a 413 once it passes `max_bytes` (at once when its
    Content-Length says so), for whatever reads it as it arrives: `read_body`, a multipart parser."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes", param)
    size = 0

    async def receive() -> Message:
        nonlocal size
        message = await request.receive()
        size += len(message.get("body", b""))
        if size > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes", param)
        return message

    return Request(request.scope, receive)


def loads(raw: bytes) -> Any:
    if not raw.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    depth = _depth(data)
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"request body nests {depth} levels deep; at most {MAX_DEPTH} are accepted")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_input=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UnsupportedParameter(f"unknown parameter '{loc[:100]}'", loc[:100]) from None
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors(include_input=False)[:5]
        )
        raise InvalidRequest(f"invalid request: {detail[:1000]}", loc[:100] or None) from None


def _depth(value: Any) -> int:
    """Deepest nesting of lists/objects, iteratively (a recursive walk is what we guard against)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((c, level + 1) for c in children)
    return deepest
