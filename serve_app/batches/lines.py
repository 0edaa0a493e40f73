"""OpenAI's batch line formats: the input file's request lines in, the output and error file's
result lines out, and the file and batch objects the client library reads.

A bad input line (not JSON, no custom_id, another endpoint, a stream...) becomes an error line
that names it by line number; it never fails the batch. Lines are parsed with the router's own
strict parser (serve_app/body.py), so a line cannot do to the worker what a body cannot do to
the router.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.body import loads
from serve_app.errors import ApiError, InvalidRequest

# The endpoints a batch may name (OpenAI's three we serve, and our rerank).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank")
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
MAX_CUSTOM_ID = 512
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})([mh])$")
MAX_WINDOW_S = 7 * 24 * 3600


class BatchCreate(BaseModel):
    """`POST /v1/batches`: what OpenAI's client sends."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if v not in ENDPOINTS:
            raise ValueError(f"must be one of {', '.join(ENDPOINTS)}")
        return v

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        if window_seconds(v) is None:
            raise ValueError("must be a duration like '24h' or '30m' (1 minute to 168 hours)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("keys are at most 64 characters, values at most 512 (as OpenAI's)")
        return v


def window_seconds(window: str) -> int | None:
    m = _WINDOW.match(window)
    if m is None:
        return None
    seconds = int(m.group(1)) * (60 if m.group(2) == "m" else 3600)
    return seconds if seconds <= MAX_WINDOW_S else None


@dataclasses.dataclass
class Line:
    """One input line as stored: runnable (body set) or already answered (result set)."""

    idx: int
    custom_id: str | None
    model: str  # the model the line names, canonical when served (which slots it takes)
    body: str | None = None  # the request body as JSON text
    result: str | None = None  # the error line, for a line that can never run


def parse_input(content: bytes, endpoint: str, canonical: Callable[[str], str]) -> list[Line]:
    """Every non-blank line of a JSONL file, in order; `canonical` maps a model name or alias to
    the served model's name (or returns it unchanged)."""
    lines: list[Line] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        idx = len(lines)
        try:
            custom_id, body = _request_line(raw, endpoint)
        except ApiError as err:
            lines.append(Line(idx, _custom_id_of(raw), "", result=error_line(_custom_id_of(raw), "invalid_line",
                                                                              f"line {number}: {err.message}", number)))
            continue
        if custom_id in first_seen:
            lines.append(Line(idx, custom_id, "", result=error_line(
                custom_id, "duplicate_custom_id", f"line {number}: custom_id {custom_id!r} is already used on line "
                f"{first_seen[custom_id]}; each line needs its own", number)))
            continue
        first_seen[custom_id] = number
        model = body.get("model")
        served = isinstance(model, str) and "\x00" not in model  # a NUL name is no model: the router's 404
        lines.append(Line(idx, custom_id, canonical(model) if served else "",
                          body=orjson.dumps(body).decode()))
    return lines


def _request_line(raw: bytes, endpoint: str) -> tuple[str, dict[str, Any]]:
    try:
        line = loads(raw)
    except InvalidRequest as err:
        raise InvalidRequest(err.message.replace("request body", "the line")) from None
    if not isinstance(line, dict):
        raise InvalidRequest("the line must be a JSON object with custom_id, method, url and body")
    extra = sorted(set(line) - LINE_KEYS)
    if extra:
        raise InvalidRequest(f"unknown field(s) {', '.join(repr(k[:64]) for k in extra[:5])}; a line has custom_id, "
                             "method, url and body")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID or "\x00" in custom_id:
        raise InvalidRequest(f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters, without NUL")
    if line.get("method") != "POST":
        raise InvalidRequest("method must be 'POST'")
    if line.get("url") != endpoint:
        raise InvalidRequest(f"url {str(line.get('url'))[:100]!r} is not this batch's endpoint {endpoint!r}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object (the request as it would be sent to the endpoint)")
    if body.get("stream"):
        raise InvalidRequest("body.stream: a batch line cannot stream; its answer is written to the output file")
    return custom_id, body


def _custom_id_of(raw: bytes) -> str | None:
    """The custom_id of a line we refused, when it has a readable one (so the client can match it)."""
    try:
        cid = orjson.loads(raw).get("custom_id")
    except Exception:  # noqa: BLE001 - the line is not even an object: no custom_id to name
        return None
    return cid if isinstance(cid, str) and 0 < len(cid) <= MAX_CUSTOM_ID and "\x00" not in cid else None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def error_line(custom_id: str | None, code: str, message: str, line: int | None = None) -> str:
    """A line that never reached a model (OpenAI: `response` null, `error` set)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return orjson.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error}).decode()


def response_line(custom_id: str | None, request_id: str, status: int, body: Any) -> str:
    """A line the router answered, whatever the status (non-2xx go to the error file)."""
    return orjson.dumps({"id": request_id, "custom_id": custom_id, "error": None,
                         "response": {"status_code": status, "request_id": request_id, "body": body}}).decode()


def file_object(row: dict[str, Any], retention_s: int) -> dict[str, Any]:
    """OpenAI's file object. `expires_at`: when retention deletes it (an uploaded file still read by
    a running batch lives until that batch has ended and the retention passed again)."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": row["created_at"] + retention_s}


def batch_object(row: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """OpenAI's batch object; `request_counts` from the lines' states."""
    done, failed = counts.get("done", 0), counts.get("failed", 0)
    total = sum(counts.values())
    errors = orjson.loads(row["errors"]) if row.get("errors") else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": errors,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"], "status": row["status"],
        "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        **{k: _int(row.get(k)) for k in ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                                         "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
        "request_counts": {"total": total, "completed": done, "failed": failed},
        "metadata": orjson.loads(row["metadata"]) if row.get("metadata") else None,
    }


def _int(v: Any) -> int | None:
    return None if v is None else int(v)
