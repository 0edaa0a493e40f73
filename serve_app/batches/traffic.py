"""Interactive traffic per model, as this router replica sees it: what the batch worker yields to.

A model is busy while an interactive request for it is in flight here, or was seen within
`quiet_s` (here, or by another router replica through the batch store's heartbeat). The first
interactive request on a quiet model calls `on_busy`, so batch lines already running on it can
be preempted at once rather than when the worker next looks.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Traffic:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.on_busy: Callable[[str], None] = lambda model: None

    def begin(self, model: str) -> None:
        self.last_seen[model] = self.clock()
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        if self.in_flight[model] == 1:
            self.on_busy(model)

    def end(self, model: str) -> None:
        self.in_flight[model] = max(0, self.in_flight.get(model, 0) - 1)
        self.last_seen[model] = self.clock()

    def busy(self, model: str, quiet_s: float) -> bool:
        return self.in_flight.get(model, 0) > 0 or self.clock() - self.last_seen.get(model, float("-inf")) < quiet_s

    def seen_since(self, since: float) -> list[tuple[str, float]]:
        """(model, last seen) for models seen since then, for the store's shared view."""
        now = self.clock()
        return [(m, now if self.in_flight.get(m) else t) for m, t in self.last_seen.items()
                if t >= since or self.in_flight.get(m)]


class TrafficMiddleware:
    """Ends what the router's model check began: an interactive request leaves its model's
    in-flight count when its response ended (a stream: after its last byte), however it ended."""

    KEY = "interactive_model"  # scope["state"] key the router sets for interactive requests

    def __init__(self, app, traffic: Traffic) -> None:  # app: an ASGI app
        self.app, self.traffic = app, traffic

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            model = scope.get("state", {}).get(self.KEY) if scope["type"] == "http" else None
            if model is not None:
                self.traffic.end(model)
