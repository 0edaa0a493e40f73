"""The router (HTTP ingress) and what every model shares: limits, deadlines, retries, circuits,
keys, the quota store, alerts and the Batch API, and where models and durable state live."""

from __future__ import annotations

import os
import pathlib
import re

from pydantic import Field, field_validator

from serve_app.alerts.config import AlertsConfig
from serve_app.batches.config import BatchApiConfig
from serve_app.config.errors import ConfigError
from serve_app.config.keys import ApiKeyConfig, RouterSettings, check_keys, hash_key
from serve_app.config.models import ActorResources, DeploymentSettings
from serve_app.config_base import REPO_ROOT, StrictConfig
from serve_app.stories import StoriesConfig
from serve_app.tracing import TracingSettings


class GatewayConfig(StrictConfig):
    """The router (HTTP ingress) and settings shared by every model."""

    models_dir: str = Field(
        "models", description="where prepared models live; relative paths are from the project root"
    )
    deployment: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            num_replicas=1, max_ongoing_requests=256, max_queued_requests=512,
            ray_actor_options=ActorResources(num_cpus=0.5),
        )
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    default_max_tokens: int = Field(256, ge=1, description="a chat request that sets no max_tokens, or a completion that sets it to null, gets this (capped to the context); a completion without the field gets 16")
    request_timeout_s: float = Field(
        120.0, gt=0, description="deadline for a model's answer (first token when streaming) -> 504"
    )
    cold_start_timeout_s: float = Field(
        120.0, gt=0, description="min_replicas 0 models: how long a request waits for a first replica -> 503"
    )
    max_documents: int = Field(10_000, ge=1, description="rerank documents / embedding inputs per request -> 413 beyond")
    rerank_max_parallel_chunks: int = Field(
        8, ge=1, le=256, description="a long rerank list is split into at most this many concurrent calls"
    )
    retry_attempts: int = Field(3, ge=1, le=10, description="tries per model when a replica dies mid-request")
    retry_backoff_s: float = Field(0.1, ge=0, description="first backoff; doubles per retry")
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open a model's circuit")
    breaker_cooldown_s: float = Field(15.0, gt=0, description="how long an open circuit refuses before a trial")
    status_gone_retention_s: float = Field(
        300.0, ge=0, description="a replica Serve no longer lists is shown as gone this long, then dropped"
    )
    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="the router's default keys; the `router` deployment's user_config "
        "(RouterSettings) replaces them in place, without restarting models (README: rotate a key)"
    )
    api_keys_env: str | None = Field(
        None, description="env var with more keys as 'name=key[:admin],...' (hashed at start-up)"
    )
    limits_store: str = Field(
        "memory", description="where quotas and usage live: 'memory' (this router replica; usage in a SQLite "
        "file under data_dir) or a Redis URL redis://[:password@]host:port/db (also rediss://, redis+unix://) "
        "shared by every router replica on every node"
    )
    limits_store_timeout_s: float = Field(
        0.25, gt=0, le=10, description="Redis connect/read timeout, and the longest a request waits for its "
        "admission; a store unreachable or slower than this falls back to this router's memory for quotas "
        "(docs/OPERATIONS.md)"
    )
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="pushed alerts (docs/OPERATIONS.md)")
    stories: StoriesConfig = Field(
        default_factory=StoriesConfig, description="request stories by id: GET /v1/requests/{id}, `trace` (docs/OPERATIONS.md)"
    )
    tracing: TracingSettings = Field(
        default_factory=TracingSettings, description="OpenTelemetry export of request spans (docs/OPERATIONS.md)"
    )
    batch: BatchApiConfig = Field(default_factory=BatchApiConfig, description="the Batch API's store and share (docs/BATCHES.md)")
    data_dir: str = Field(
        "data", description="durable router state (usage-<app>.sqlite3 with a memory limits_store, batches-<app>.sqlite3); relative "
        "paths are from the project root"
    )

    @field_validator("deployment")
    @classmethod
    def _router_deployment(cls, v: DeploymentSettings) -> DeploymentSettings:
        if v.max_queued_tokens is not None:
            raise ValueError("max_queued_tokens applies to llm models, not the router")
        if v.autoscaling_config is not None and (v.autoscaling_config.policy == "tokens" or v.autoscaling_config.token_fields_set()):
            raise ValueError("autoscaling_config.policy 'tokens' applies to llm models; the router scales on requests")
        return v

    @field_validator("limits_store")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        if v != "memory" and not re.match(r"^(redis|rediss|redis\+unix)://\S+$", v):
            raise ValueError("expected 'memory' or a Redis URL: redis://host:port/db, rediss://..., redis+unix:///path")
        return v

    @property
    def shared_store(self) -> bool:
        return self.limits_store != "memory"

    def env_api_keys(self) -> list[ApiKeyConfig]:
        """Keys from `api_keys_env`, read once here (in the router replica); raw keys never leave."""
        raw = os.environ.get(self.api_keys_env, "") if self.api_keys_env else ""
        keys = []
        for item in filter(None, (x.strip() for x in raw.split(","))):
            name, _, secret = item.partition("=")
            admin = secret.endswith(":admin")  # the role is the last ':' field; a key may hold ':' itself
            secret = secret.removesuffix(":admin")
            if not name or not secret:
                raise ConfigError(f"{self.api_keys_env}: expected 'name=key[:admin]' items, got one without a name or key")
            keys.append(ApiKeyConfig(name=name, sha256=hash_key(secret), admin=admin))
        try:
            check_keys(self.api_keys + keys)  # the same checks as configured keys, against them too
        except ValueError as err:
            raise ConfigError(f"{self.api_keys_env} (after gateway.api_keys): {err}") from None
        return keys

    def router_settings(self) -> RouterSettings:
        """The router deployment's default user_config."""
        return RouterSettings(api_keys=self.api_keys)

    @property
    def data_path(self) -> pathlib.Path:
        env = os.environ.get("SERVE_APP_DATA_DIR")  # read once, here, for test/CI overrides
        path = pathlib.Path(env or self.data_dir).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path

    @property
    def models_path(self) -> pathlib.Path:
        env = os.environ.get("SERVE_APP_MODELS_DIR")  # read once, here, for test/CI overrides
        path = pathlib.Path(env or self.models_dir).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path
