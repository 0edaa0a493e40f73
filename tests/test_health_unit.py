"""Deep health logic: stalls, freshness, probe budgets."""

from __future__ import annotations

import asyncio

import pytest

from deployments.health import HealthMonitor, ReplicaUnhealthy
from serve_app.config import HealthSettings


def monitor(**kw):
    now = [100.0]
    m = HealthMonitor(HealthSettings(**{"probe_timeout_s": 0.2, "fresh_s": 5, "stall_after_s": 10, **kw}), clock=lambda: now[0])
    return m, now


async def ok_probe():
    return None


def test_stall_is_unhealthy_even_when_a_probe_would_pass():
    m, now = monitor()
    m.started()
    now[0] += 11
    with pytest.raises(ReplicaUnhealthy, match="stalled: 1 request"):
        asyncio.run(m.check(ok_probe))
    assert "stalled" in m.snapshot()["last_error"]


def test_progress_and_idleness_are_not_stalls():
    m, now = monitor()
    m.started()
    for _ in range(5):
        now[0] += 8
        m.progress()
    asyncio.run(m.check(ok_probe))
    m.finished()
    now[0] += 1000  # idle for long: nothing in flight, not a stall
    asyncio.run(m.check(ok_probe))


def test_recent_success_skips_the_probe_so_a_busy_queue_cannot_fail_it():
    m, now = monitor()
    m.started()
    m.finished()

    async def never():
        await asyncio.sleep(10)

    asyncio.run(m.check(never))  # fresh: the slow probe is not even run
    now[0] += 6
    with pytest.raises(ReplicaUnhealthy, match="did not finish within 0.2s"):
        asyncio.run(m.check(never))
    assert m.snapshot()["last_probe_ok"] is False


def test_output_streaming_now_passes_a_saturated_replica_whose_probe_would_wait_past_its_budget():
    """A replica busy with long prefills answers no request for a while, but its streams emit
    tokens: that is serving, not failing (the routing bench had such replicas replaced)."""
    m, now = monitor()

    async def never():
        await asyncio.sleep(10)

    m.started()
    now[0] += 6
    m.progress()  # a token streamed
    now[0] += 4
    asyncio.run(m.check(never))  # within fresh_s of the output: no probe
    now[0] += 2  # no output for 6 s now: the probe runs, and its budget counts
    with pytest.raises(ReplicaUnhealthy, match="did not finish within 0.2s"):
        asyncio.run(m.check(never))


def test_requests_that_fail_fast_are_no_output_and_do_not_skip_the_probe():
    m, now = monitor()
    for _ in range(3):
        m.started()
        m.finished(RuntimeError("engine dead"))
    assert m.stalled_for() == 0.0

    async def broken():
        raise RuntimeError("engine dead")

    with pytest.raises(ReplicaUnhealthy, match="probe failed: RuntimeError"):
        asyncio.run(m.check(broken))


def test_probe_errors_and_client_errors():
    m, _ = monitor()

    async def broken():
        raise RuntimeError("engine dead")

    with pytest.raises(ReplicaUnhealthy, match="engine dead"):
        asyncio.run(m.check(broken))
    from serve_app.errors import InvalidRequest

    m2, _ = monitor()
    m2.started()
    m2.finished(InvalidRequest("bad input"))
    assert m2.snapshot()["last_error"] is None  # a client's mistake is not the replica's error
