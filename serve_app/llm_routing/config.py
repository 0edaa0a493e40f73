"""The `routing:` section of an LLM model: how its replicas are chosen (docs/ROUTING.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from serve_app.config_base import StrictConfig

Policy = Literal["cache_aware", "power_of_two"]


class RoutingConfig(StrictConfig):
    """Weights are in prompt tokens: a replica's cost for a request is the prefill it would compute
    plus `load_weight` x the tokens already outstanding there plus the KV-cache penalty."""

    policy: Policy | None = Field(
        None, description="cache_aware | power_of_two (Serve's default); unset: cache_aware for a model that may "
        "run two or more replicas, power_of_two for one"
    )
    load_weight: float = Field(1.0, ge=0, le=100, description="cost of one outstanding token on a replica, in prefill tokens")
    kv_penalty_tokens: int = Field(
        2048, ge=0, le=1_000_000, description="cost added as the replica's KV cache fills: this many tokens x use^2"
    )
    adapter_load_tokens: int = Field(
        512, ge=0, le=1_000_000, description="cost of a LoRA adapter the replica does not hold (it loads it first)"
    )
    chars_per_token: float = Field(4.0, gt=0, le=16, description="the router's prompt-length estimate (it holds no tokenizer)")
    stats_period_s: float = Field(2.0, gt=0, le=60, description="how often each replica reports its load (Serve's routing stats)")
