"""`/v1/files` and `/v1/batches`: OpenAI's shapes over the batch store, for the unchanged
`openai` client (`files.create`, `batches.create/retrieve/list/cancel`, `files.content`).

Files and batches belong to the API key that made them (by name); another key gets a 404, an
admin key sees all. Every store call runs in a thread (the router's loop keeps serving) and a
store that does not answer is a 503, never a 500.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import sqlalchemy.exc
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.api.admin import strict_query
from serve_app.batches.config import BatchApiConfig
from serve_app.batches.lines import BatchCreate, batch_object, file_object, parse_input, window_seconds
from serve_app.batches.store import BatchStore
from serve_app.body import parse_body, read_body
from serve_app.http import principal_of
from serve_app.errors import InvalidRequest, NotFound, PayloadTooLarge, StoreUnavailable

T = TypeVar("T")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the purpose field, beyond the file itself
DEFAULT_PAGE, MAX_PAGE = 20, 100
MAX_FILES_PAGE = 10_000  # files.list: OpenAI's default and maximum


class BatchApi:
    def __init__(self, store: BatchStore, cfg: BatchApiConfig, max_body_bytes: int, canonical: Callable[[str], str]) -> None:
        self.store, self.cfg, self.max_body_bytes, self.canonical = store, cfg, max_body_bytes, canonical

    # --- files ---
    async def create_file(self, request: Request) -> Response:
        """multipart/form-data with `file` (JSONL) and `purpose` ('batch')."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest("upload the file as multipart/form-data with fields 'file' and 'purpose'", "file")
        raw = await read_body(request, self.cfg.max_file_bytes + FORM_OVERHEAD)
        form = await _form(request, raw)
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequest("purpose must be 'batch' (the only purpose this server stores files for)", "purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("field 'file' must be the uploaded file", "file")
        content = await upload.read()
        if len(content) > self.cfg.max_file_bytes:
            raise PayloadTooLarge(f"the file is {len(content)} bytes; at most {self.cfg.max_file_bytes} are accepted", "file")
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidRequest(f"the file is not UTF-8 text (byte {err.start}); a batch file is JSONL", "file") from None
        lines = sum(1 for line in content.split(b"\n") if line.strip())
        if not lines:
            raise InvalidRequest("the file has no lines; a batch file has one JSON request per line", "file")
        if lines > self.cfg.max_lines:
            raise InvalidRequest(f"the file has {lines} lines; at most {self.cfg.max_lines} per batch", "file")
        filename = (upload.filename or "batch.jsonl").replace("\x00", "")[:255] or "batch.jsonl"
        row = await self._db(self.store.create_file, _owner(request), filename, purpose, content, time.time())
        return JSONResponse(file_object(row, self.cfg.retention_s))

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(file_object(await self._file(request), self.cfg.retention_s))

    async def list_files(self, request: Request) -> Response:
        """`GET /v1/files?purpose=&limit=&order=&after=`, as the openai client's `files.list` pages it."""
        q = _file_query(request.query_params.multi_items())
        rows, more = await self._db(self.store.list_files, _owner_filter(request), q["purpose"], q["after"], q["limit"],
                                    q["order"] == "desc")
        data = [file_object(row, self.cfg.retention_s) for row in rows]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    async def file_content(self, request: Request) -> Response:
        row = await self._file(request)
        pages = self.store.content_pages(row)

        async def stream() -> AsyncIterator[bytes]:
            while (page := await self._db(next, pages, None)) is not None:
                yield page

        return StreamingResponse(stream(), media_type="application/jsonl")

    async def delete_file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not await self._db(self.store.delete_file, file_id, _owner_filter(request)):
            raise _no_file(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def _file(self, request: Request) -> dict[str, Any]:
        file_id = request.path_params["file_id"]
        row = await self._db(self.store.get_file, file_id, _owner_filter(request))
        if row is None:
            raise _no_file(file_id)
        return row

    # --- batches ---
    async def create_batch(self, request: Request) -> Response:
        body = await parse_body(request, BatchCreate, self.max_body_bytes)
        row = await self._db(self.store.get_file, body.input_file_id, _owner_filter(request))
        if row is None:
            raise _no_file(body.input_file_id, "input_file_id")
        if row["batch_id"] is not None:
            raise InvalidRequest("input_file_id names a batch's output file; upload the requests with purpose 'batch'",
                                 "input_file_id")
        content = await self._db(self.store.input_content, row["id"])
        lines = await asyncio.to_thread(parse_input, content, body.endpoint, self.canonical)
        window = window_seconds(body.completion_window)
        assert window is not None  # BatchCreate validated it
        batch_id = await self._db(self.store.create_batch, _owner(request), body.endpoint, row["id"],
                                  body.completion_window, window, body.metadata, lines, time.time())
        return JSONResponse(await self._batch_object(batch_id, None))

    async def get_batch(self, request: Request) -> Response:
        return JSONResponse(await self._batch_object(request.path_params["batch_id"], _owner_filter(request)))

    async def cancel_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if not await self._db(self.store.cancel, batch_id, _owner_filter(request), time.time()):
            raise _no_batch(batch_id)
        return JSONResponse(await self._batch_object(batch_id, _owner_filter(request)))

    async def list_batches(self, request: Request) -> Response:
        after, limit = _page(request.query_params.multi_items())
        rows, more = await self._db(self.store.list_batches, _owner_filter(request), after, limit)
        data = [batch_object(row, counts) for row, counts in rows]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    async def _batch_object(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        got = await self._db(self.store.get_batch, batch_id, owner)
        if got is None:
            raise _no_batch(batch_id)
        return batch_object(*got)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        if any(isinstance(a, str) and "\x00" in a for a in args):  # an id or cursor no store can hold (PostgreSQL text)
            raise NotFound("no such file or batch: the id contains a NUL character")
        try:
            return await asyncio.to_thread(fn, *args)
        except sqlalchemy.exc.DataError as err:  # a value the database refuses: the client's, not an outage
            raise InvalidRequest(f"the batch store refused a value of this request ({str(err.orig)[:200]})") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise StoreUnavailable(f"the batch store did not answer ({type(err).__name__}); retry shortly", retry_after=5) from None


async def _form(request: Request, raw: bytes) -> dict[str, Any]:
    """Starlette's multipart parser over the body we already read within the limit."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=4)
    except Exception as err:  # noqa: BLE001 - python-multipart's errors are the client's malformed body
        raise InvalidRequest(f"the multipart body could not be read: {str(err)[:200]}", "file") from None
    return dict(form.items())


def _page(params: list[tuple[str, str]]) -> tuple[str | None, int]:
    values = strict_query(params, "/v1/batches", ("after", "limit"))
    raw = values.get("limit", str(DEFAULT_PAGE))
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE}", "limit")
    return values.get("after"), int(raw)


def _file_query(params: list[tuple[str, str]]) -> dict[str, Any]:
    """OpenAI's files.list parameters: limit 1-10,000 (default 10,000), order asc|desc (default desc)."""
    values = strict_query(params, "/v1/files", ("after", "limit", "order", "purpose"))
    raw = values.get("limit", str(MAX_FILES_PAGE))
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= MAX_FILES_PAGE:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_FILES_PAGE}", "limit")
    order = values.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", "order")
    return {"after": values.get("after"), "limit": int(raw), "order": order, "purpose": values.get("purpose")}


def _owner(request: Request) -> str:
    """Who owns what this request creates: the key's name ('-' with keys off)."""
    p = principal_of(request)
    return p.name if p is not None else "-"


def _owner_filter(request: Request) -> str | None:
    """Whose files and batches this request may see: its own, or all for an admin key or with keys off."""
    p = principal_of(request)
    return None if p is None or p.admin else p.name


def _no_file(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"no file '{file_id[:128]}'", param)


def _no_batch(batch_id: str) -> NotFound:
    return NotFound(f"no batch '{batch_id[:128]}'", "batch_id")
