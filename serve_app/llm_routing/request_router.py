"""The cost model (cost.py) as a Ray Serve request router for an LLM deployment.

Serve builds one per handle, in the process that holds the handle (our router replica), and runs
it on its own event-loop thread: nothing here blocks or calls out; replicas' reports arrive with
Serve's replica updates (`routing_stats`, filled by the replica's `record_routing_stats`). The
ranks returned are preferences: Serve still takes a replica only below its max_ongoing_requests
and the replica may still reject, so backpressure is unchanged.

Each routed request's decision (replica, predicted cached tokens) is kept for the handler's log
line, and each model's `CostModel` for /v1/status, in registry.py: this module travels by value.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.llm_routing import registry
from serve_app.llm_routing.config import RoutingConfig
from serve_app.llm_routing.cost import CostModel, Prompt, ReplicaLoad

logger = logging.getLogger("ray.serve")
ROUTED_METHODS = ("create", "create_stream")  # deployments/llm.py: (api, body, request_id)


class CostAwareRouter(RequestRouter):
    def initialize_state(self, routing: dict[str, Any], adapter_names: dict[str, str] | None = None,
                         adapters_resident: int = 0) -> None:
        self.model = registry.models[self._deployment_id.name] = CostModel(
            RoutingConfig(**routing), adapter_names=adapter_names, adapters_resident=adapters_resident)
        logger.info("cost-aware request router for %s: %s, %d adapter name(s)", self._deployment_id.name, routing,
                    len(adapter_names or {}))
        # handle request id -> (prompt, costs); oldest dropped first (a request cancelled before it
        # was routed never comes back for its entry)
        self._prompts: collections.OrderedDict[str, tuple[Prompt, Any]] = collections.OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        # When every ranked replica is full, wait before asking again (the base class would spin).
        pending_request.routing_context.should_backoff = True
        routed = _routed_call(pending_request)
        if routed is None:
            return [candidate_replicas]  # card, tokenize, probes: least loaded, as Serve's default
        api, body, request_id = routed
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        try:
            self.model.observe({i: ReplicaLoad.from_stats(r.routing_stats) for i, r in by_id.items()})
            prompt = self.model.prompt(api, body)
            ranked = self.model.rank(prompt, list(by_id), attempt_key(request_id, body))
        except Exception:  # noqa: BLE001 - a body we cannot cost still gets a replica (vLLM judges it)
            logger.exception("cost-aware routing failed for request %s: Serve's choice instead", request_id)
            return [candidate_replicas]
        self._prompts[pending_request.metadata.internal_request_id] = (prompt, {c.replica: c for c in ranked})
        while len(self._prompts) > registry.MAX_DECISIONS:
            self._prompts.popitem(last=False)
        return [[by_id[c.replica]] for c in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """A replica accepted it. Its end is counted from this attempt's own result, not from
        on_request_completed: Serve fires that for a rejected attempt too (same request id, maybe
        after the retry was accepted), and a short request may end before this is called."""
        handle_id = pending_request.metadata.internal_request_id
        chosen = self._prompts.pop(handle_id, None)
        routed = _routed_call(pending_request)
        if chosen is None or routed is None:
            return
        prompt, costs = chosen
        replica = replica_id.unique_id
        cost = costs.get(replica)
        _, body, request_id = routed
        key = attempt_key(request_id, body)
        self.model.routed(handle_id, key, replica, prompt, cost)
        # The callback fires on a Ray or gRPC thread: the count changes on the router's own loop.
        loop = self._event_loop
        result.add_done_callback(lambda _: loop.call_soon_threadsafe(self.model.completed, handle_id))
        if key is not None:
            registry.record_decision(key, replica, cost.cached_tokens if cost else 0, prompt.prompt_tokens)
            if pending_request.metadata.call_method == "create_stream":
                registry.record_stream(key, self.model, handle_id, loop)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.model.update({r.replica_id.unique_id: ReplicaLoad.from_stats(r.routing_stats) for r in replicas})


def attempt_key(request_id: str | None, body: dict[str, Any]) -> tuple[str, int] | None:
    """The same for every try of one request and for nothing else: the router's request id (a
    client may send one X-Request-ID for many requests) with the body object the router passes
    unchanged to each of its tries."""
    return None if request_id is None else (request_id, id(body))


def _routed_call(pending_request: PendingRequest) -> tuple[str, dict[str, Any], str | None] | None:
    """(api, body, our request id) of a chat/completion call, or None for any other method."""
    if pending_request.metadata.call_method not in ROUTED_METHODS:
        return None
    args = pending_request.args
    if len(args) < 2 or not isinstance(args[0], str) or not isinstance(args[1], dict):
        return None
    return args[0], args[1], args[2] if len(args) > 2 and isinstance(args[2], str) else None

