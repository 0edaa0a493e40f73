"""Reading a config: `AppConfig` (what `serve_config.yaml`'s `args` holds) and the functions
that validate it from a dict or from a Serve config file. The only place YAML is parsed."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from serve_app.config.errors import ConfigError, describe_validation_error
from serve_app.config.gateway import GatewayConfig
from serve_app.config.keys import check_keys
from serve_app.config.models import ModelConfig, ModelKind
from serve_app.config_base import StrictConfig


class AppConfig(StrictConfig):
    """What `serve_config.yaml`'s `args` holds: the gateway plus the list of models."""

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _keys_name_served_models(self) -> "AppConfig":
        try:
            check_keys(self.gateway.api_keys, self.models)
        except ValueError as err:
            raise ValueError(f"gateway.{err}") from None
        return self

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"duplicate model name {m.name!r}")
            seen.add(m.name)
        for m in v:
            for alias in m.serving.aliases:
                if alias in seen:
                    raise ValueError(f"{m.name}.serving.aliases: {alias!r} is already a model name or alias")
                seen.add(alias)
        for m in v:
            for form, adapter in m.adapter_names().items():
                if form in seen:
                    raise ValueError(f"{m.name}.lora.adapters: {adapter!r} (as {form!r}) is already a model, "
                                     "alias or adapter name")
                seen.add(form)
        by_name = {m.name: m for m in v}
        for m in v:
            for field in ("fallbacks", "context_window_fallbacks"):
                for target in getattr(m, field):
                    other = by_name.get(target)
                    if other is None or other is m:
                        raise ValueError(f"{m.name}.{field}: {target!r} is not another model of this app")
                    if other.kind is not m.kind:
                        raise ValueError(f"{m.name}.{field}: {target!r} is a {other.kind.value} model, not {m.kind.value}")
            if m.context_window_fallbacks and m.kind is not ModelKind.llm:
                raise ValueError(f"{m.name}.context_window_fallbacks: applies to llm models only")
        return v


def parse_app_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None


def load_serve_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[tuple[str, AppConfig]]]:
    """Read a Serve config file and validate each application's `args` that uses our builder."""
    raw = yaml.safe_load(pathlib.Path(path).read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("applications"), list):
        raise ConfigError(f"{path}: expected a Serve config with an 'applications' list")
    apps = []
    for i, app in enumerate(raw["applications"]):
        if str(app.get("import_path", "")).startswith("serve_app.app:"):
            try:
                apps.append((app.get("name", f"app{i}"), parse_app_config(app.get("args") or {})))
            except ConfigError as e:
                raise ConfigError(f"applications[{i}].args: {e}") from None
    return raw, apps

