"""Typed configuration: the single source of truth for the gateway and every model.

Everything else receives these validated objects; nothing else parses YAML or reads
environment variables. Validation errors name the offending field (pydantic's `loc`), and
`describe_validation_error` turns them into one line per problem for the CLI.

One module per concern: `models` (one served model), `lora` (its LoRA adapters), `keys` (client
keys, the router's live settings and the names clients may use), `gateway` (the router and what
models share), `loading` (`AppConfig` and reading it), `errors`. A feature's own section lives
beside the feature (`serve_app/alerts/config.py`, `serve_app/batches/config.py`, `gateway.stories`
in `serve_app/stories.py`, `gateway.tracing` in `serve_app/tracing.py`); every public
name is re-exported here, so callers import from `serve_app.config` alone.
"""

from serve_app.alerts.config import AlertsConfig, AlertTarget
from serve_app.batches.config import BatchApiConfig
from serve_app.config.errors import ConfigError, describe_validation_error
from serve_app.config.gateway import GatewayConfig
from serve_app.config.keys import ApiKeyConfig, RouterSettings, adapter_bases, check_keys, hash_key, served_names
from serve_app.config.loading import AppConfig, load_serve_config, parse_app_config
from serve_app.config.lora import LoraAdapter, LoraSettings
from serve_app.config.models import (
    PREPARED_MODELS,
    PREPARED_PREFIX,
    ActorResources,
    AutoscalingSettings,
    BatchSettings,
    DeploymentSettings,
    EngineKind,
    HealthSettings,
    ModelConfig,
    ModelKind,
    RerankMode,
    ServingSettings,
)
from serve_app.config_base import REPO_ROOT
from serve_app.migration.config import MigrationSettings
from serve_app.stories import StoriesConfig
from serve_app.tracing import TracingSettings

BatchConfig = BatchApiConfig  # the name before the rename; kept so existing imports keep working

__all__ = [
    "PREPARED_MODELS", "PREPARED_PREFIX", "REPO_ROOT",
    "ActorResources", "AlertTarget", "AlertsConfig", "ApiKeyConfig", "AppConfig", "AutoscalingSettings",
    "BatchApiConfig", "BatchConfig", "BatchSettings", "ConfigError", "DeploymentSettings", "EngineKind",
    "GatewayConfig", "HealthSettings", "LoraAdapter", "LoraSettings", "MigrationSettings", "ModelConfig", "ModelKind", "RerankMode",
    "RouterSettings", "ServingSettings", "StoriesConfig", "TracingSettings", "adapter_bases", "check_keys", "describe_validation_error", "hash_key",
    "load_serve_config", "parse_app_config", "served_names",
]
