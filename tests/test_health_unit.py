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


def test_engine_steps_are_progress_so_a_long_non_streamed_answer_is_not_a_stall():
    """vLLM hands a non-streamed answer over only at its end: while the engine steps, the one
    request in flight is progressing; once the engine stops stepping it is a stall again."""
    m, now = monitor()
    stepped = [None]
    m.engine_progress = lambda: stepped[0]
    m.started("long-answer")
    for _ in range(5):  # 40 s with no output handed over, but the engine stepped
        now[0] += 8
        stepped[0] = now[0] - 1
    asyncio.run(m.check(ok_probe))
    now[0] += 11  # the engine stopped stepping
    with pytest.raises(ReplicaUnhealthy, match="no progress for 12s"):
        asyncio.run(m.check(ok_probe))
    stepped[0] = 0.0  # a step older than the request's own start counts from the start (51 s ago)
    with pytest.raises(ReplicaUnhealthy, match="no progress for 51s"):
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


def test_a_probe_queued_behind_work_the_engine_steps_through_passes_and_a_wedged_engine_fails():
    """Long prompts keep the 1-token probe waiting past its budget while vLLM steps through them:
    busy, not sick. With no engine step since the probe began it is a failure, and the error vLLM
    answers a cancelled request with ("Client disconnected") reads as the timeout it is."""
    from serve_app.errors import InvalidRequest

    m, now = monitor()
    stepped = [None]
    m.engine_progress = lambda: stepped[0]

    async def queued():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise InvalidRequest("Client disconnected") from None  # what vLLM's serving layer does

    def stepping_queue():
        stepped[0] = now[0] + 0.1  # the engine steps (other requests' prefill) while the probe waits
        return queued()

    asyncio.run(m.check(stepping_queue))
    assert m.snapshot()["check_ok"] is True and m.snapshot()["last_probe_ok"] is False
    stepped[0] = now[0] - 1  # the last step was before the probe began: a wedged engine
    with pytest.raises(ReplicaUnhealthy, match="probe did not finish within 0.2s"):
        asyncio.run(m.check(queued))


def test_the_engines_progress_is_a_step_that_ran_requests_besides_the_health_probe():
    """EngineLoad (vLLM's stat logger) marks progress only for steps that ran some request other
    than the replica's own probe: the probe's steps must not hide a stuck request, and steps in
    which requests only wait (a grammar compiling) are not progress either."""
    from types import SimpleNamespace

    from deployments.engines.vllm_load import EngineLoad

    load = EngineLoad(SimpleNamespace(cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=8)))

    def step(running: int, waiting: int = 0) -> None:
        load.record(SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=0.0,
                                    prefix_cache_stats=None), None)

    step(0, waiting=1)  # a request waits for its grammar: the engine loops, nothing runs
    load.record(None, None)
    assert load.stepped_at is None
    load.probing = 1
    step(1)  # only the probe ran
    assert load.stepped_at is None
    step(2)  # the probe and a real request
    first = load.stepped_at
    assert first is not None
    load.probing = 0
    step(1)
    assert load.stepped_at >= first


def test_a_probe_cancelled_from_elsewhere_is_a_failed_check_not_an_escaping_cancel():
    m, _ = monitor()

    async def cancelled():
        raise asyncio.CancelledError()

    with pytest.raises(ReplicaUnhealthy, match="probe failed: CancelledError"):
        asyncio.run(m.check(cancelled))
    assert m.snapshot()["check_ok"] is False and m.snapshot()["last_probe_ok"] is False
