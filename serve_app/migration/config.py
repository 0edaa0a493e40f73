"""The `migration:` section of an LLM model: whether a stream outlives its replica (docs/MIGRATION.md)."""

from __future__ import annotations

from pydantic import Field

from serve_app.config_base import StrictConfig


class MigrationSettings(StrictConfig):
    """A stream whose replica fails after its first token continues on another replica from the
    token ids sent so far. Costs the replica one JSON parse per streamed event while on."""

    enabled: bool = Field(True, description="continue cut streams on another replica (off: they end with an error event)")
    attempts: int = Field(2, ge=1, le=10, description="continuations one stream may take before it ends with an error event")
