"""Retries, fallbacks and circuit breaking: how one request survives a sick model.

Per request, `Dispatcher` walks the model's chain (the model, then its `fallbacks`), with one
deadline for the whole walk:
- a replica that died mid-request (`ReplicaFailed`) is retried, with backoff, on another replica:
  Serve itself does not retry a dead replica's in-flight requests;
- a full queue (`Overloaded`), an open circuit, or a model with no replica moves on to the next
  fallback at once;
- an input too long for the model (`ContextLengthExceeded`) moves to `context_window_fallbacks`;
- any other client mistake (4xx) is final: retrying cannot fix it;
- an engine failure (500) is tried once more; failing again, the model's own probe decides whose
  fault it is: the probe passes → the input is the cause (`InputFailed`, a 400, no circuit
  penalty, so no client can open a circuit for everyone); the probe fails → the model is sick: the
  failure counts against its circuit and the request moves to the next fallback;
- a missed deadline counts against the circuit. Dead replicas do not: they are Serve's to replace.

A circuit's half-open trial is released whatever happens to the request that holds it
(success, failure, client error, cancellation), so it can never stay taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app import stories, tracing
from serve_app.autoscaling.queue import TokenQueue
from serve_app.config import GatewayConfig, ModelConfig
from serve_app.errors import (
    ApiError, ContextLengthExceeded, EngineFailure, GatewayTimeout, InputFailed, Overloaded, ReplicaFailed,
    ServiceUnavailable,
)
from serve_app.replica_calls import with_deadline

PROBE_TIMEOUT_S = 10.0


class Ticket:
    """Admission through a breaker; `trial` when it holds the half-open state's one trial."""

    __slots__ = ("trial",)

    def __init__(self, trial: bool) -> None:
        self.trial = trial


