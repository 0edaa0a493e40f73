"""The batch worker: one asyncio task in each router replica that runs batch lines on spare
capacity, through the same router path as an interactive request.

How much it runs, per model (each worker takes its share; the store counts live workers):
- quiet model: up to `idle_share` of its capacity (replicas x max_ongoing_requests at most), so
  an idle model works through a batch fast, and Serve's autoscaler sees the demand (a model
  at min_replicas 0 wakes for it, through the router's cold-start path);
- busy model (an interactive request in flight, or seen within `quiet_s`, on any router
  replica): `busy_lines`, 0 by default; lines running when it turns busy are preempted
  (cancelled and put back, not counted as a try; at most MAX_PREEMPTIONS times per line, so
  a batch cannot starve on a model that is never quiet for a whole line);
- an LLM whose replicas' KV cache is full (mean use, as they report it, at or above
  `llm_kv_usage_below`): no new line; and while interactive requests use it (busy, above), every
  line running on it is preempted, beyond `busy_lines`: batch work only takes spare KV cache and
  is the first to give it back. (A quiet model's own lines filling its cache are not cancelled.)

What a line's answer means for it:
- 2xx: the output file; other 4xx: the error file, with the router's own error body;
- 429 (the owner's quota) and 503 (the model is full or unavailable): back to pending after
  Retry-After, not a try (until the batch's window ends), and the model's slow start begins again;
- other 5xx and 504: back to pending with backoff, one try; after `max_attempts`, the error file.
A line whose router replica died while running it is claimed again after its lease, and
counts that try: a line that kills replicas ends in the error file, not in a loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from serve_app.batches.config import BatchApiConfig
from serve_app.batches.lines import error_line, response_line
from serve_app.batches.store import BatchStore
from serve_app.batches.traffic import Traffic
from serve_app.config import ModelConfig
from serve_app.errors import RequestTooLarge

logger = logging.getLogger("ray.serve")
MAX_PREEMPTIONS = 3
UNKNOWN_MODEL_LINES = 4  # lines naming a model we do not serve: they fail fast with the router's 404
HEARTBEAT_S = 1.0
MAX_BACKOFF_S = 60.0
PRUNE_EVERY_S = 600.0  # how often a worker deletes what outlived gateway.batch.retention_s


@dataclasses.dataclass
class Answer:
    status: int
    body: Any
    request_id: str
    retry_after: float | None = None


# (endpoint, body JSON text, owner key name, request id) -> the router's answer
RunLine = Callable[[str, str, str, str], Awaitable[Answer]]


class BatchWorker:
    def __init__(self, store: BatchStore, cfg: BatchApiConfig, models: dict[str, ModelConfig], traffic: Traffic,
                 run_line: RunLine, worker_id: str | None = None, clock: Callable[[], float] = time.time,
                 on_line: Callable[[str, bool], None] = lambda model, ok: None,
                 on_pending: Callable[[dict[str, int]], None] = lambda pending: None,
                 kv_usage: Callable[[str], float | None] = lambda model: None) -> None:
        self.store, self.cfg, self.models, self.traffic, self.run_line = store, cfg, models, traffic, run_line
        self.id = worker_id or uuid.uuid4().hex
        self.clock, self.on_line, self.on_pending = clock, on_line, on_pending
        self.kv_usage = kv_usage  # an LLM's replicas' mean KV-cache use (None: not known here)
        self.running: dict[str, dict[tuple[str, int], tuple[asyncio.Task, int]]] = {}  # model -> line -> (task, preemptions)
        self.workers = 1
        self.remote_busy: set[str] = set()
        self._batches: dict[str, tuple[str, str]] = {}  # batch id -> (endpoint, owner)
        self._wake = asyncio.Event()
        self._releasing: set[asyncio.Task] = set()
        self.window: dict[str, float] = {}  # quiet model -> lines it may run now (slow start, see cap)
        self._stopped = False
        self._beat_at = self._advance_at = self._renew_at = self._prune_at = 0.0
        traffic.on_busy = self.preempt

    # --- how much may run ---
    def cap(self, model: str) -> int:
        """Lines this worker may run on `model` now. A quiet model starts at one line and gains one
        per line that finishes (doubling each round, as TCP's slow start), up to its share: work
        in flight when the next interactive request comes is what that request waits behind (an
        encoder's forward pass cannot be stopped), so a short gap between requests risks little."""
        m = self.models.get(model)
        if m is None:
            return UNKNOWN_MODEL_LINES
        if self.kv_full(model):  # no new line; those running stay unless interactive work wants the cache
            self.window.pop(model, None)
            return 0
        if self.traffic.busy(model, self.cfg.quiet_s) or model in self.remote_busy:
            self.window.pop(model, None)
            return self.cfg.busy_lines // self.workers
        share = max(1, math.floor(self.cfg.idle_share * m.capacity / self.workers))
        return min(share, int(self.window.setdefault(model, 1)))

    def kv_full(self, model: str) -> bool:
        usage = self.kv_usage(model)
        return usage is not None and usage >= self.cfg.llm_kv_usage_below

    def preempt(self, model: str, keep: int | None = None) -> None:
        """An interactive request arrived on a quiet model: put back what runs beyond the busy cap
        (or beyond `keep`)."""
        self.window.pop(model, None)
        running = self.running.get(model, {})
        extra = len(running) - (self.cfg.busy_lines // max(1, self.workers) if keep is None else keep)
        for task, preemptions in list(running.values()):
            if extra <= 0:
                break
            if preemptions < MAX_PREEMPTIONS and not task.done():
                task.cancel("preempted")
                extra -= 1

    # --- the loop ---
    async def run(self) -> None:
        logger.info("batch worker %s started (store: %s)", self.id, self.store.where)
        failures = 0
        while not self._stopped:
            try:
                await self._tick()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a store outage must not end the worker; it tries again
                failures += 1
                wait = min(MAX_BACKOFF_S, 2.0 ** failures)
                logger.warning("batch worker: the batch store failed (%s: %s); retrying in %.0fs", type(err).__name__,
                               str(err)[:200], wait, exc_info=failures == 1)
                await asyncio.sleep(wait)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.cfg.poll_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        """Stop claiming and put running lines back for another worker (a graceful shutdown)."""
        self._stopped = True
        self._wake.set()
        tasks = [t for lines in self.running.values() for t, _ in lines.values()]
        for task in tasks:
            task.cancel("shutdown")
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*list(self._releasing), return_exceptions=True)

    def give_back(self) -> None:
        """Synchronously put back every line this worker runs (the replica is shutting down)."""
        self._stopped = True
        for model in list(self.running):
            for batch_id, idx in list(self.running.get(model, {})):
                try:
                    self.store.release(self.id, batch_id, idx, self.clock(), False)
                except Exception:  # noqa: BLE001 - its lease ends anyway and another worker takes it
                    logger.warning("batch worker: could not give back line %s/%d", batch_id, idx)

    async def _tick(self) -> None:
        now = self.clock()
        if now >= self._beat_at:
            self._beat_at = now + HEARTBEAT_S
            self.workers = max(1, await asyncio.to_thread(
                self.store.heartbeat, self.id, now, self.traffic.seen_since(now - 2 * HEARTBEAT_S)))
            busy = await asyncio.to_thread(self.store.busy_models, now - self.cfg.quiet_s)
            for model in busy - self.remote_busy - {m for m in busy if self.traffic.busy(m, self.cfg.quiet_s)}:
                self.preempt(model)  # another router replica serves it now
            self.remote_busy = busy
            for model in [m for m, lines in self.running.items() if lines and self.kv_full(m)
                          and (m in busy or self.traffic.busy(m, self.cfg.quiet_s))]:
                self.preempt(model, keep=0)  # interactive work wants its KV cache: batches give it back first
        if now >= self._advance_at:
            self._advance_at = now + HEARTBEAT_S
            for batch_id in await asyncio.to_thread(self.store.advance, self.id, now, self.cfg.lease_s):
                logger.info("batch %s ended", batch_id)
            self.on_pending(await asyncio.to_thread(self.store.pending_by_model))
        if now >= self._prune_at:
            self._prune_at = now + PRUNE_EVERY_S
            batches, files = await asyncio.to_thread(self.store.prune, now - self.cfg.retention_s)
            if batches or files:
                logger.info("batch retention (%ds): deleted %d batch(es) and %d file(s)", self.cfg.retention_s, batches, files)
        if now >= self._renew_at and any(self.running.values()):
            self._renew_at = now + self.cfg.lease_s / 3
            await asyncio.to_thread(self.store.renew, self.id, now + self.cfg.lease_s,
                                    [key for lines in self.running.values() for key in lines])
        for model in await asyncio.to_thread(self.store.models_with_work, now):
            free = self.cap(model) - len(self.running.get(model, {}))
            if free <= 0:
                continue
            for line in await asyncio.to_thread(self.store.claim, self.id, [model], free, now, self.cfg.lease_s):
                self._start(line)

    def _start(self, line: dict[str, Any]) -> None:
        key = (line["batch_id"], line["idx"])
        if key in self.running.get(line["model"], {}):
            return  # its lease lapsed while it ran here and we claimed it again: the running task finishes it
        task = asyncio.get_running_loop().create_task(self._line(line))
        self.running.setdefault(line["model"], {})[key] = (task, line["preemptions"])

        def done(t: asyncio.Task) -> None:
            self.running.get(line["model"], {}).pop(key, None)
            self._wake.set()
            failed = not t.cancelled() and t.exception() is not None
            if failed:
                logger.warning("batch %s line %d: %s; it goes back to pending", line["batch_id"], line["idx"],
                               type(t.exception()).__name__, exc_info=t.exception())
            if t.cancelled() or failed:  # preempted, shut down (maybe before it began), or the store failed
                # Only a preemption counts toward the line's preemption cap: a store blip is not one.
                preempted = t.cancelled() and not self._stopped
                release = asyncio.get_running_loop().create_task(asyncio.to_thread(
                    self.store.release, self.id, line["batch_id"], line["idx"], self.clock(), False, preempted))
                self._releasing.add(release)
                release.add_done_callback(self._releasing.discard)

        task.add_done_callback(done)

    async def _line(self, line: dict[str, Any]) -> None:
        """Run one line and record what it means; a cancelled line is put back by `_start`'s callback
        (a task cancelled before it began never runs a handler of its own)."""
        batch_id, idx, cid = line["batch_id"], line["idx"], line["custom_id"]
        endpoint, owner = await self._batch(batch_id)
        if line["attempts"] > self.cfg.max_attempts:  # its runs ended with their router replica, every time
            await self._finish(line, False, error_line(cid, "line_failed", f"the line was started {line['attempts'] - 1} "
                               "time(s) and its router replica ended each time before it finished"))
            return
        rid = f"batch_req_{uuid.uuid4().hex}"
        try:
            answer = await self.run_line(endpoint, line["body"], owner, rid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the router path shapes errors; this is a last resort
            logger.exception("batch %s line %d: unexpected failure", batch_id, idx)
            answer = Answer(500, {"error": {"message": f"{type(exc).__name__}", "type": "internal_error"}}, rid)
        await self._settle(line, answer)

    async def _settle(self, line: dict[str, Any], answer: Answer) -> None:
        status, now = answer.status, self.clock()
        if status == 429 and error_code(answer.body) == RequestTooLarge.code:  # no wait would let it pass
            await self._finish(line, False, response_line(line["custom_id"], answer.request_id, status, answer.body))
            return
        if status in (429, 503) or (status >= 500 and line["attempts"] < self.cfg.max_attempts):
            counted = status not in (429, 503)  # quota or back-pressure: come back later, not a failure
            if status in (429, 503) and line["model"] in self.window:
                self.window[line["model"]] = 1  # the model (or the key) is full: start again from one line
            wait = answer.retry_after or min(MAX_BACKOFF_S, 2.0 ** line["attempts"])
            await asyncio.to_thread(self.store.release, self.id, line["batch_id"], line["idx"],
                                    now + min(wait, MAX_BACKOFF_S), counted)
            return
        await self._finish(line, 200 <= status < 300, response_line(line["custom_id"], answer.request_id, status, answer.body))

    async def _finish(self, line: dict[str, Any], ok: bool, result: str) -> None:
        written = await asyncio.to_thread(self.store.finish, self.id, line["batch_id"], line["idx"], ok, result, self.clock())
        if written:
            self.on_line(line["model"] or "?", ok)
            if line["model"] in self.window:
                self.window[line["model"]] += 1
        else:
            logger.info("batch %s line %d: lease lost (ran again elsewhere, or the batch ended); result dropped",
                        line["batch_id"], line["idx"])

    async def _batch(self, batch_id: str) -> tuple[str, str]:
        if batch_id not in self._batches:
            got = await asyncio.to_thread(self.store.get_batch, batch_id, None)
            assert got is not None, batch_id  # lines are claimed only from batches that exist
            self._batches[batch_id] = (got[0]["endpoint"], got[0]["owner"])
        return self._batches[batch_id]


def error_code(body: Any) -> str | None:
    err = body.get("error") if isinstance(body, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def answer_of(status: int, headers: dict[str, str], body: bytes, request_id: str) -> Answer:
    """The router's HTTP answer to a line, as the worker keeps it."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = {"error": {"message": body[:500].decode("utf-8", "replace"), "type": "internal_error"}}
    retry = headers.get("retry-after", "")
    return Answer(status, parsed, request_id, float(retry) if re.fullmatch(r"[0-9]{1,6}", retry) else None)


async def call_app(app: Any, path: str, body: bytes, request_id: str, principal: Any) -> tuple[int, dict[str, str], bytes]:
    """One POST through the router's own ASGI app, in this process: every middleware and handler
    an HTTP request meets (request id, metrics, errors, admission as `principal`, validation,
    fallbacks, retries). Returns (status, headers, body)."""
    from serve_app.middleware import BATCH_SCOPE

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode())],
        "client": ("batch-worker", 0), "server": ("batch-worker", 0), "state": {}, BATCH_SCOPE: principal,
    }
    status, headers, chunks = 500, {}, []
    done, sent = asyncio.Event(), False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # nothing listens for a disconnect that never comes, until the answer is out
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)
