"""What the request routers of this process know, for the rest of the router replica to read.

Its own module because Serve ships a custom request router class by value (cloudpickle, with its
module's globals copied): state kept in request_router.py's globals would be a copy the handlers
never see. Modules it imports, like this one, travel by reference and are shared.
"""

from __future__ import annotations

import collections
from typing import Any

from serve_app.llm_routing.cost import CostModel, Predictions, ReplicaLoad

MAX_DECISIONS = 10_000

models: dict[str, CostModel] = {}  # LLM deployment name -> its cost model
# (request id, id(body)) -> (replica, predicted cached tokens, the prompt tokens it estimated)
_decisions: collections.OrderedDict[tuple[str, int], tuple[str, int, int]] = collections.OrderedDict()
# (request id, id(body)) of a stream -> (its cost model, the accepted try's handle request id, the
# request router's loop): where the handler says that the first token came
_streams: collections.OrderedDict[tuple[str, int], tuple[CostModel, str, Any]] = collections.OrderedDict()


def record_decision(key: tuple[str, int], replica: str, cached_tokens: int, prompt_tokens: int) -> None:
    """Written on the request router's thread, under the request's attempt key (request id and
    body: request_router.attempt_key); read once by the request's handler."""
    _decisions[key] = (replica, cached_tokens, prompt_tokens)
    while len(_decisions) > MAX_DECISIONS:  # decisions of requests whose handler never asked
        _decisions.popitem(last=False)


def pop_decision(request_id: str, body: dict[str, Any]) -> tuple[str, int, int] | None:
    return _decisions.pop((request_id, id(body)), None)


def record_stream(key: tuple[str, int], model: CostModel, handle_request_id: str, loop: Any) -> None:
    """A stream's try was accepted (request router's thread); a later try of the same request replaces it."""
    _streams[key] = (model, handle_request_id, loop)
    while len(_streams) > MAX_DECISIONS:  # streams whose first token never came
        _streams.popitem(last=False)


def first_token(request_id: str, body: dict[str, Any]) -> None:
    """The handler got a stream's first token: its prompt no longer weighs on the replica's load
    in this router's count (CostModel.prefilled, run on the request router's own loop)."""
    entry = _streams.pop((request_id, id(body)), None)
    if entry is not None:
        model, handle_request_id, loop = entry
        try:
            loop.call_soon_threadsafe(model.prefilled, handle_request_id)
        except RuntimeError:  # the request router's loop is closed (shutting down): nothing to count
            pass


def replica_loads(deployment: str) -> dict[str, ReplicaLoad] | None:
    """The model's replicas' last reports as this router replica's request router holds them
    (None: not routed by the cost-aware router here, or nothing routed yet)."""
    model = models.get(deployment)
    return dict(model.loads) if model is not None and model.loads else None


def reported_waiting(deployment: str) -> tuple[int, float] | None:
    """(prompt tokens every router's requests wait with on the model's replicas, the prefill rate
    they measured), summed over their last reports."""
    loads = replica_loads(deployment)
    if loads is None:
        return None
    return (sum(load.prompt_tokens_waiting for load in loads.values()),
            sum(load.prefill_tokens_per_s for load in loads.values()))


def reported_kv_usage(deployment: str) -> float | None:
    """The model's replicas' mean KV-cache use, as they last reported it (the batch worker's spare KV)."""
    loads = replica_loads(deployment)
    return None if loads is None else sum(load.kv_usage for load in loads.values()) / len(loads)


def routing_view(deployment: str) -> dict[str, dict[str, Any]]:
    """Per replica, what this router replica predicted: prompt tokens sent there and the share of
    them it expected cached (beside which the status view puts vLLM's actual hit rate)."""
    model = models.get(deployment)
    if model is None:
        return {}
    out = {}
    for replica in set(model.loads) | set(model.predictions):  # every replica Serve lists, routed to or not
        p, load = model.predictions.get(replica, Predictions()), model.loads.get(replica, ReplicaLoad())
        out[replica] = {
            "requests": p.requests, "prompt_tokens": p.prompt_tokens, "predicted_cached_tokens": p.predicted_cached,
            "predicted_hit_rate": round(p.predicted_cached / p.prompt_tokens, 4) if p.prompt_tokens else None,
            "outstanding_tokens": model.outstanding.get(replica, 0), "other_routers_tokens": model.others.get(replica, 0),
            "adapters_loaded": sorted(load.adapters),  # the replica's report: vLLM's loaded LoRA adapters
            # the router's prompt blocks one of vLLM's holds (its index is num_blocks x this): cost.ReplicaLoad
            "block_scale": round(load.block_scale(), 3),
        }
    return out
