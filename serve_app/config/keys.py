"""Client keys and tenancy: who may call (SHA-256 digests only), which models each key sees,
and the router's live settings (`RouterSettings`) that rotate keys without a restart."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

from pydantic import Field, ValidationError, field_validator

from serve_app.config.errors import ConfigError, describe_validation_error
from serve_app.config.models import ModelConfig
from serve_app.config_base import StrictConfig


class ApiKeyConfig(StrictConfig):
    """One client key. Only its SHA-256 is stored (`python -m serve_app hash-key` makes it).

    Quotas, usage and in-flight slots belong to the key's `name`, so two entries with one name
    (old and new secret while a key is rotated) share one budget and one usage history.
    """

    name: str = Field(min_length=1, max_length=64, description="shown in logs and usage instead of the key")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    admin: bool = Field(False, description="may read status, usage and other admin endpoints")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(
        None, ge=1, description="estimated on admission (prompt characters / 4 + max_tokens), then corrected "
        "upwards with the response's usage; over-estimates are not refunded"
    )
    models: list[str] | None = Field(
        None, description="models (names, aliases or LoRA adapters) this key may use; others answer 404 as if absent and "
        "/v1/models lists only these. None: every model"
    )
    expires_at: datetime.datetime | None = Field(
        None, description="ISO 8601 time (UTC when no offset is given) or unix seconds; after it: 401 'key expired'"
    )
    max_concurrent_requests: int | None = Field(
        None, ge=1, description="requests of this key in flight at once (streams until their last byte) -> 429 beyond"
    )

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, v: datetime.datetime | None) -> datetime.datetime | None:
        return v.replace(tzinfo=datetime.timezone.utc) if v is not None and v.tzinfo is None else v

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at.timestamp() <= now


class RouterSettings(StrictConfig):
    """The router's live settings: the `router` deployment's Serve `user_config`.

    Serve hands a changed user_config to the running router replicas (`reconfigure`) without
    restarting anything, whereas a change to the app's `args` is a new code version that replaces
    every replica, models included. So keys live here; `gateway.api_keys` only seeds the default.
    """

    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list, description="empty (and no api_keys_env keys): no authentication"
    )

    @field_validator("api_keys")
    @classmethod
    def _one_entry_per_secret(cls, v: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
        check_keys(v)
        return v

    @classmethod
    def for_app(cls, user_config: Any, models: list[ModelConfig]) -> "RouterSettings":
        """Validate a router user_config against the app's models; errors name the field."""
        try:
            settings = cls.model_validate(user_config or {})
            check_keys(settings.api_keys, models)
        except ValidationError as err:
            raise ConfigError(describe_validation_error(err).replace("invalid config", "invalid router user_config")) from None
        except ValueError as err:
            raise ConfigError(f"invalid router user_config: {err}") from None
        return settings


LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")


def check_keys(keys: list[ApiKeyConfig], models: list[ModelConfig] | None = None) -> None:
    """One entry per secret; entries sharing a name (two secrets while one is rotated) share its
    quota counters, so they must carry the same limits; allow-lists name only this app's models or
    aliases or adapters (a typo would silently lock the key out). Raises ValueError naming `api_keys.N...`."""
    seen: dict[str, int] = {}
    named: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key.sha256 in seen:
            raise ValueError(f"api_keys.{i}.sha256: same secret as api_keys.{seen[key.sha256]}")
        seen[key.sha256] = i
        first = named.setdefault(key.name, i)
        differ = [f for f in LIMIT_FIELDS if getattr(key, f) != getattr(keys[first], f)]
        if differ:
            raise ValueError(f"api_keys.{i}.{differ[0]}: key name '{key.name}' is also api_keys.{first} with "
                             f"{differ[0]} {getattr(keys[first], differ[0])}, not {getattr(key, differ[0])}: one name "
                             "is one quota, so its entries must carry the same limits")
    if models is None:
        return
    known = set(served_names(models))
    for i, key in enumerate(keys):
        unknown = sorted(set(key.models or ()) - known)
        if unknown:
            raise ValueError(f"api_keys.{i}.models: {unknown} are not models of this app; known: {sorted(known)}")



def served_names(models: list[ModelConfig]) -> dict[str, str]:
    """Every name a client may put in `model` -> the canonical name it is served and counted
    under: a model's name or alias -> the model; an adapter, `base:adapter` or `alias:adapter` ->
    the adapter (an adapter is its own name for allow-lists, quotas, usage and metrics)."""
    names = {m.name: m.name for m in models}
    names.update({alias: m.name for m in models for alias in m.serving.aliases})
    for m in models:
        names.update(m.adapter_names())
    return names


def adapter_bases(models: list[ModelConfig]) -> dict[str, str]:
    """Each adapter's name -> the model whose replicas serve it."""
    return {a: m.name for m in models for a in m.adapters}


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
