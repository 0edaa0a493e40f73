"""Tenancy: teams sharing one router, each by its API key.

A request is admitted before a model runs (an in-flight slot and an estimate charged, or 429) and
settled after with what the replica really counted, which is also what the key's usage records.
One `Tenancy` per router replica, built at start from the gateway config: the quota store (memory
or Redis), the key list (config plus `api_keys_env`, read once) and the usage store beside it.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import Request

from serve_app import stories
from serve_app.admission import Admission
from serve_app.config import ApiKeyConfig, ConfigError, GatewayConfig, check_keys
from serve_app.http import principal_of
from serve_app.metrics import RouterMetrics
from serve_app.quota_store import QuotaStore
from serve_app.usage import RedisUsage, SqliteUsage, UsageRecorder

logger = logging.getLogger("ray.serve")


class Tenancy:
    def __init__(self, gateway: GatewayConfig, aliases: dict[str, str], metrics: RouterMetrics, app: str) -> None:
        """`app`: the Serve application's name; quota keys and usage files are per app."""
        self.aliases, self.metrics = aliases, metrics
        store = QuotaStore(gateway.limits_store, gateway.limits_store_timeout_s, f"serve_app:{app}", self._store_error)
        self.env_keys = gateway.env_api_keys()
        self.admission = Admission(gateway.api_keys + self.env_keys, store)
        self.usage = UsageRecorder(
            RedisUsage(store.redis, f"serve_app:{app}") if store.redis is not None
            else SqliteUsage(gateway.data_path / f"usage-{app}.sqlite3"),
            self._store_error,
        )

    def set_keys(self, api_keys: list[ApiKeyConfig]) -> None:
        """A new key list from the router's user_config, in place; the env keys stay (checked with
        it: a name shared with an env key must carry the same limits). A refused list changes nothing."""
        keys = api_keys + self.env_keys
        try:
            check_keys(keys)
        except ValueError as err:
            raise ConfigError(f"api_keys with {len(self.env_keys)} key(s) from the environment after them: {err}") from None
        if self.admission.enabled and not keys:
            logger.warning("the router's user_config has no API keys: authentication is now OFF")
        self.admission.set_keys(keys)
        logger.info("API keys applied in place: %d (names: %s)", len(keys), ", ".join(sorted({k.name for k in keys})) or "-")

    def allowed(self, request: Request, canonical: str) -> bool:
        """Whether the request's key may use this model (allow-lists may name aliases)."""
        principal = principal_of(request)
        if principal is None or principal.models is None:
            return True
        return canonical in {self.aliases.get(n, n) for n in principal.models}

    def is_admin(self, request: Request) -> bool:
        """Admin views are open while no keys are configured."""
        principal = principal_of(request)
        return not self.admission.enabled or (principal is not None and principal.admin)

    def require_admin(self, request: Request) -> None:
        Admission.require_admin(principal_of(request), self.admission.enabled)

    async def admit(self, request: Request, tokens: int) -> None:
        """Charge the estimate (or 429); `served` corrects it, AuthMiddleware releases the slot.
        Off the event loop with a Redis store (QuotaStore.off_loop): a slow Redis delays only the
        requests it admits, never another request or a stream in progress."""
        principal, admission = principal_of(request), self.admission
        request.scope["state"]["quota"] = await admission.store.off_loop(
            "admit", lambda: admission.admit(principal, tokens), undo=admission.release)

    def served(self, request: Request, model: str, prompt_tokens: int, completion_tokens: int = 0, truncated: int = 0) -> None:
        """The request was served with this real usage: metrics, the quota's correction, usage per key."""
        state = request.scope["state"]
        state["model"] = model
        if prompt_tokens:  # Ray counters refuse 0
            self.metrics.tokens.inc(prompt_tokens, {"model": model, "type": "prompt"})
        if completion_tokens:
            self.metrics.tokens.inc(completion_tokens, {"model": model, "type": "completion"})
        if truncated:
            self.metrics.truncations.inc(truncated, {"model": model})
        quota, used = state.get("quota"), prompt_tokens + completion_tokens
        self.admission.store.background("settle", lambda: self.admission.settle(quota, used))
        principal = principal_of(request)
        key = principal.name if principal is not None else "-"
        self.metrics.served_for(key, model, prompt_tokens, completion_tokens)
        self.usage.record(key, model, prompt_tokens, completion_tokens, time.time())
        stories.note_usage(model, prompt_tokens, completion_tokens)

    def close(self) -> None:
        """Write the usage not written yet (the router's graceful shutdown)."""
        self.usage.close()

    def _store_error(self, op: str) -> None:
        self.metrics.store_errors.inc(1, {"op": op})
