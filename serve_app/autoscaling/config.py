"""`deployment.autoscaling_config`: Serve's own autoscaling fields, and the token policy's targets.

Serve's default policy scales on ongoing requests per replica. For an LLM that is a poor signal:
eight short chats and eight 30k-token prompts weigh the same, and the KV cache fills before any
queue moves. So an LLM scales on what its replicas report (serve_app/autoscaling/policy.py) unless
`policy: requests` asks for Serve's default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from serve_app.config_base import StrictConfig

POLICY_FUNCTION = "serve_app.autoscaling.serve_policy:LlmTokenPolicy"
TOKEN_FIELDS = ("ttft_target_s", "kv_cache_target", "waiting_target", "scale_down_below")


class AutoscalingSettings(StrictConfig):
    """Serve's autoscaling_config fields we validate and pass through, plus the token policy's."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="default: half of what one replica batches (max_num_seqs / max_batch_size)"
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    policy: Literal["tokens", "requests"] | None = Field(
        None, description="tokens: KV-cache use, waiting requests and prompt tokens against ttft_target_s (LLMs only); "
        "requests: Serve's default (ongoing requests vs target_ongoing_requests). Unset: tokens for LLMs, requests for encoders",
    )
    ttft_target_s: float = Field(
        2.0, gt=0, le=600, description="tokens policy: the time to first token to keep; a replica whose waiting prompt "
        "tokens need longer than this to prefill at its measured rate is over target")
    kv_cache_target: float = Field(
        0.8, gt=0, le=1, description="tokens policy: KV-cache use per replica above which it counts as saturated")
    waiting_target: float = Field(
        5, gt=0, le=10_000, description="tokens policy: requests waiting in vLLM's scheduler per replica above which it is saturated")
    scale_down_below: float = Field(
        0.5, gt=0, lt=1, description="tokens policy: a replica is removed only when the load spread over one replica "
        "fewer stays below this fraction of every target (the band up to 1.0 is hysteresis)")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.policy == "requests" and self.token_fields_set():
            raise ValueError(f"{self.token_fields_set()} apply to policy 'tokens', not 'requests'")
        return self

    def token_fields_set(self) -> list[str]:
        return sorted(set(TOKEN_FIELDS) & self.model_fields_set)

    def resolved_policy(self, llm: bool) -> str:
        return self.policy or ("tokens" if llm else "requests")

    def token_targets(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in TOKEN_FIELDS}

    def serve_config(self, model: str | None, llm: bool, default_target: float) -> dict[str, Any]:
        """Serve's autoscaling_config: the token policy as Serve's custom policy (with its targets
        and the model's name as policy_kwargs, JSON), or Serve's default with its request target."""
        auto = self.model_dump(exclude_none=True, exclude={"policy", *TOKEN_FIELDS})
        # Scale out when replicas average half of what one batches at once: room for bursts
        # without queueing behind a full batch (the request policy's target; the token policy's fallback).
        auto.setdefault("target_ongoing_requests", default_target)
        if self.resolved_policy(llm) == "tokens":
            auto["policy"] = {"policy_function": POLICY_FUNCTION,
                              "policy_kwargs": {"model": model or "", **self.token_targets()}}
        return auto