class CircuitBreaker:
    """Closed → (N consecutive failures) → open for a cooldown → half-open: one trial request."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[["CircuitBreaker"], None] = lambda b: None) -> None:
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.on_change = on_change  # called when the circuit opens (again) or closes: alerts
        self.consecutive = 0
        self.opened_at: float | None = None
        self.trial: Ticket | None = None  # the request holding the half-open trial
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock, for the status view

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def acquire(self) -> Ticket | None:
        """A ticket to try the model, or None while the circuit refuses."""
        state = self.state
        if state == "closed":
            return Ticket(trial=False)
        if state == "half_open" and self.trial is None:
            self.trial = Ticket(trial=True)
            return self.trial
        return None

    def success(self) -> None:
        was_open = self.opened_at is not None
        self.consecutive, self.opened_at, self.trial = 0, None, None
        if was_open:
            self.on_change(self)

    def failure(self, error: str, ticket: Ticket | None = None) -> None:
        self.consecutive += 1
        self.note(error)
        if (ticket is not None and ticket is self.trial) or self.consecutive >= self.failures:
            self.opened_at, self.trial = self.clock(), None
            self.on_change(self)

    def note(self, error: str) -> None:
        self.last_error, self.last_error_at = error, time.time()

    def release(self, ticket: Ticket) -> None:
        """The request is done with the model, however it ended: free its trial if it held one
        and the trial was not settled by success() or failure()."""
        if ticket is self.trial:
            self.trial = None

    def snapshot(self) -> dict[str, Any]:
        retry_in = None
        if self.opened_at is not None:
            retry_in = max(0.0, round(self.cooldown_s - (self.clock() - self.opened_at), 1))
        return {"state": self.state, "consecutive_failures": self.consecutive, "retry_in_s": retry_in,
                "last_error": self.last_error, "last_error_at": self.last_error_at}


class Dispatcher:
    def __init__(
        self, gateway: GatewayConfig, models: dict[str, ModelConfig], handles: dict[str, DeploymentHandle],
        ensure_replica: Callable[[str, float], Awaitable[None]], on_event: Callable[[str, str], None] = lambda e, m: None,
        on_circuit: Callable[[str, dict[str, Any]], None] = lambda m, snapshot: None,
        queue: TokenQueue | None = None,
    ) -> None:
        self.gateway, self.models, self.handles = gateway, models, handles
        self.queue = queue  # LLMs' admission by prompt tokens (serve_app/autoscaling/queue.py)
        self.ensure_replica = ensure_replica
        # ("retry" | "fallback" | "circuit_open" | "input_failed", model): metrics hook
        self.on_event = on_event
        self.breakers = {
            n: CircuitBreaker(gateway.breaker_failures, gateway.breaker_cooldown_s,
                              on_change=lambda b, n=n: on_circuit(n, b.snapshot()))
            for n in models
        }

    async def run(self, name: str, call: Callable[[DeploymentHandle, float], Awaitable[Any]],
                  fallbacks: bool = True, prompt_tokens: int = 0) -> tuple[str, Any]:
        """`call(handle, seconds_left)` makes one attempt; returns (model that answered, result).
        `fallbacks=False` pins the request to `name` (retries only). `prompt_tokens`: an LLM
        request's estimate, waiting in each model's token queue until its attempts return."""
        deadline = time.monotonic() + self.gateway.request_timeout_s
        model = self.models[name]
        chain = [name, *model.fallbacks] if fallbacks else [name]
        context_chain = list(model.context_window_fallbacks) if fallbacks else []
        last: ApiError = ServiceUnavailable(f"model '{name}' is unavailable")
        while chain:
            candidate = chain.pop(0)
            if candidate != name:
                self.on_event("fallback", candidate)
            breaker = self.breakers[candidate]
            ticket = breaker.acquire()
            if ticket is None:
                self.on_event("circuit_open", candidate)
                stories.skipped(candidate, "circuit_open")
                last = ServiceUnavailable(f"model '{candidate}' is failing; its circuit is open", retry_after=5)
                continue
            try:
                with self._queued(candidate, prompt_tokens):
                    return candidate, await self._attempts(candidate, call, deadline, breaker, ticket)
            except ContextLengthExceeded as err:
                if not context_chain:
                    raise
                last, chain, context_chain = err, context_chain, []
            except (ReplicaFailed, Overloaded, ServiceUnavailable, EngineFailure) as err:
                last = err  # this model cannot answer now: the next in the chain may
            finally:
                breaker.release(ticket)  # cancelled, client error, ...: the trial never stays taken
        raise last

    def _queued(self, model: str, prompt_tokens: int) -> contextlib.AbstractContextManager[None]:
        if self.queue is None or not prompt_tokens:
            return contextlib.nullcontext()
        return self.queue.held(model, prompt_tokens)

    async def _attempts(self, candidate: str, call: Callable[[DeploymentHandle, float], Awaitable[Any]],
                        deadline: float, breaker: CircuitBreaker, ticket: Ticket) -> Any:
        """Every attempt on one model: retries for dead replicas, the second look at an engine failure."""
        engine_failure: EngineFailure | None = None
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GatewayTimeout(f"no model answered within {self.gateway.request_timeout_s:g}s")
            try:
                result = await self._attempt(candidate, call, left)
            except ReplicaFailed:
                # One replica died; the model's other replicas are fine and Serve replaces the
                # dead one. Not a circuit failure: a crash with many requests in flight would
                # otherwise open the circuit for a healthy model (seen in the stall chaos test).
                attempt += 1
                if attempt >= self.gateway.retry_attempts:
                    raise
                self.on_event("retry", candidate)
                await asyncio.sleep(self.gateway.retry_backoff_s * 2 ** (attempt - 1))
                continue
            except GatewayTimeout:
                breaker.failure("deadline exceeded", ticket)
                raise
            except EngineFailure as err:
                if engine_failure is None:
                    engine_failure = err  # once more, most likely on another replica
                    self.on_event("retry", candidate)
                    continue
                if await self._probe_passes(candidate, deadline):
                    self.on_event("input_failed", candidate)
                    raise InputFailed(
                        f"model '{candidate}' failed twice on this input while it serves its own health probe, "
                        f"so the input is the cause: {err.message}"
                    ) from None
                breaker.failure(err.message, ticket)
                raise
            if engine_failure is not None:
                breaker.note(engine_failure.message)  # one replica failed where another served: shown, not counted
            breaker.success()
            return result

    async def _attempt(self, candidate: str, call: Callable[[DeploymentHandle, float], Awaitable[Any]], left: float) -> Any:
        """One try, written into the request's story (serve_app/stories.py) however it ends."""
        started = time.perf_counter()
        # With Serve's tracing on, a span current during the call: the replica's span is its child.
        with tracing.span(f"serve_app attempt {candidate}", {"serve_app.model": candidate}) as span:
            try:
                await self.ensure_replica(candidate, left)
                result = await call(self.handles[candidate], left)
            except BaseException as exc:
                tracing.describe_attempt(span, stories.attempt(candidate, started, exc=exc))
                raise
            tracing.describe_attempt(span, stories.attempt(candidate, started, result))
        return result

    async def _probe_passes(self, candidate: str, deadline: float) -> bool:
        left = min(PROBE_TIMEOUT_S, deadline - time.monotonic())
        if left <= 0:
            return False
        try:
            await call_replica(self.handles[candidate].probe.remote(), left)
        except Exception:  # noqa: BLE001 - any failure of the known-good probe means the model is sick
            return False
        return True


async def call_replica(response: Any, seconds_left: float) -> Any:
    """One attempt: the deadline cancels the replica's work; Ray's errors become ours."""
    try:
        return await with_deadline(response, seconds_left, response.cancel)
    except asyncio.CancelledError:
        response.cancel()  # our caller (the client) went away: free the replica's work
        raise
