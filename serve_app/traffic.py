"""The last hour per model, for the charts on /status, without a Prometheus server.

Each router replica counts what it answered in a `Window` (requests, server errors, latency and
time-to-first-token histograms, completion tokens) and hands it to the app's status board every
`BUCKET_S` (serve_app/status.py); the board keeps a `History`: per model, one bucket per
`BUCKET_S` for `KEEP_S`, into which every router's windows and the replicas' own reports (KV-cache
use, requests in flight, posted each health period) fall. So whichever router replica answers
/v1/status shows the same charts, for all router replicas together.

Latencies are counted in log-spaced bins (each 10% wider than the last, as Prometheus histograms
do with coarser ones): a window or a bucket holds at most one count per bin it saw, however many
requests and router replicas, and windows merge by adding counts. A percentile is its bin's upper
edge, so it reads at most 10% high. Pure: no Ray, an injectable clock.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

BUCKET_S = 10.0
KEEP_S = 3600.0
GROWTH = 1.1  # each latency bin's upper edge is this much above the last's
# A replica reports each health period (10 s by default, plus its probe): its last report stands
# for the buckets after it until this many have passed, so a bucket it happened to miss does not
# dip (in flight, KV use), and a replica gone for longer drops out.
CARRY_BUCKETS = 3


def bin_of(ms: float) -> int:
    """The bin whose upper edge is the first at or above `ms` (1 ms and less: bin 0)."""
    return 0 if ms <= 1 else math.ceil(math.log(ms) / math.log(GROWTH) - 1e-9)


def edge(b: int) -> float:
    return GROWTH ** b


@dataclasses.dataclass
class _Counts:
    requests: int = 0
    errors: int = 0  # answered with a 5xx (a client's 4xx is not the model's failure)
    tokens: int = 0  # completion tokens
    latency: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # bin -> requests
    ttft: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class Window:
    """One router replica's counts since its last hand-over."""

    def __init__(self) -> None:
        self.models: dict[str, _Counts] = {}

    def _of(self, model: str) -> _Counts:
        return self.models.setdefault(model, _Counts())

    def request(self, model: str, status: int, latency_ms: float) -> None:
        c = self._of(model)
        c.requests += 1
        c.errors += status >= 500
        c.latency[bin_of(latency_ms)] += 1

    def first_token(self, model: str, ms: float) -> None:
        self._of(model).ttft[bin_of(ms)] += 1

    def tokens(self, model: str, completion_tokens: int) -> None:
        self._of(model).tokens += max(0, completion_tokens)

    def drain(self) -> dict[str, dict[str, Any]]:
        """What was counted, as plain data for the board; the window starts again empty."""
        out = {m: {"requests": c.requests, "errors": c.errors, "tokens": c.tokens,
                   "latency": dict(c.latency), "ttft": dict(c.ttft)}
               for m, c in self.models.items()}
        self.models = {}
        return out


@dataclasses.dataclass
class _Bucket(_Counts):
    """Every router's counts for one BUCKET_S, and the replicas' own reports in it."""

    # id -> (kv use, in flight, prompt tokens waiting to prefill)
    replicas: dict[str, tuple[float | None, int, int | None]] = dataclasses.field(default_factory=dict)


class History:
    """The board's per-model buckets over the last KEEP_S."""

    def __init__(self, bucket_s: float = BUCKET_S, keep_s: float = KEEP_S) -> None:
        self.bucket_s, self.keep = bucket_s, max(1, round(keep_s / bucket_s))
        self.models: dict[str, dict[int, _Bucket]] = {}

    def _bucket(self, model: str, t: float) -> _Bucket:
        buckets = self.models.setdefault(model, {})
        index = int(t // self.bucket_s)
        bucket = buckets.get(index)
        if bucket is None:
            bucket = buckets[index] = _Bucket()
            newest = max(buckets)
            for old in [i for i in buckets if i <= newest - self.keep]:
                del buckets[old]
        return bucket

    def add_window(self, t: float, window: dict[str, dict[str, Any]]) -> None:
        """A router's window; its counts fall into the bucket of `t` (the window's last instant:
        routers hand over just after each BUCKET_S boundary of the wall clock, so one window
        fills one bucket and no bucket gets two or none)."""
        for model, w in window.items():
            b = self._bucket(model, t)
            b.requests += int(w.get("requests", 0))
            b.errors += int(w.get("errors", 0))
            b.tokens += int(w.get("tokens", 0))
            for name in ("latency", "ttft"):
                getattr(b, name).update({int(k): int(n) for k, n in (w.get(name) or {}).items()})

    def add_replica(self, model: str, replica: str, t: float, kv_usage: float | None, in_flight: int | None,
                    waiting_tokens: int | None = None) -> None:
        """A replica's own report (each health period): its latest in the bucket counts."""
        self._bucket(model, t).replicas[replica] = (kv_usage, int(in_flight or 0),
                                                    None if waiting_tokens is None else int(waiting_tokens))

    def read(self, now: float) -> dict[str, list[dict[str, Any]]]:
        """Per model, one point per bucket with anything in it, oldest first, within KEEP_S of `now`.
        The bucket `now` falls in is still filling (windows arrive at its end): not shown yet."""
        current = int(now // self.bucket_s)
        oldest = current - self.keep + 1
        out = {}
        for model, buckets in self.models.items():
            seen: dict[str, tuple[int, tuple[float | None, int, int | None]]] = {}  # replica -> (bucket of its last report, it)
            points = []
            for i, b in sorted(buckets.items()):
                seen.update({r: (i, v) for r, v in b.replicas.items()})
                if oldest <= i < current:
                    points.append(self._point(i, b, {r: v for r, (at, v) in seen.items() if i - at < CARRY_BUCKETS}))
            if points:
                out[model] = points
        return out

    def _point(self, index: int, b: _Bucket, replicas: dict[str, tuple[float | None, int, int | None]]) -> dict[str, Any]:
        kv = [u for u, _, _ in replicas.values() if u is not None]
        waiting = [w for _, _, w in replicas.values() if w is not None]
        return {
            "t": index * self.bucket_s, "requests": b.requests, "rps": round(b.requests / self.bucket_s, 3),
            "error_rate": round(b.errors / b.requests, 4) if b.requests else None,
            "p50_ms": percentile(b.latency, 0.5), "p99_ms": percentile(b.latency, 0.99),
            "ttft_p50_ms": percentile(b.ttft, 0.5),
            "tokens_per_s": round(b.tokens / self.bucket_s, 2),
            "kv_usage": round(sum(kv) / len(kv), 4) if kv else None,
            "in_flight": sum(n for _, n, _ in replicas.values()) if replicas else None,
            "waiting_tokens": sum(waiting) if waiting else None,  # LLMs: prompt tokens not yet prefilled
            "replicas": len(replicas) if replicas else None,
        }


def percentile(bins: collections.Counter, q: float) -> float | None:
    """The upper edge of the bin holding the q-quantile (reads at most GROWTH - 1 high)."""
    total = sum(bins.values())
    if not total:
        return None
    running = 0
    for b in sorted(bins):
        running += bins[b]
        if running >= q * total:
            return round(edge(b), 1)
    return round(edge(max(bins)), 1)
