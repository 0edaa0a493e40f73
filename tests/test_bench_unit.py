"""The benchmark harness measures what it claims: the load generator against a local server (status
codes, streamed first tokens and usage, Retry-After), and the table's ratios."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.load import run
from bench.run import table


def _app() -> Starlette:
    async def ok(request):
        return JSONResponse({"ok": True})

    async def busy(request):
        return JSONResponse({"error": {"message": "full"}}, status_code=503, headers={"retry-after": "1"})

    async def stream(request):
        async def events():
            yield 'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
            await asyncio.sleep(0.02)  # the first token comes later than the first chunk
            for word in ("a", "b", "c"):
                yield "data: " + json.dumps({"choices": [{"delta": {"content": word}}]}) + "\n\n"
            yield 'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/ok", ok, methods=["POST"]), Route("/busy", busy, methods=["POST"]),
                             Route("/stream", stream, methods=["POST"])])


@pytest.fixture(scope="module")
def base():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


def test_closed_loop_counts_every_request_by_status(base):
    r = asyncio.run(run(f"{base}/ok", {}, 2, 0.5, warmup_s=0.1))
    assert r.codes == {200: len(r.latencies_ms)} and len(r.latencies_ms) > 10
    assert r.rps == pytest.approx(len(r.latencies_ms) / r.seconds)
    assert 0 < r.pct(0.5) <= r.pct(0.99)


def test_stream_records_first_content_token_and_usage(base):
    r = asyncio.run(run(f"{base}/stream", {}, 1, 0.3, warmup_s=0, stream=True))
    n = len(r.latencies_ms)
    assert n >= 2 and r.tokens == 3 * n
    assert len(r.ttft_ms) == n and min(r.ttft_ms) >= 20  # not the role chunk that came first
    assert r.summary()["tokens_per_s"] == pytest.approx(3 * n / r.seconds)


def test_rejected_clients_wait_retry_after_only_when_asked(base):
    storm = asyncio.run(run(f"{base}/busy", {}, 2, 0.5, warmup_s=0))
    polite = asyncio.run(run(f"{base}/busy", {}, 2, 0.5, warmup_s=0, honour_retry_after=True))
    assert polite.codes == {503: 2}  # one each, then a 1 s wait that outlasts the run
    assert storm.codes[503] > 20


def test_table_prints_ratios_against_the_same_runs_baselines():
    lat = {"rps": 100.0, "p50": 2.0, "p99": 4.0}
    results = {
        "uvicorn": {"c1": {"rps": 1000.0, "p50": 0.5, "p99": 1.0}, "c32": {"rps": 2000.0, "p50": 1.0, "p99": 2.0}},
        "serve-ours": {"c1": lat, "c32": {**lat, "rps": 500.0}},
        "raw-rerank": {"pairs_per_s": 400.0, "best_batch": 64},
        "http-rerank": {"pairs_per_s": 300.0},
        "infinity": {"pairs_per_s": 200.0},
    }
    out = table(results)
    assert "| serve-ours: req/s at c1 | 100 | 1,000 (uvicorn) | 0.10x |" in out
    assert "| serve-ours: req/s at c32 | 500 | 2,000 (uvicorn) | 0.25x |" in out
    assert "| serve-ours: p50 at c1 | 2.00 ms | 0.50 ms | +1.50 ms |" in out
    assert "0.75x" in out and "1.50x" in out  # vs raw, and vs Infinity
