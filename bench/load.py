"""A small closed-loop HTTP load generator (aiohttp, which Ray already installs).

`concurrency` workers each send requests back to back for `seconds`; latencies of every
request are kept, so p50/p99 come from real samples, not estimates.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> str:
        codes = ", ".join(f"{k}:{v}" for k, v in sorted(self.codes.items()))
        return f"{self.rps:8.1f} req/s  p50 {self.pct(0.5):7.2f} ms  p99 {self.pct(0.99):7.2f} ms  [{codes}]"


async def run(url: str, body: dict, concurrency: int, seconds: float, warmup_s: float = 1.0) -> Result:
    result = Result()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop_warm = time.perf_counter() + warmup_s

        async def worker(record: bool, until: float) -> None:
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                async with session.post(url, json=body) as r:
                    await r.read()
                    status = r.status
                if record:
                    result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                    result.codes[status] = result.codes.get(status, 0) + 1

        await asyncio.gather(*(worker(False, stop_warm) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(True, t0 + seconds) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - t0
    return result


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
