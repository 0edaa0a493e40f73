"""Retries, fallbacks and circuit breaking: how one request survives a sick model.

Per request, `Dispatcher` walks the model's chain (the model, then its `fallbacks`), with one
deadline for the whole walk:
- a replica that died mid-request (`ReplicaFailed`) is retried, with backoff, on another replica:
  Serve itself does not retry a dead replica's in-flight requests;
- a full queue (`Overloaded`), an open circuit, or a model with no replica moves on to the next
  fallback at once;
- an input too long for the model (`ContextLengthExceeded`) moves to `context_window_fallbacks`;
- any other client mistake (4xx) is final: retrying cannot fix it;
- an engine failure (500) or a missed deadline counts against the model's circuit; an engine
  failure moves on to the next fallback. Dead replicas do not count: they are Serve's to replace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app.config import GatewayConfig, ModelConfig
from serve_app.errors import (
    ApiError, ContextLengthExceeded, GatewayTimeout, Overloaded, ReplicaFailed, ServiceUnavailable,
)
from serve_app.replica_calls import with_deadline


class CircuitBreaker:
    """Closed → (N consecutive failures) → open for a cooldown → half-open: one trial request."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.trial_running = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock, for the status view

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial_running:
            self.trial_running = True
            return True
        return False

    def success(self) -> None:
        self.consecutive, self.opened_at, self.trial_running = 0, None, False

    def failure(self, error: str) -> None:
        self.consecutive += 1
        self.last_error, self.last_error_at = error, time.time()
        if self.trial_running or self.consecutive >= self.failures:
            self.opened_at, self.trial_running = self.clock(), False

    def release(self) -> None:
        """A trial that ended neither in success nor failure (e.g. a client error)."""
        self.trial_running = False

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
    ) -> None:
        self.gateway, self.models, self.handles = gateway, models, handles
        self.ensure_replica = ensure_replica
        self.on_event = on_event  # ("retry" | "fallback" | "circuit_open", model): metrics hook
        self.breakers = {n: CircuitBreaker(gateway.breaker_failures, gateway.breaker_cooldown_s) for n in models}

    async def run(self, name: str, call: Callable[[DeploymentHandle, float], Awaitable[Any]],
                  fallbacks: bool = True) -> tuple[str, Any]:
        """`call(handle, seconds_left)` makes one attempt; returns (model that answered, result).
        `fallbacks=False` pins the request to `name` (retries only)."""
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
            if not breaker.allow():
                self.on_event("circuit_open", candidate)
                last = ServiceUnavailable(f"model '{candidate}' is failing; its circuit is open", retry_after=5)
                continue
            for attempt in range(self.gateway.retry_attempts):
                left = deadline - time.monotonic()
                if left <= 0:
                    breaker.release()
                    raise GatewayTimeout(f"no model answered within {self.gateway.request_timeout_s:g}s")
                try:
                    await self.ensure_replica(candidate, left)
                    result = await call(self.handles[candidate], left)
                except ContextLengthExceeded as err:
                    breaker.release()
                    if not context_chain:
                        raise
                    last, chain, context_chain = err, context_chain, []
                    break
                except ReplicaFailed as err:
                    # One replica died; the model's other replicas are fine and Serve replaces the
                    # dead one. Not a circuit failure: a crash with many requests in flight would
                    # otherwise open the circuit for a healthy model (seen in the stall chaos test).
                    breaker.release()
                    last = err
                    if attempt + 1 < self.gateway.retry_attempts:
                        self.on_event("retry", candidate)
                        await asyncio.sleep(self.gateway.retry_backoff_s * 2**attempt)
                        continue
                    break
                except (Overloaded, ServiceUnavailable) as err:
                    breaker.release()  # load, not sickness: no circuit penalty
                    last = err
                    break
                except GatewayTimeout:
                    breaker.failure("deadline exceeded")
                    raise
                except ApiError as err:
                    if err.status < 500:
                        breaker.release()
                        raise
                    breaker.failure(err.message)
                    last = err
                    break
                else:
                    breaker.success()
                    return candidate, result
        raise last


async def call_replica(response: Any, seconds_left: float) -> Any:
    """One attempt: the deadline cancels the replica's work; Ray's errors become ours."""
    try:
        return await with_deadline(response, seconds_left, response.cancel)
    except asyncio.CancelledError:
        response.cancel()  # our caller (the client) went away: free the replica's work
        raise
