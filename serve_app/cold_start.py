"""Models scaled to zero: a bounded wait for the first replica, and what this router replica knows
about whether one is up.

Without the wait a request to a sleeping model would hang until the general deadline; with it the
client gets a clear 503 after `gateway.cold_start_timeout_s`, whose Retry-After is what a start
is measured to take (the last cold start this router waited for, or the load time a replica of
the model reported: weights, engine, first token) less what this request already waited. A model
known to have a replica is not probed again until Serve could have scaled it back down.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from ray.serve.handle import DeploymentHandle

from serve_app.config import GatewayConfig, ModelConfig
from serve_app.errors import GatewayTimeout, ServiceUnavailable
from serve_app.replica_calls import with_deadline


class ColdStart:
    def __init__(self, gateway: GatewayConfig, models: dict[str, ModelConfig], handles: dict[str, DeploymentHandle],
                 reported_load_s: Callable[[str], Awaitable[float | None]] | None = None) -> None:
        self.gateway, self.models, self.handles = gateway, models, handles
        self.reported_load_s = reported_load_s  # a replica's own load time, as last posted (status board)
        self.warm_until: dict[str, float] = {}  # known to have a replica until then
        self.waited_s: dict[str, float] = {}  # the last cold start this router waited for, per model

    def may_sleep(self, name: str) -> bool:
        """Whether the model may have no replica now: it scales to zero and is not known warm."""
        auto = self.models[name].deployment.autoscaling_config
        return auto is not None and auto.min_replicas == 0 and time.monotonic() >= self.warm_until.get(name, 0.0)

    async def wait(self, name: str, seconds_left: float) -> None:
        """Return once the model has a replica (at once unless it may sleep), or raise a 503."""
        if not self.may_sleep(name):
            return
        probe = self.handles[name].card.remote()  # queued at the handle, it also triggers the upscale
        started = time.monotonic()
        try:
            await with_deadline(probe, min(self.gateway.cold_start_timeout_s, seconds_left), probe.cancel)
        except GatewayTimeout:
            waited = time.monotonic() - started
            expected = await self.expected_s(name)
            left = f"; a start takes ~{expected:.0f}s here" if expected else ""
            raise ServiceUnavailable(
                f"model '{name}' is scaled to zero and its first replica did not start within "
                f"{waited:.0f}s{left}; retry shortly",
                retry_after=max(1, math.ceil(expected - waited)) if expected and expected > waited else 10,
            ) from None
        waited = time.monotonic() - started
        if waited > 1.0:  # a real start, not a replica that was up already
            self.waited_s[name] = round(waited, 1)
        # Serve keeps the replica at least for the downscale delay after traffic stops.
        self.warm_until[name] = time.monotonic() + self.models[name].deployment.autoscaling_config.downscale_delay_s

    async def expected_s(self, name: str) -> float | None:
        """What a cold start of the model takes, as measured: this router's last wait for one, else
        the load time its replicas last reported."""
        if name in self.waited_s or self.reported_load_s is None:
            return self.waited_s.get(name)
        return await self.reported_load_s(name)
