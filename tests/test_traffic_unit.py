"""The last hour per model for /status's charts (serve_app/traffic.py): router windows and replica
reports into 10 s buckets, percentiles from merged log-spaced bins, bounded memory; and the router
hands its window to the status board."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from serve_app.metrics import RouterMetrics, _NoOp
from serve_app.traffic import GROWTH, History, Window, bin_of, edge, percentile


def test_a_window_counts_requests_errors_latency_bins_and_tokens_then_starts_empty():
    w = Window()
    for ms in range(1, 11):
        w.request("llm", 200, float(ms))
    w.request("llm", 503, 100.0)
    w.request("llm", 429, 1.0)  # a client's or a quota's 4xx is not the model's error
    w.first_token("llm", 40.0)
    w.tokens("llm", 64)
    counts = w.drain()["llm"]
    assert (counts["requests"], counts["errors"], counts["tokens"]) == (12, 1, 64)
    assert sum(counts["latency"].values()) == 12 and counts["ttft"] == {bin_of(40.0): 1}
    assert w.drain() == {}


@pytest.mark.parametrize("ms", [0.2, 1.0, 1.05, 7.3, 10.0, 999.0, 45_000.0])
def test_a_bins_upper_edge_is_at_or_above_its_values_and_at_most_ten_percent_above(ms):
    b = bin_of(ms)
    assert edge(b) >= ms - 1e-9 and (ms <= 1 or edge(b) <= ms * GROWTH + 1e-9)


def test_a_windows_size_is_its_bins_not_its_requests():
    w = Window()
    for i in range(100_000):
        w.request("ce", 200, float(i % 1000))
    bins = w.drain()["ce"]["latency"]
    assert sum(bins.values()) == 100_000 and len(bins) <= 75  # 1 ms to 1 s in 10% steps
    assert 450 <= percentile(collections.Counter(bins), 0.5) <= 550


def test_buckets_join_every_routers_windows_by_adding_their_bins():
    h = History(bucket_s=10, keep_s=3600)
    # Router A answered 900 requests at 10 ms; router B 100 at 1,000 ms (10 of them 5xx).
    h.add_window(1005.0, {"llm": {"requests": 900, "errors": 0, "tokens": 900, "latency": {bin_of(10.0): 900}, "ttft": {}}})
    h.add_window(1007.0, {"llm": {"requests": 100, "errors": 10, "tokens": 100, "latency": {bin_of(1000.0): 100},
                                  "ttft": {bin_of(50.0): 100}}})
    h.add_replica("llm", "r1", 1008.0, 0.5, 3)
    h.add_replica("llm", "r2", 1009.0, 0.25, 1)
    h.add_replica("llm", "r2", 1009.5, 0.75, 2)  # the latest report of a replica counts
    (point,) = h.read(now=1010.0)["llm"]
    assert point["t"] == 1000.0 and point["requests"] == 1000 and point["rps"] == 100.0 and point["tokens_per_s"] == 100.0
    assert point["error_rate"] == 0.01
    assert 10 <= point["p50_ms"] <= 11 and 1000 <= point["p99_ms"] <= 1100  # 90% of the requests took 10 ms
    assert 50 <= point["ttft_p50_ms"] <= 55 and point["kv_usage"] == 0.625 and point["in_flight"] == 5


def test_history_keeps_an_hour_of_buckets_and_reads_them_oldest_first():
    h = History(bucket_s=10, keep_s=3600)
    for i in range(500):  # 5,000 s of windows
        h.add_window(i * 10.0, {"m": {"requests": 1, "errors": 0, "tokens": 0, "latency": {bin_of(i + 2.0): 1}, "ttft": {}}})
    points = h.read(now=4999.0)["m"]  # the bucket 4990-5000 is still filling: not shown
    assert len(h.models["m"]) <= 361 and len(points) == 359
    assert [p["t"] for p in points] == sorted(p["t"] for p in points) and points[-1]["t"] == 4980.0
    assert h.read(now=5000.0)["m"][-1]["t"] == 4990.0
    assert h.read(now=99_999.0) == {}  # an hour with nothing: no points


def test_a_replicas_last_report_stands_for_the_buckets_it_missed_and_then_drops_out():
    h = History(bucket_s=10, keep_s=3600)
    h.add_replica("llm", "r1", 1001.0, 0.5, 4)
    h.add_replica("llm", "r2", 1002.0, 0.1, 1)
    h.add_replica("llm", "r2", 1012.0, 0.3, 2)  # r1 posts next at 1025 (its period plus a probe)
    h.add_replica("llm", "r1", 1025.0, 0.7, 6)
    points = {p["t"]: p for p in h.read(now=1065.0)["llm"]}
    assert points[1000.0]["in_flight"] == 5 and points[1010.0]["in_flight"] == 6  # r1's 4 carried into 1010
    assert points[1020.0]["in_flight"] == 8 and points[1020.0]["kv_usage"] == 0.5
    assert set(points) == {1000.0, 1010.0, 1020.0}  # no bucket of its own once nothing was posted


def test_percentile_edges():
    assert percentile(collections.Counter(), 0.5) is None
    assert percentile(collections.Counter({bin_of(3.0): 1}), 0.99) == round(edge(bin_of(3.0)), 1)


def test_the_router_counts_model_answers_only_and_hands_them_to_the_board(monkeypatch):
    from serve_app import status

    metrics = RouterMetrics(factory=lambda *a: _NoOp())
    metrics.response("llm", "/v1/chat/completions", 200, 12.0)
    metrics.response("-", "/v1/status", 200, 3.0)  # the status view is nobody's model
    metrics.first_token("llm", 8.0)
    metrics.served_for("team", "llm", 10, 5)
    posted = []
    monkeypatch.setattr(status, "app_name", lambda: "app")
    monkeypatch.setattr(status.status_board, "call", lambda app, method, *args: posted.append((app, method, args)))

    async def periods():
        task = asyncio.get_running_loop().create_task(status.hand_over_traffic(metrics.window, period_s=0.05))
        for _ in range(100):  # until the first window was handed over, then two more empty periods
            await asyncio.sleep(0.05)
            if posted:
                break
        await asyncio.sleep(0.12)
        task.cancel()

    asyncio.run(periods())
    assert len(posted) == 1  # one window with counts; the empty ones after it are not sent
    app, method, (counts, ended_at) = posted[0]
    assert (app, method) == ("app", "traffic") and set(counts) == {"llm"}
    assert abs(ended_at + 1e-3 - round((ended_at + 1e-3) / 0.05) * 0.05) < 1e-6  # the period's boundary
    assert counts["llm"]["requests"] == 1 and counts["llm"]["tokens"] == 5 and counts["llm"]["ttft"] == {bin_of(8.0): 1}


@pytest.mark.parametrize("n", [1, 3])
def test_the_board_keeps_history_from_routers_and_replica_posts(n):
    from deployments.status_board import StatusBoard

    board = StatusBoard.__ray_actor_class__()
    for _ in range(n):
        board.traffic({"ce": {"requests": 2, "errors": 1, "tokens": 0, "latency": {bin_of(5.0): 1, bin_of(7.0): 1}, "ttft": {}}})
    board.post("ce", "r1", {"in_flight": 4, "kv_usage": None})
    assert "ce" not in board.traffic_history() or all(p["t"] < time.time() - 10 for p in board.traffic_history()["ce"])
    points = board.history.read(time.time() + 10)["ce"]  # as the board reads it once the bucket has filled  # one bucket, or two if a boundary fell between the calls
    assert sum(p["requests"] for p in points) == 2 * n and {p["error_rate"] for p in points} - {None} == {0.5}
    assert points[-1]["in_flight"] == 4 and points[-1]["kv_usage"] is None
