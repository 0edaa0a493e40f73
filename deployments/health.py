"""Deep health of one replica: can it really serve, and is it making progress?

Serve calls `check_health` every `health_check_period_s`; raising makes Serve replace the
replica. An engine ping misses stalls (ray #61263) and a probe stuck behind a long queue has
killed healthy vLLM replicas (ray #54070), so:
- stalled (requests in flight, no progress for `stall_after_s`) → unhealthy, whatever else;
  progress is a request's output, its end, or (where the engine says so) an engine step that ran
  requests besides the probe: vLLM hands a non-streamed answer over only at its end, and a long
  one is not a stall;
- a real request completed, or real output came (a token streamed, a batch scored), within
  `fresh_s` → healthy, no probe needed: a saturated replica whose long prefills keep a 1-token
  probe waiting past its budget is still serving (the routing bench had replicas replaced so);
- otherwise a tiny real probe through the engine must finish within `probe_timeout_s`, unless it
  waited behind other work the engine kept stepping through meanwhile (a replica busy with long prompts
  is not sick: three 1,450-token prompts at a time kept probes queued past 10 s on a 2-core CPU,
  and Serve replaced healthy replicas until no request got through).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deployments import status_board
from serve_app.serve_context import app_name

POISON_MARKER = "\u2620poison\u2620"  # with the "poison" fault injected, inputs holding it fail


class ReplicaUnhealthy(RuntimeError):
    pass


class HealthMonitor:
    def __init__(self, settings, clock: Callable[[], float] = time.monotonic) -> None:  # settings: HealthSettings
        self.settings, self.clock = settings, clock
        self.in_flight = 0
        self.completed = 0
        self.last_progress = clock()
        # The engine's own last step on `clock` (LLM replicas: vLLM's stat logger), or None.
        self.engine_progress: Callable[[], float | None] = lambda: None
        self.last_served: float | None = None  # a request succeeded or the engine produced output (not a failure's end)
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock, for people
        self.last_probe_at: float | None = None
        self.last_probe_ms: float | None = None
        self.last_probe_ok: bool | None = None
        self.check_ok: bool | None = None  # the last `check`: what the status board alerts on
        self.failing_since: float | None = None  # wall clock of the first failed check in a row
        # Request ids an alert can name: the last failures, and what is in flight (a stall's victims).
        self.failed_request_ids: collections.deque[str] = collections.deque(maxlen=5)
        self.in_flight_ids: dict[str, int] = {}

    def started(self, request_id: str | None = None) -> None:
        if self.in_flight == 0:
            self.last_progress = self.clock()  # idle time is not a stall
        self.in_flight += 1
        if request_id:
            self.in_flight_ids[request_id] = self.in_flight_ids.get(request_id, 0) + 1

    def progress(self) -> None:
        """Real output: a streamed token, a scored batch."""
        self.last_progress = self.last_served = self.clock()

    def finished(self, error: BaseException | None = None, request_id: str | None = None) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_progress = self.clock()  # an end is progress against a stall, but only a success is output
        if request_id and request_id in self.in_flight_ids:
            self.in_flight_ids[request_id] -= 1
            if not self.in_flight_ids[request_id]:
                del self.in_flight_ids[request_id]
        if error is None:
            self.completed += 1
            self.last_served = self.clock()
        elif not isinstance(error, asyncio.CancelledError) and getattr(error, "status", 500) >= 500:
            self.last_error, self.last_error_at = f"{type(error).__name__}: {str(error)[:200]}", time.time()
            if request_id:
                self.failed_request_ids.append(request_id)

    def stalled_for(self) -> float:
        if not self.in_flight:
            return 0.0
        stepped = self.engine_progress()
        return self.clock() - max(self.last_progress, stepped if stepped is not None else self.last_progress)

    async def check(self, probe: Callable[[], Awaitable[Any]]) -> None:
        stalled = self.stalled_for()
        if stalled > self.settings.stall_after_s:
            raise self._fail(f"stalled: {self.in_flight} request(s) in flight, no progress for {stalled:.0f}s")
        if self.last_served is not None and self.clock() - self.last_served < self.settings.fresh_s:
            self._passed()
            return
        t0 = self.clock()
        task = asyncio.ensure_future(probe())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.settings.probe_timeout_s)
        finally:
            if not task.done():  # past its budget, or the check itself was cancelled
                task.cancel()
                # vLLM answers a cancelled request with an error response ("Client disconnected"),
                # not a CancelledError: that is the timeout's doing, not a failure of its own.
                await asyncio.gather(task, return_exceptions=True)
        if not done:
            self._probe_done(t0, False)
            stepped = self.engine_progress()
            if stepped is not None and stepped >= t0:
                self._passed()  # queued behind work the engine kept stepping through: busy, not sick
                return
            raise self._fail(f"probe did not finish within {self.settings.probe_timeout_s:g}s")
        exc = task.exception() if not task.cancelled() else asyncio.CancelledError("the probe was cancelled")
        if exc is not None:
            self._probe_done(t0, False)
            raise self._fail(f"probe failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        self._probe_done(t0, True)
        self._passed()

    def _passed(self) -> None:
        self.check_ok, self.failing_since = True, None

    def _probe_done(self, t0: float, ok: bool) -> None:
        self.last_probe_at, self.last_probe_ms, self.last_probe_ok = time.time(), (self.clock() - t0) * 1000, ok

    def _fail(self, message: str) -> ReplicaUnhealthy:
        self.last_error, self.last_error_at = message, time.time()
        self.check_ok, self.failing_since = False, self.failing_since or self.last_error_at
        return ReplicaUnhealthy(message)

    def snapshot(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight, "completed": self.completed,
            "stalled_for_s": round(self.stalled_for(), 1),
            "last_probe_at": self.last_probe_at, "last_probe_ms": self.last_probe_ms and round(self.last_probe_ms, 1),
            "last_probe_ok": self.last_probe_ok, "last_error": self.last_error, "last_error_at": self.last_error_at,
            "check_ok": self.check_ok, "failing_since": self.failing_since,
            "failed_request_ids": list(self.failed_request_ids), "in_flight_request_ids": list(self.in_flight_ids)[:5],
        }


class MonitoredReplica:
    """What every replica kind shares: tracked requests, deep `check_health`, a status snapshot
    posted to the app's status board, and (only when the model's config allows it) fault injection
    for chaos tests and failover drills."""

    def _init_health(self) -> None:
        self.health = HealthMonitor(self.cfg.health)
        self.fault: str | None = None

    def tracked(self, request_id: str | None = None):
        return _Tracked(self.health, request_id)

    async def _probe(self) -> None:
        raise NotImplementedError

    async def probe(self) -> None:
        """The deep probe on demand: the router asks for it to tell a poison input (the probe
        passes) from a sick model (it fails) after a request failed twice."""
        await asyncio.wait_for(self._probe(), self.cfg.health.probe_timeout_s)

    async def check_health(self) -> None:
        try:
            if self.fault == "unhealthy":
                raise self.health._fail("fault injected: unhealthy")
            await self.health.check(self._probe)
        finally:
            self._post_status()

    async def status(self) -> dict[str, Any]:
        return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        engine = getattr(self, "engine", None)
        where = {"device": getattr(engine, "device", None), "dtype": getattr(engine, "dtype", None)}
        return {**dataclasses.asdict(self.replica), **where, **self.health.snapshot(), "fault": self.fault,
                "load_s": getattr(self, "load_s", None)}

    async def inject_fault(self, kind: str | None) -> str:
        """kind: "stall" (work stops progressing), "unhealthy" (health check fails), "poison" (inputs
        holding POISON_MARKER fail in the engine, as inputs that crash a tokenizer do), None (clear).
        Returns the replica id, since a handle call lands on any one replica."""
        if not self.cfg.allow_fault_injection:
            raise PermissionError(f"model '{self.cfg.name}' does not allow fault injection")
        if kind not in (None, "stall", "unhealthy", "poison"):
            raise ValueError(f"unknown fault {kind!r}")
        self.fault = kind
        return self.replica.replica_id

    def _post_status(self) -> None:
        app = app_name()
        if app is None:
            return  # outside Serve (unit tests): no board
        try:
            status_board.call(app, "post", self.cfg.name, self.replica.replica_id, self._snapshot())
        except Exception:  # noqa: BLE001 - status is best effort; health must not depend on it
            pass


class _Tracked:
    """`with replica.tracked():` around a request, in coroutines and async generators alike."""

    def __init__(self, monitor: HealthMonitor, request_id: str | None = None) -> None:
        self.monitor, self.request_id = monitor, request_id

    def __enter__(self) -> HealthMonitor:
        self.monitor.started(self.request_id)
        return self.monitor

    def __exit__(self, exc_type, exc, tb) -> None:
        self.monitor.finished(None if exc is None or isinstance(exc, GeneratorExit) else exc, self.request_id)
