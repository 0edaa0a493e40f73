"""`/v1/files` and `/v1/batches`: OpenAI's shapes over the batch store, for the unchanged
`openai` client (`files.create`, `batches.create/retrieve/list/cancel`, `files.content`).

Files and batches belong to the API key that made them (by name); another key gets a 404, an
admin key sees all. Every store call runs in a thread (the router's loop keeps serving) and a
store that does not answer is a 503, never a 500.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import sqlalchemy.exc
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.api.admin import strict_query
from serve_app.batches.config import BatchApiConfig
from serve_app.batches.lines import BatchCreate, batch_object, file_object, parse_input, window_seconds
from serve_app.batches.store import BatchStore
from serve_app.body import limited, parse_body
from serve_app.http import principal_of
from serve_app.errors import ApiError, InvalidRequest, NotFound, PayloadTooLarge, StoreUnavailable

T = TypeVar("T")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the purpose field, beyond the file itself
SCAN_CHUNK, STORE_CHUNK = 1 << 20, 4 << 20  # an upload is checked 1 MiB at a time, stored 4 MiB at a time
DEFAULT_PAGE, MAX_PAGE = 20, 100
MAX_FILES_PAGE = 10_000  # files.list: OpenAI's default and maximum


class BatchApi:
    def __init__(self, store: BatchStore, cfg: BatchApiConfig, max_body_bytes: int, canonical: Callable[[str], str]) -> None:
        self.store, self.cfg, self.max_body_bytes, self.canonical = store, cfg, max_body_bytes, canonical

    # --- files ---
    async def create_file(self, request: Request) -> Response:
        """multipart/form-data with `file` (JSONL) and `purpose` ('batch'). The body is parsed as it
        arrives, the file spooled to disk by Starlette's parser, checked and stored a chunk at a
        time: none of our steps holds the file whole (the router's peak grows by about its size
        once, measured in tests/e2e/test_batches.py; it was about four times)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest("upload the file as multipart/form-data with fields 'file' and 'purpose'", "file")
        form = await _form(request, self.cfg.max_file_bytes + FORM_OVERHEAD)
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise InvalidRequest("purpose must be 'batch' (the only purpose this server stores files for)", "purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("field 'file' must be the uploaded file", "file")
            lines = await asyncio.to_thread(_scan, upload.file, self.cfg.max_file_bytes)
            if not lines:
                raise InvalidRequest("the file has no lines; a batch file has one JSON request per line", "file")
            if lines > self.cfg.max_lines:
                raise InvalidRequest(f"the file has {lines} lines; at most {self.cfg.max_lines} per batch", "file")
            filename = (upload.filename or "batch.jsonl").replace("\x00", "")[:255] or "batch.jsonl"
            row = await self._db(self.store.create_file, _owner(request), filename, purpose, _chunks(upload.file), time.time())
        finally:
            await form.close()
        return JSONResponse(file_object(row, self.cfg.retention_s))

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(file_object(await self._file(request), self.cfg.retention_s))

    async def list_files(self, request: Request) -> Response:
        """`GET /v1/files?purpose=&limit=&order=&after=`, as the openai client's `files.list` pages it."""
        q = _file_query(request.query_params.multi_items())
        page = await self._db(self.store.list_files, _owner_filter(request), q["purpose"], q["after"], q["limit"],
                              q["order"] == "desc")
        if page is None:
            raise InvalidRequest(f"after names no file of yours ('{q['after'][:128]}': deleted, or never yours)", "after")
        rows, more = page
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


async def _form(request: Request, max_bytes: int) -> FormData:
    """Starlette's multipart parser over the body as it arrives (files spool to disk past 1 MiB),
    stopped with a 413 once the body passes `max_bytes`."""
    try:
        return await limited(request, max_bytes, "file").form(max_files=1, max_fields=4)
    except ApiError:
        raise
    except ClientDisconnect:
        raise InvalidRequest("the client closed the connection before the body was complete") from None
    except Exception as err:  # noqa: BLE001 - python-multipart's errors are the client's malformed body
        raise InvalidRequest(f"the multipart body could not be read: {str(err)[:200]}", "file") from None


def _scan(file: BinaryIO, max_bytes: int) -> int:
    """Check a spooled upload a chunk at a time: at most `max_bytes`, UTF-8 throughout. Returns its
    number of non-blank lines."""
    file.seek(0)
    decoder, size, lines, filled = codecs.getincrementaldecoder("utf-8")(), 0, 0, False  # filled: this line has text
    while chunk := file.read(SCAN_CHUNK):
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as err:
            raise InvalidRequest(f"the file is not UTF-8 text (near byte {size + err.start}); a batch file is JSONL",
                                 "file") from None
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the file is over {max_bytes} bytes, the most accepted", "file")
        *ended, rest = chunk.split(b"\n")
        for part in ended:  # each part ends a line (the first one continues the line before)
            lines += filled or bool(part.strip())
            filled = False
        filled = filled or bool(rest.strip())
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InvalidRequest("the file is not UTF-8 text (it ends inside a character); a batch file is JSONL", "file") from None
    return lines + filled


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    """The spooled upload, a stored chunk at a time (read in the store's thread)."""
    file.seek(0)
    while chunk := file.read(STORE_CHUNK):
        yield chunk


def _page(params: list[tuple[str, str]]) -> tuple[str | None, int]:
    values = strict_query(params, "/v1/batches", ("after", "limit"))
    return values.get("after"), _limit(values, DEFAULT_PAGE, MAX_PAGE)


def _limit(values: dict[str, str], default: int, most: int) -> int:
    """A list's `limit` query parameter: ASCII digits, 1 to `most`."""
    raw = values.get("limit", str(default))
    if not re.fullmatch(f"[0-9]{{1,{len(str(most))}}}", raw) or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"limit must be an integer from 1 to {most}", "limit")
    return int(raw)


def _file_query(params: list[tuple[str, str]]) -> dict[str, Any]:
    """OpenAI's files.list parameters: limit 1-10,000 (default 10,000), order asc|desc (default desc)."""
    values = strict_query(params, "/v1/files", ("after", "limit", "order", "purpose"))
    limit = _limit(values, MAX_FILES_PAGE, MAX_FILES_PAGE)
    order = values.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", "order")
    return {"after": values.get("after"), "limit": limit, "order": order, "purpose": values.get("purpose")}


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
