"""Where quota state lives: per-key counters in the `limits` library's storage, in this router
replica's memory or in Redis shared by every router replica, plus the keys' in-flight slots.

Redis unreachable: the router fails open to its own memory (each replica then enforces every
quota on its own, as with a memory store) for RETRY_S before trying Redis again, logs a warning
and counts `serve_app_quota_store_errors`. Keys are still checked (their digests are in the
router), so an outage loosens quotas for seconds but never lets an unknown key in or answers 500.

With Redis, no call runs on the router's event loop (Serve's throughput profile runs handlers and
every stream's chunks there): admission runs in this store's threads and is awaited for at most
`limits_store_timeout_s`; a Redis that is slow without failing (past that budget) is treated as
down, so the request is admitted on memory at once and Redis rests for RETRY_S. Settling the real
usage and releasing a slot are sent to the threads without waiting. On the memory store the calls
stay inline: they are a dictionary update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from serve_app.store_errors import STORE_ERRORS

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
RETRY_S = 5.0  # after a failure, this long on memory before Redis is tried again
LEASE_S = 60.0  # a Redis slot not renewed this long is freed (its router died mid-request)
POOL_THREADS = 8  # Redis round trips in flight at once per router replica (each bounded by the timeout)


@dataclasses.dataclass(frozen=True)
class Limiters:
    """Requests use a moving window (exact; one entry per request). Tokens use a sliding-window
    counter: one counter per window whatever the cost, where a moving window would keep one
    entry per token (a 100k tokens-per-minute key: 100k list items per key)."""

    requests: MovingWindowRateLimiter
    tokens: SlidingWindowCounterRateLimiter
    slots: "MemorySlots | RedisSlots"

    @classmethod
    def over(cls, storage: Storage, slots: "MemorySlots | RedisSlots") -> "Limiters":
        return cls(MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage), slots)


class QuotaStore:
    def __init__(self, uri: str = "memory", timeout_s: float = 0.25, prefix: str = "serve_app",
                 on_error: Callable[[str], None] = lambda op: None) -> None:
        self.kind = "memory" if uri == "memory" else "redis"
        self._local = Limiters.over(MemoryStorage(), MemorySlots())
        self._shared: Limiters | None = None
        self._down_until = 0.0
        self._on_error = on_error
        self.last_error: str | None = None
        self.redis: redis.Redis | None = None  # the client, shared with the usage store
        self.timeout_s = timeout_s
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # both None on memory: calls run inline
        self._background: concurrent.futures.ThreadPoolExecutor | None = None
        if uri != "memory":
            # Admissions have threads of their own: settles and releases queued behind a burst
            # must not spend an admission's budget before it even starts.
            self._pool = concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="quota-admit")
            self._background = concurrent.futures.ThreadPoolExecutor(POOL_THREADS // 2, thread_name_prefix="quota-settle")
            options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}
            storage = storage_from_string(uri, key_prefix=f"{prefix}:limits", wrap_exceptions=True, **options)
            self.redis = storage.get_connection()
            self._shared = Limiters.over(storage, RedisSlots(self.redis, f"{prefix}:slots"))

    async def off_loop(self, op: str, fn: Callable[[], T], undo: Callable[[T], object] = lambda result: None) -> T:
        """`fn()` (which calls `run`) in this store's threads, awaited at most the store's timeout.
        Past it, Redis counts as down (RETRY_S), `fn()` runs again here, on memory, and the late
        result is handed to `undo` when it comes (a Redis slot it took is given back)."""
        if self._pool is None:
            return fn()
        future = self._pool.submit(fn)

        def undo_late(done: concurrent.futures.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                undo(done.result())

        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)  # a call still queued is cancelled
        except asyncio.TimeoutError:
            self._mark_down(op, f"no answer within {self.timeout_s:g}s")
            future.add_done_callback(undo_late)
            return fn()
        except asyncio.CancelledError:  # the request ended while it waited: what it took is given back
            future.add_done_callback(undo_late)
            raise

    def background(self, op: str, fn: Callable[[], object]) -> None:
        """`fn()` in this store's threads, not awaited (settling, releasing); inline on memory."""
        if self._pool is None:
            fn()
            return

        def logged() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - the store's own errors are handled inside run/quietly
                logger.warning("quota store: %s failed", op, exc_info=True)

        self._background.submit(logged)

    def _mark_down(self, op: str, why: str) -> None:
        self._down_until = time.monotonic() + RETRY_S
        self.last_error = why
        logger.warning("quota store unreachable (%s); quotas fall back to this router's memory for %.0fs", why, RETRY_S)
        self._on_error(op)

    def run(self, op: str, fn: Callable[[Limiters], T]) -> T:
        """`fn` against the shared limiters, or against this replica's memory while Redis is down."""
        if self._shared is not None:
            if time.monotonic() >= self._down_until:
                try:
                    return fn(self._shared)
                except STORE_ERRORS as exc:
                    self._mark_down(op, f"{type(exc).__name__}: {str(exc)[:200]}")
                    return fn(self._local)
            self._on_error(op)
        return fn(self._local)

    def quietly(self, op: str, fn: Callable[[], object]) -> None:
        """Best effort (releasing a slot): on a store error the slot's lease frees it later."""
        try:
            fn()
        except STORE_ERRORS:
            self._on_error(op)

    def describe(self) -> dict[str, object]:
        """For /v1/status: which store, and whether this replica is on its memory fallback now."""
        degraded = self._shared is not None and time.monotonic() < self._down_until
        return {"kind": self.kind, "degraded": degraded, "last_error": self.last_error}


class MemorySlots:
    """In-flight requests per key name, in this replica."""

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def acquire(self, name: str, limit: int) -> str | None:
        with self._lock:
            held = self._held.setdefault(name, set())
            if len(held) >= limit:
                return None
            token = uuid.uuid4().hex
            held.add(token)
            return token

    def release(self, name: str, token: str) -> None:
        with self._lock:
            self._held.get(name, set()).discard(token)

    def in_flight(self, name: str) -> int:
        return len(self._held.get(name, ()))


# A sorted set per key name: member = slot token, score = lease deadline (Redis' clock, so
# routers on different nodes agree). Expired leases are dropped before counting.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RENEW = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[i - 1], 'XX', deadline, ARGV[i]) end
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 0
"""


class RedisSlots:
    """In-flight requests per key name across every router replica. A slot is a lease this
    replica renews every LEASE_S / 3 while its request runs, so a router that dies frees its
    slots within LEASE_S instead of holding them forever."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # token -> key name
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def acquire(self, name: str, limit: int) -> str | None:
        token = uuid.uuid4().hex
        if not self._acquire([self._key(name)], [limit, int(LEASE_S * 1000), token]):
            return None
        with self._lock:
            self._held[token] = name
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_forever, name="quota-slot-renewer", daemon=True)
                self._renewer.start()
        return token

    def release(self, name: str, token: str) -> None:
        with self._lock:
            self._held.pop(token, None)
        self._client.zrem(self._key(name), token)

    def in_flight(self, name: str) -> int:
        return int(self._client.zcard(self._key(name)))

    def _key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    def _renew_forever(self) -> None:
        while True:
            time.sleep(LEASE_S / 3)
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                self._renew([self._key(n) for _, n in held], [int(LEASE_S * 1000), *(t for t, _ in held)])
            except STORE_ERRORS as exc:  # the next round retries; a lease outlives two misses
                logger.warning("quota store: renewing %d in-flight slots failed: %s", len(held), type(exc).__name__)
