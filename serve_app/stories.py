"""A request's story: what the router saw of one request, kept by its id for an operator.

"My request abc failed at 14:02" should take one lookup, not a grep through one log file per
replica per node. Per request, the router replica that took it records when it arrived, which
router replica and node admitted it, the key's name, the admission decision, every attempt (model,
replica, node, outcome, duration: retries and fallbacks are attempts), the LLM routing guess, the
engine's own timings (queue wait, prefill, decode, from vLLM's per-request stats), the tokens, and
the final status and error. No prompt, output or key is kept.

How it is recorded: `StoryMiddleware` opens a `Story` for each request that reaches a model or the
Batch API (POST and DELETE; reads are not stories) in a context variable, so the dispatcher,
tenancy and handlers add to `current()` without passing it around (tasks a request starts copy the
variable and share the story: a rerank's chunks add their attempts to it). When the response ends
(a stream: its last byte, or the client leaving) the story is finished into `Stories`: this router
replica's `StoryBook`, and an outbox that `status.hand_over_stories` empties into the app's status
board every second, so whichever router replica answers `GET /v1/requests/{id}` finds it.

Bounded memory: the last `keep` stories for `max_age_s`, and failed ones (5xx, errors mid-stream,
any failed attempt) in their own `keep_failed` for `failed_max_age_s`, so a flood of successes
cannot push out the failure someone asks about tomorrow.
"""

from __future__ import annotations

import collections
import contextvars
import time
from typing import Any

import orjson
from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import tracing
from serve_app.config_base import StrictConfig
from serve_app.errors import ApiError, from_exception


class StoriesConfig(StrictConfig):
    """How many request stories are kept, and for how long (docs/OPERATIONS.md: find a request)."""

    enabled: bool = Field(True, description="record request stories for GET /v1/requests/{id} and `trace`")
    keep: int = Field(10_000, ge=0, le=1_000_000, description="recent requests kept (per router replica, and per app on the status board)")
    keep_failed: int = Field(2_000, ge=0, le=1_000_000, description="failed requests kept apart from the recent ones")
    max_age_s: float = Field(3600.0, gt=0, description="how long a recent request is kept")
    failed_max_age_s: float = Field(86_400.0, gt=0, description="how long a failed request is kept")


_STORY: contextvars.ContextVar[Story | None] = contextvars.ContextVar("serve_app_story", default=None)


class Story:
    """One request's record while it runs; `to_dict` is what is kept and answered."""

    __slots__ = ("id", "arrived_at", "t0", "method", "path", "router", "key", "model", "admission", "attempts",
                 "routing", "engine", "usage", "first_token_ms", "status", "error", "duration_ms", "stream", "batch",
                 "ended_mid_stream", "completed", "migrations")

    def __init__(self, rid: str, method: str, path: str, router: dict[str, Any], batch: bool = False) -> None:
        self.id, self.method, self.path, self.router, self.batch = rid, method, path, router, batch
        self.arrived_at, self.t0 = time.time(), time.perf_counter()
        self.key: str | None = None
        self.model: str | None = None
        self.admission: dict[str, Any] | None = None
        self.attempts: list[dict[str, Any]] = []
        self.routing: dict[str, Any] | None = None
        self.engine: dict[str, Any] | None = None
        self.usage: dict[str, int] | None = None
        self.first_token_ms: float | None = None
        self.status: int | None = None
        self.error: dict[str, Any] | None = None
        self.duration_ms: float | None = None
        self.stream = False
        self.ended_mid_stream = False
        self.completed = False  # the response's last byte was sent
        self.migrations: list[dict[str, Any]] = []  # a stream's replica lost mid-way: continued or not (serve_app/migration/)

    def since_start_ms(self, t: float | None = None) -> float:
        return round(((t if t is not None else time.perf_counter()) - self.t0) * 1000, 1)

    def failed(self) -> bool:
        """Kept apart, for longer: a server-side failure, a stream cut, or any failed attempt
        (a retry that then succeeded is still the story of a sick replica)."""
        return ((self.status or 0) >= 500 or self.ended_mid_stream or bool(self.migrations)
                or any(a["outcome"] != "ok" for a in self.attempts))

    def to_dict(self) -> dict[str, Any]:
        first_model = self.attempts[0]["model"] if self.attempts else None
        tried: dict[str, int] = {}
        for a in self.attempts:
            tried[a["model"]] = tried.get(a["model"], 0) + 1
        if self.duration_ms is None:  # not finished yet
            outcome = "in_progress"
        elif self.ended_mid_stream:
            outcome = "failed_mid_stream"
        elif self.status == 499 or not self.completed:
            outcome = "client_gone"
        else:
            outcome = "ok" if self.status < 400 else "failed"
        return {
            "id": self.id, "object": "request.story", "arrived_at": round(self.arrived_at, 3), "method": self.method,
            "path": self.path, "router": self.router, "key": self.key, "batch": self.batch, "model": self.model,
            "stream": self.stream, "admission": self.admission, "attempts": list(self.attempts),
            "retries": sum(n - 1 for n in tried.values()),
            "fallbacks": [m for m in tried if m != first_model],
            "routing": self.routing, "engine": self.engine, "usage": self.usage, "first_token_ms": self.first_token_ms,
            "migrations": list(self.migrations), "status": self.status, "outcome": outcome, "error": self.error, "duration_ms": self.duration_ms,
        }


