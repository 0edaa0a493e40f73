"""The Batch API's config (`gateway.batch`): where batches live and how much of each model they
may use. Named `BatchApiConfig` so it is not mistaken for `BatchSettings`, the encoders'
`@serve.batch` knobs (serve_app/config/models.py)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from serve_app.config_base import StrictConfig


class BatchApiConfig(StrictConfig):
    """The OpenAI Batch API (docs/BATCHES.md): where batches live and how much of each model they may use."""

    store: str = Field(
        "sqlite", description="'sqlite' (a file under data_dir: one node's router replicas share it) or "
        "postgresql://user:pass@host:port/db (every router replica on every node shares the work)"
    )
    max_file_bytes: int = Field(100 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024, description="POST /v1/files -> 413 beyond")
    max_lines: int = Field(50_000, ge=1, le=1_000_000, description="lines per batch input file -> 400 beyond")
    idle_share: float = Field(
        0.5, gt=0, le=1, description="share of a model's capacity (replicas x max_ongoing_requests) batch lines "
        "may hold while no interactive request is in flight or seen within quiet_s"
    )
    busy_lines: int = Field(
        0, ge=0, description="batch lines per model (in all router replicas) while interactive requests are "
        "about: 0 pauses batches until the model is quiet again"
    )
    llm_kv_usage_below: float = Field(
        0.7, gt=0, le=1, description="an LLM's lines run only while its replicas' mean KV-cache use (their own reports) "
        "is below this; above it they are the first work to yield (running lines are put back)")
    quiet_s: float = Field(2.0, ge=0, le=600, description="an interactive request seen this recently makes a model busy")
    lease_s: float = Field(
        120.0, ge=1, le=86_400, description="a claimed line is renewed while its router replica lives; one not "
        "renewed this long (replica or node gone) is run again by another"
    )
    poll_s: float = Field(0.5, gt=0, le=60, description="how often an idle worker looks for work")
    max_attempts: int = Field(
        5, ge=1, le=100, description="a line failing with 5xx this many times becomes an error line (429s are "
        "retried until the batch expires)"
    )

    retention_s: int = Field(
        30 * 86_400, ge=3600, le=10 * 365 * 86_400, description="ended batches (with their lines and output/error "
        "files) and uploaded files no unended batch reads are deleted this long after they ended or were uploaded; "
        "file objects carry it as expires_at"
    )

    @field_validator("store")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        if v != "sqlite" and not re.match(r"^postgres(ql)?(\+psycopg)?://\S+$", v):
            raise ValueError("expected 'sqlite' or a PostgreSQL URL: postgresql://user:password@host:port/db")
        return v
