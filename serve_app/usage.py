"""Usage per key and model (requests, prompt and completion tokens) by hour, in a durable store.

One interface, two stores: Redis when `limits_store` is Redis (every router replica adds to the
same hashes), else a SQLite file under `data_dir` (one router; survives restarts). Requests add
to an in-memory tally and a background thread writes it every FLUSH_S, so no request waits for
the store; while the store is unreachable the tally is kept and written once it answers again.
A query first writes this replica's tally, so what a client was just told is already counted.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import threading
from collections.abc import Callable
from typing import Protocol

import redis
from sqlalchemy import text

from serve_app.errors import StoreUnavailable
from serve_app.sql import reading, sqlite_engine
from serve_app.store_errors import STORE_ERRORS

logger = logging.getLogger("ray.serve")
HOUR = 3600
FLUSH_S = 2.0


@dataclasses.dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: "Counts") -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


Bucket = tuple[int, str, str]  # (hour start in unix seconds, key name, model)


class UsageStore(Protocol):
    def add(self, tally: dict[Bucket, Counts]) -> None: ...

    def totals(self, since_hour: int, until: float, key: str | None) -> dict[tuple[str, str], Counts]: ...

    def close(self) -> None: ...


class SqliteUsage:
    """One row per hour, key and model; WAL, so router replicas on one node share the file (opened
    as the batch store's is: serve_app/sql.py)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.engine = sqlite_engine(path, busy_timeout_s=5)
        with self.engine.begin() as c:
            c.execute(text("CREATE TABLE IF NOT EXISTS usage (hour INTEGER NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL, "
                           "requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
                           "PRIMARY KEY (hour, key, model))"))

    def add(self, tally: dict[Bucket, Counts]) -> None:
        with self.engine.begin() as c:  # one transaction
            c.execute(
                text("INSERT INTO usage VALUES (:hour, :key, :model, :requests, :prompt_tokens, :completion_tokens) "
                     "ON CONFLICT (hour, key, model) DO UPDATE SET requests = requests + excluded.requests, "
                     "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                     "completion_tokens = completion_tokens + excluded.completion_tokens"),
                [{"hour": hour, "key": key, "model": model, **dataclasses.asdict(counts)}
                 for (hour, key, model), counts in tally.items()],
            )

    def totals(self, since_hour: int, until: float, key: str | None) -> dict[tuple[str, str], Counts]:
        with reading(self.engine) as c:  # waits for no writer
            rows = c.execute(
                text("SELECT key, model, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM usage "
                     "WHERE hour >= :since AND hour < :until AND (:key IS NULL OR key = :key) GROUP BY key, model"),
                {"since": since_hour, "until": until, "key": key},
            ).all()
        return {(k, m): Counts(r, p, t) for k, m, r, p, t in rows}

    def close(self) -> None:
        self.engine.dispose()


class RedisUsage:
    """A hash per UTC day; field = JSON [hour, key, model, counter], so any key name is safe."""

    FIELDS = ("requests", "prompt_tokens", "completion_tokens")

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def close(self) -> None:
        """Nothing to release: the client is the quota store's."""

    def _day_key(self, hour: int) -> str:
        day = datetime.datetime.fromtimestamp(hour, datetime.timezone.utc).date()
        return f"{self.prefix}:usage:{day.isoformat()}"

    def add(self, tally: dict[Bucket, Counts]) -> None:
        pipe = self.client.pipeline(transaction=True)  # all of the tally or none of it
        for (hour, key, model), counts in tally.items():
            for name in self.FIELDS:
                if getattr(counts, name):
                    pipe.hincrby(self._day_key(hour), json.dumps([hour, key, model, name]), getattr(counts, name))
        pipe.execute()

    def totals(self, since_hour: int, until: float, key: str | None) -> dict[tuple[str, str], Counts]:
        days = range(since_hour - since_hour % 86400, int(until) + 1, 86400)
        pipe = self.client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self._day_key(day))
        out: dict[tuple[str, str], Counts] = {}
        for fields in pipe.execute():
            for raw, value in fields.items():
                hour, k, model, name = json.loads(raw)
                if since_hour <= hour < until and (key is None or k == key):
                    counts = out.setdefault((k, model), Counts())
                    setattr(counts, name, getattr(counts, name) + int(value))
        return out


class UsageRecorder:
    def __init__(self, store: UsageStore, on_error: Callable[[str], None] = lambda op: None) -> None:
        self.store = store
        self._tally: dict[Bucket, Counts] = {}
        self._lock = threading.Lock()  # the tally is shared by the event loop and the writer thread
        self._write_lock = threading.Lock()  # one write at a time, so a failed one is merged back whole
        self._on_error = on_error
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None

    def record(self, key: str, model: str, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        bucket = (int(now) - int(now) % HOUR, key, model)
        with self._lock:
            self._tally.setdefault(bucket, Counts()).add(Counts(1, prompt_tokens, completion_tokens))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_forever, name="usage-writer", daemon=True)
                self._writer.start()

    def flush(self) -> bool:
        """Write the tally; on a store error keep it for the next try. True when written."""
        with self._write_lock:
            with self._lock:
                tally, self._tally = self._tally, {}
            if not tally:
                return True
            try:
                self.store.add(tally)
                return True
            except STORE_ERRORS as exc:
                with self._lock:
                    for bucket, counts in tally.items():
                        self._tally.setdefault(bucket, Counts()).add(counts)
                self._on_error("usage")
                logger.warning("usage store unreachable (%s); %d buckets kept for the next write", type(exc).__name__, len(tally))
                return False

    def query(self, since: float, until: float, key: str | None) -> list[dict[str, object]]:
        """Totals per key and model for the hours that start in [since rounded down to the hour, until)."""
        self.flush()
        try:
            totals = self.store.totals(int(since) - int(since) % HOUR, until, key)
        except STORE_ERRORS as exc:
            self._on_error("usage")
            raise StoreUnavailable(f"the usage store is unreachable ({type(exc).__name__}); retry shortly", retry_after=5) from None
        return [
            {"key": k, "model": m, "requests": c.requests, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": c.completion_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens}
            for (k, m), c in sorted(totals.items())
        ]

    def close(self) -> None:
        self._stop.set()
        self.flush()
        self.store.close()

    def _write_forever(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()