def current() -> Story | None:
    """The story of the request this code runs for, or None (no story: a read, the health probe,
    stories turned off, a unit test calling a handler directly)."""
    return _STORY.get()


def attempt(model: str, started: float, result: Any = None, exc: BaseException | None = None) -> dict[str, Any] | None:
    """One try of one model: `started` is its perf_counter start; `result` what it returned (the
    replica is read from it), or `exc` what it raised (a dead replica is read from Ray's error).
    Returns the story's entry for it (None: no story)."""
    story = _STORY.get()
    if story is None:
        return None
    now = time.perf_counter()
    entry: dict[str, Any] = {"model": model, "at_ms": story.since_start_ms(started),
                             "duration_ms": round((now - started) * 1000, 1)}
    if exc is None:
        entry["outcome"] = "ok"
        replica = replica_of(result)
    else:
        err = exc if isinstance(exc, ApiError) else None
        if err is None and not isinstance(exc, Exception):  # cancelled: the client left, or a deadline
            entry["outcome"] = "cancelled"
        else:
            err = err or from_exception(exc)
            entry.update(outcome=err.code or err.type, status=err.status, error=err.message[:300])
        replica = getattr(err, "replica", None)
    if isinstance(replica, dict):  # a dead replica as Ray's error named it (errors.dead_replica)
        entry.update(replica)
    elif replica is not None:
        entry.update(replica=replica.replica_id, node_id=replica.node_id, node_ip=replica.node_ip)
    story.attempts.append(entry)
    return entry


def skipped(model: str, why: str) -> None:
    """A model of the chain not tried (its circuit is open): part of the fallback story."""
    story = _STORY.get()
    if story is not None:
        story.attempts.append({"model": model, "at_ms": story.since_start_ms(), "duration_ms": 0.0, "outcome": why})


def replica_of(result: Any) -> Any:
    """The ReplicaInfo a replica's answer carries (deployments/protocol.py), if any: a typed result's
    `.replica`, or an opened stream's first item (stream, (events, usage, replica[, track]))."""
    replica = getattr(result, "replica", None)
    if replica is None and isinstance(result, tuple) and len(result) == 2:
        first = result[1]
        if isinstance(first, tuple) and len(first) >= 3:
            replica = first[2]
    return replica


def note(**fields: Any) -> None:
    """Set fields of the current story (admission, routing, engine, first_token_ms, stream, model)."""
    story = _STORY.get()
    if story is not None:
        for name, value in fields.items():
            setattr(story, name, value)


def migrated(entry: dict[str, Any]) -> None:
    """A stream's replica was lost mid-way: what the router did (continued elsewhere, or not, why)."""
    story = _STORY.get()
    if story is not None:
        story.migrations.append(entry)


