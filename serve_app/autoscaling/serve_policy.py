"""The token policy on Ray Serve's custom autoscaling-policy API.

Serve instantiates `LlmTokenPolicy(**policy_kwargs)` once per deployment in its controller and calls
it every control-loop tick with an `AutoscalingContext`; its wrapper then applies min/max,
upscale/downscale delays and scaling factors to what it returns. The decision itself is
`policy.decide` (pure); this module only reads the context, and tells the app's status board what
it decided and why (/v1/status, /status) and sets the Prometheus gauges. Both are best effort: a
board that cannot be reached never stops a scaling decision. The board is looked up by name on a
thread of its own (a GCS call must not hold the controller's loop), and never created from here:
the app's router replicas create it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import ray

from deployments.status_board import NAMESPACE
from serve_app.autoscaling.policy import SIGNALS, Decision, ReplicaSignals, Targets, decide
from serve_app.metrics import AUTOSCALER_DESIRED, AUTOSCALER_PRESSURE, ray_factory

logger = logging.getLogger("ray.serve")
REPORT_EVERY_S = 10.0  # an unchanged decision is re-sent this often (a restarted board learns it again)


class LlmTokenPolicy:
    def __init__(self, model: str = "", **targets: float) -> None:
        self.model, self.targets = model, Targets(**targets)
        self._last: tuple[Any, ...] | None = None
        self._sent_at = 0.0
        self._gauges: dict[str, Any] | None = None
        self._sender: concurrent.futures.ThreadPoolExecutor | None = None
        self._board: Any = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        decision = self.decide(ctx)
        state = {k: v for k, v in ctx.policy_state.items() if not k.startswith("llm_")}
        state["llm_last_decision"] = decision.as_dict()
        self._tell(ctx, decision)
        return decision.replicas, state

    def decide(self, ctx: Any) -> Decision:
        metrics = ctx.aggregated_metrics or {}
        signals = [ReplicaSignals.of({k: metrics.get(k, {}).get(r, 0.0) for k in SIGNALS})
                   for r in ctx.running_replicas if any(r in metrics.get(k, {}) for k in SIGNALS)]
        cfg = ctx.config
        return decide(ctx.current_num_replicas, ctx.target_num_replicas, signals, self.targets,
                      ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas,
                      float(ctx.total_num_requests or 0.0), cfg.get_target_ongoing_requests())

    def _tell(self, ctx: Any, d: Decision) -> None:
        now = time.time()
        key = (d.replicas, d.action)  # a decision repeated while Serve's delay runs is one decision
        if key == self._last and now - self._sent_at < REPORT_EVERY_S:
            return
        changed = key != self._last
        self._last, self._sent_at = key, now
        if changed and d.action != "hold":
            logger.info("autoscaling %s: %s to %d replicas (%s)", self.model, d.action, d.replicas, d.reason)
        try:
            self._gauge("replicas", AUTOSCALER_DESIRED,
                        "replicas the LLM token policy wants (before Serve's delays)").set(d.replicas, tags={"model": self.model})
            if d.pressure is not None:
                self._gauge("pressure", AUTOSCALER_PRESSURE,
                            "the LLM token policy's load: the worst of KV use, waiting requests, prompt-token "
                            "drain time and prefill demand against their targets (1 = at target)").set(d.pressure, tags={"model": self.model})
        except Exception:  # noqa: BLE001 - metrics never stop a decision
            pass
        if ctx.app_name:
            if self._sender is None:
                self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-autoscaling-report")
            self._sender.submit(self._send, ctx.app_name, {**d.as_dict(), "at": now, "serve_target": ctx.target_num_replicas,
                                                           "running": ctx.current_num_replicas})

    def _send(self, app: str, decision: dict[str, Any]) -> None:
        """On the sender thread: the decision to the app's status board, fire and forget."""
        try:
            if self._board is None:
                self._board = ray.get_actor(f"status_board::{app}", namespace=NAMESPACE)
            board = self._board
            ref = board.autoscaled.remote(self.model, decision)
            ref.future().add_done_callback(lambda done: self._forget(board, done))
        except Exception:  # noqa: BLE001 - no board yet, or it died: looked up again next time
            self._board = None
            logger.debug("could not report the autoscaling decision of %s to the status board", self.model, exc_info=True)

    def _forget(self, board: Any, done: concurrent.futures.Future) -> None:
        """A board that failed the call (killed for good, or its app deleted) is looked up again."""
        if not done.cancelled() and done.exception() is not None and self._board is board:
            self._board = None

    def _gauge(self, key: str, name: str, description: str) -> Any:
        if self._gauges is None:
            self._gauges = {}
        if key not in self._gauges:
            self._gauges[key] = ray_factory("gauge", name, description, ("model",))
        return self._gauges[key]
