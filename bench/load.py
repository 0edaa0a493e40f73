"""A small closed-loop HTTP load generator (aiohttp, which Ray already installs).

`concurrency` workers each send requests back to back for `seconds`; the latency of every request
is kept per status code, so p50/p99 come from real samples, and admitted and rejected requests can
be told apart. Streaming requests also record time to first token and the tokens generated.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.rooms import IDLE_S, IDLE_SETTLE_S, Meter, per_unit


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)
    by_code: dict[int, list[float]] = field(default_factory=dict)
    ttft_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    cpu: dict | None = None  # bench/rooms.py's Meter over the measured window

    @property
    def codes(self) -> dict[int, int]:
        return {k: len(v) for k, v in sorted(self.by_code.items())}

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def pct(self, q: float, code: int | None = None, ttft: bool = False) -> float:
        xs = self.ttft_ms if ttft else (self.by_code.get(code, []) if code is not None else self.latencies_ms)
        return pct(xs, q)

    def summary(self, idle_ms_per_s: dict[str, float] | None = None) -> dict:
        out = {"rps": self.rps, "p50": self.pct(0.5), "p99": self.pct(0.99), "codes": self.codes}
        if self.ttft_ms:
            out |= {"ttft_p50": self.pct(0.5, ttft=True), "ttft_p99": self.pct(0.99, ttft=True), "tokens_per_s": self.tokens_per_s}
        if self.cpu is not None:
            out["cpu"] = per_unit(self.cpu, len(self.latencies_ms), self.tokens, idle_ms_per_s)
        return out


def summarize(levels: dict[str, Result], meter: Meter | None) -> dict:
    """Each load level's summary; with a meter, each room's CPU use with no traffic is measured
    once the load is over and has settled (warm, nothing in flight), and the levels' CPU figures
    are also given net of it."""
    if meter is None:
        return {name: r.summary() for name, r in levels.items()}
    time.sleep(IDLE_SETTLE_S)
    idle = meter.idle(IDLE_S)
    return {"idle_cpu": idle, **{name: r.summary(idle["ms_per_s"]) for name, r in levels.items()}}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(url: str, body: dict, concurrency: int, seconds: float, warmup_s: float = 1.0, stream: bool = False,
              honour_retry_after: bool = False, think_s: float = 0.0, meter: Meter | None = None) -> Result:
    """`stream=True`: an OpenAI SSE stream; the first `content` delta is the first token, and the
    final usage chunk (`stream_options.include_usage`) gives the tokens generated.
    `honour_retry_after=True`: after a 429/503 a worker waits Retry-After seconds, as the openai
    SDK does, instead of sending again at once. `think_s`: each worker pauses this long between
    requests (a person, or a service with gaps), instead of sending the next one at once."""
    result = Result()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(record: bool) -> None:
            t0 = time.perf_counter()
            first, tokens = None, 0
            async with session.post(url, json=body) as r:
                if stream and r.status == 200:
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                            first = time.perf_counter()
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                else:
                    await r.read()
                status, retry_after = r.status, r.headers.get("retry-after")
            if record:
                ms = (time.perf_counter() - t0) * 1000
                result.latencies_ms.append(ms)
                result.by_code.setdefault(status, []).append(ms)
                result.tokens += tokens
                if first is not None:
                    result.ttft_ms.append((first - t0) * 1000)
            if honour_retry_after and status in (429, 503) and retry_after:
                await asyncio.sleep(min(float(retry_after), 60))

        async def worker(record: bool, until: float) -> None:
            while time.perf_counter() < until:
                await one(record)
                if think_s:
                    await asyncio.sleep(think_s)

        stop_warm = time.perf_counter() + warmup_s
        await asyncio.gather(*(worker(False, stop_warm) for _ in range(concurrency)))
        if meter is not None:
            meter.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(True, t0 + seconds) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - t0
        if meter is not None:
            result.cpu = meter.stop()
    return result