def note_usage(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """What the request was charged (Tenancy.served): the model counted and its tokens."""
    story = _STORY.get()
    if story is not None:
        story.model = model
        story.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def note_error(err: ApiError, mid_stream: bool = False) -> None:
    """The error the client got (ErrorMiddleware), or the in-band error event that ended a stream."""
    story = _STORY.get()
    if story is not None:
        story.error = {"status": err.status, "code": err.code, "type": err.type, "message": err.message[:500]}
        story.ended_mid_stream = story.ended_mid_stream or mid_stream


Entry = tuple[str, float, bytes]  # (request id, arrived at, the story as JSON): what a book holds


def encode(story: dict[str, Any]) -> Entry:
    """A finished story as a book keeps it and hands it on: JSON bytes, which Python's garbage
    collector never walks (10,000 stories as dicts made every collection of the router's heap
    slower: 5% of its throughput at 32 clients, measured) and a third of the memory."""
    # Copied to its exact size: orjson hands back bytes in a buffer of 4 KB or more (tracemalloc).
    return story["id"], story["arrived_at"], bytes(memoryview(orjson.dumps(story)))


class StoryBook:
    """Finished stories by id, bounded by count and age; the failed kept apart (see the module doc)."""

    def __init__(self, cfg: StoriesConfig | None = None, clock: Any = time.time) -> None:
        self.clock = clock
        self.recent: collections.deque[Entry] = collections.deque()
        self.failed: collections.deque[Entry] = collections.deque()
        self.by_id: dict[str, tuple[Entry, ...]] = {}
        self.resize(cfg or StoriesConfig())

    def resize(self, cfg: StoriesConfig) -> None:
        self.cfg = cfg
        self._trim(self.clock())

    def add(self, entry: Entry, failed: bool) -> None:
        (self.failed if failed else self.recent).append(entry)
        self.by_id[entry[0]] = self.by_id.get(entry[0], ()) + (entry,)
        self._trim(self.clock())

    def find(self, rid: str) -> list[dict[str, Any]]:
        """Every kept story of this id (a client may reuse one), newest first."""
        self._trim(self.clock())
        return [orjson.loads(e[2]) for e in sorted(self.by_id.get(rid, ()), key=lambda e: e[1], reverse=True)]

    def __len__(self) -> int:
        return len(self.recent) + len(self.failed)

    def _trim(self, now: float) -> None:
        for queue, keep, age in ((self.recent, self.cfg.keep, self.cfg.max_age_s),
                                 (self.failed, self.cfg.keep_failed, self.cfg.failed_max_age_s)):
            while queue and (len(queue) > keep or now - queue[0][1] > age):
                self._forget(queue.popleft())

    def _forget(self, entry: Entry) -> None:
        same = tuple(e for e in self.by_id.get(entry[0], ()) if e is not entry)
        if same:
            self.by_id[entry[0]] = same
        else:
            self.by_id.pop(entry[0], None)


class Stories:
    """This router replica's stories: the ones still running, the book, and the outbox for the board."""

    def __init__(self, cfg: StoriesConfig, router: dict[str, Any]) -> None:
        self.cfg, self.router = cfg, router
        self.book = StoryBook(cfg)
        self.running: dict[int, Story] = {}
        self.outbox: list[tuple[Entry, bool]] = []

    def begin(self, rid: str, method: str, path: str, batch: bool) -> Story:
        story = Story(rid, method, path, self.router, batch)
        self.running[id(story)] = story
        return story

    def finish(self, story: Story) -> dict[str, Any]:
        self.running.pop(id(story), None)
        story.duration_ms = story.since_start_ms()
        kept, failed = story.to_dict(), story.failed()
        entry = encode(kept)
        self.book.add(entry, failed)
        if len(self.outbox) < self.cfg.keep + self.cfg.keep_failed:  # a board that never answers cannot grow it without bound
            self.outbox.append((entry, failed))
        return kept

    def take_outbox(self) -> list[tuple[Entry, bool]]:
        out, self.outbox = self.outbox, []
        return out

    def find(self, rid: str) -> list[dict[str, Any]]:
        """Kept stories of `rid`, and those still running on this router replica, newest first."""
        live = [s.to_dict() for s in self.running.values() if s.id == rid]
        return sorted(live + self.book.find(rid), key=lambda s: s["arrived_at"], reverse=True)


def merge(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stories from several places (this router's book, the board's) as one list, newest first:
    the same story (one router replica, one arrival) once, a finished copy over a running one."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in groups:
        for s in group:
            k = (s["id"], s["arrived_at"], (s.get("router") or {}).get("replica_id"))
            if k not in seen or (seen[k].get("duration_ms") is None and s.get("duration_ms") is not None):
                seen[k] = s
    return sorted(seen.values(), key=lambda s: s["arrived_at"], reverse=True)


class StoryMiddleware:
    """Opens a story for each POST/DELETE (reads are not stories) and finishes it when the
    response has ended, however it ended; sits inside RequestIdMiddleware (it needs the id)."""

    RECORDED = frozenset({"POST", "DELETE"})

    def __init__(self, app: ASGIApp, stories: Stories | None, batch_scope: str) -> None:
        self.app, self.stories, self.batch_scope = app, stories, batch_scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stories = self.stories
        if scope["type"] != "http" or stories is None or scope["method"] not in self.RECORDED:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        story = stories.begin(state.get("request_id", "-"), scope["method"], scope["path"], self.batch_scope in scope)
        token = _STORY.set(story)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                story.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                story.completed = True
            await send(message)

        # With Serve's tracing on, the story is a span too (serve_app/tracing.py).
        with tracing.span(f"serve_app {story.method} {story.path}", {"serve_app.request_id": story.id}) as span:
            try:
                await self.app(scope, receive, recording_send)
            except BaseException:
                if story.status is None:
                    story.status = 499  # cancelled before answering: the client left (ErrorMiddleware shapes the rest)
                raise
            finally:
                _STORY.reset(token)
                principal = state.get("principal")
                story.key = getattr(principal, "name", None)
                story.model = story.model or state.get("model")
                if story.status is None:
                    story.status = 499
                tracing.describe_request(span, stories.finish(story))
