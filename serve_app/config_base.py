"""What every config object shares: the strict pydantic base and the root that relative paths
resolve from.

A module of its own, outside the `serve_app/config/` package, because the feature configs
(`serve_app/alerts/config.py`, `serve_app/batches/config.py`) derive from it and that package
imports them: importing any `serve_app.config.*` submodule first runs the package's `__init__`,
so a base inside it would put each feature config in an import cycle with `GatewayConfig`.
"""

from __future__ import annotations

import pathlib

from pydantic import BaseModel, ConfigDict

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class StrictConfig(BaseModel):
    """Unknown keys are errors: a misspelt knob must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
