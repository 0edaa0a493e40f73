"""Models scaled to zero: a bounded wait for the first replica, and what this router replica knows
about whether one is up.

Without the wait a request to a sleeping model would hang until the general deadline; with it the
client gets a clear 503 after `gateway.cold_start_timeout_s`. A model known to have a replica is
not probed again until Serve could have scaled it back down.
"""

from __future__ import annotations

import time

from ray.serve.handle import DeploymentHandle

from serve_app.config import GatewayConfig, ModelConfig
from serve_app.errors import GatewayTimeout, ServiceUnavailable
from serve_app.replica_calls import with_deadline


class ColdStart:
    def __init__(self, gateway: GatewayConfig, models: dict[str, ModelConfig], handles: dict[str, DeploymentHandle]) -> None:
        self.gateway, self.models, self.handles = gateway, models, handles
        self.warm_until: dict[str, float] = {}  # known to have a replica until then

    def may_sleep(self, name: str) -> bool:
        """Whether the model may have no replica now: it scales to zero and is not known warm."""
        auto = self.models[name].deployment.autoscaling_config
        return auto is not None and auto.min_replicas == 0 and time.monotonic() >= self.warm_until.get(name, 0.0)

    async def wait(self, name: str, seconds_left: float) -> None:
        """Return once the model has a replica (at once unless it may sleep), or raise a 503."""
        if not self.may_sleep(name):
            return
        probe = self.handles[name].card.remote()  # queued at the handle, it also triggers the upscale
        try:
            await with_deadline(probe, min(self.gateway.cold_start_timeout_s, seconds_left), probe.cancel)
        except GatewayTimeout:
            raise ServiceUnavailable(
                f"model '{name}' is scaled to zero and its first replica did not start within "
                f"{self.gateway.cold_start_timeout_s:g}s; retry shortly", retry_after=10,
            ) from None
        # Serve keeps the replica at least for the downscale delay after traffic stops.
        self.warm_until[name] = time.monotonic() + self.models[name].deployment.autoscaling_config.downscale_delay_s
