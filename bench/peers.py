"""Ray Serve LLM's own prefix-aware router, run in our stack for the routing bench (issue 21).

`PrefixCacheAffinityRouter` (ray.llm) reads `.messages` or `.prompt` from a call's first argument,
as Ray Serve LLM's ingress passes a request object; our router passes (api, body, request_id) to
the LLM replica (serve_app/llm_routing/request_router.py). This adapter hands Ray's router the
same messages or prompt from the body and changes nothing else, so the bench measures Ray's
policy on our replicas, engine settings and workload. Bench only: the product's policies are
`cache_aware` and `power_of_two`.
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from serve_app.llm_routing.request_router import _routed_call

RAY_PREFIX_ROUTER = "bench.peers.RayPrefixCacheAffinity"


class RayPrefixCacheAffinity(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request: Any) -> str | None:
        """None for the replica's other calls (card, tokenize, probes): Ray's router then leaves its
        tree alone and picks as its power-of-two base does ("" would divide by zero there)."""
        routed = _routed_call(pending_request)
        if routed is None:
            return None
        text = self._normalize_prompt_to_string(routed[1].get("messages") or routed[1].get("prompt"))
        return text or None
