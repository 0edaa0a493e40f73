"""The builder `serve_config.yaml` points at: validated config in, bound deployments out.

`import_path: serve_app.app:build_app` with the models in `args`. One deployment per model
plus the router, which receives their handles. Deployment classes never see YAML.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.embedder import EmbedderServer
from deployments.engines.vllm_spin import ENV as SPIN_ENV
from deployments.llm import LLMServer
from deployments.reranker import RerankerServer
from serve_app.compat import check_model
from serve_app.config import (
    AppConfig, ConfigError, DeploymentSettings, GatewayConfig, ModelConfig, ModelKind, RouterSettings, parse_app_config,
)
from serve_app.config.models import MODEL_GRACE_S, ROUTER_GRACE_S
from serve_app.presets import apply_preset, find_preset
from serve_app.router import Ingress

ROUTER_NAME = "router"
# The router has no batch; its autoscaling target is sized as if it batched this many requests.
ROUTER_BATCH_CAPACITY = 64
_REPLICA_CLASS = {ModelKind.llm: LLMServer, ModelKind.rerank: RerankerServer, ModelKind.embed: EmbedderServer}


def build_app(args: dict[str, Any]) -> Application:
    """Entry point for `serve deploy` / `serve run`: validates `args`, then builds."""
    return build_from_config(parse_app_config(args))


def build_from_config(cfg: AppConfig) -> Application:
    cfg = resolve(cfg)
    problems = [p for m in cfg.models for p in check_model(m, cfg.gateway.models_path)]
    if problems:
        raise ConfigError("this config cannot be served:\n  " + "\n  ".join(problems))
    models_dir = str(cfg.gateway.models_path)
    handles = {}
    env = cfg.gateway.tracing.env()  # the OTLP endpoint, on every deployment of the app (serve_app/tracing.py)
    for model in cfg.models:
        deployment = model_deployment(model, env)
        if model.kind is ModelKind.llm:
            handles[model.name] = deployment.bind(model, models_dir, cfg.gateway.default_max_tokens)
        else:
            handles[model.name] = deployment.bind(model, models_dir)
    return router_deployment(cfg.gateway, env).bind(cfg.gateway, cfg.models, handles)


def resolve(cfg: AppConfig) -> AppConfig:
    """The config with known models' presets applied (serve_app/presets.py)."""
    return cfg.model_copy(update={"models": [apply_preset(m) for m in cfg.models]})


def model_deployment(model: ModelConfig, env: dict[str, str] | None = None) -> Deployment:
    opts = _serve_options(model.deployment, model.batch_capacity, model=model.name, llm=model.kind is ModelKind.llm)
    actor = opts["ray_actor_options"]
    per_worker = actor.get("num_gpus", 0)
    if model.pipeline_parallel_size > 1:
        # Stages across nodes: vLLM's ray executor places its workers in this replica's
        # placement group (PACK: as few nodes as fit). The replica itself holds no GPU.
        workers = model.tensor_parallel_size * model.pipeline_parallel_size
        opts["placement_group_bundles"] = [{"GPU": per_worker, "CPU": actor["num_cpus"]}] + [{"GPU": per_worker}] * (workers - 1)
        opts["placement_group_strategy"] = "PACK"
        actor.pop("num_gpus")
    elif model.tensor_parallel_size > 1 and per_worker:
        # num_gpus is per TP worker; the replica holds them all, so they are on its node and
        # vLLM's mp workers inherit CUDA_VISIBLE_DEVICES from it (a placement group would leave
        # the replica itself without GPUs, and Serve cannot combine one with max_replicas_per_node).
        actor["num_gpus"] = per_worker * model.tensor_parallel_size
    engine_env = {**(env or {}), **replica_environment(model)}
    if engine_env:
        actor["runtime_env"] = {"env_vars": engine_env}
    if model.kind is not ModelKind.llm:
        opts["user_config"] = model.batch.model_dump()
    elif model.routing_policy == "cache_aware":
        opts["request_router_config"] = llm_request_router(model)
    return serve.deployment(_REPLICA_CLASS[model.kind]).options(name=model.deployment_name, **opts)


def replica_environment(model: ModelConfig) -> dict[str, str]:
    """What the model's replica process (and the engine processes it starts) gets in its environment:
    `engine_env`, and the idle-spin cap vLLM's own processes read (deployments/engines/vllm_spin.py).
    The benchmarks give a bare `vllm serve` the same."""
    env = dict(model.engine_env)
    if model.engine_idle_spin_s is not None:
        env[SPIN_ENV] = str(model.engine_idle_spin_s)
    return env


def llm_request_router(model: ModelConfig) -> dict[str, Any]:
    """Serve's RequestRouterConfig for the cost-aware router (serve_app/llm_routing/): it runs in the
    router replica's process, for its handle to this model; the replicas report their load every
    `stats_period_s`."""
    weights = model.routing.model_dump(exclude={"policy"})
    # Which names in `model` are LoRA adapters, and how many a replica keeps loaded.
    adapters = {"adapter_names": model.adapter_names(), "adapters_resident": model.lora.resident if model.lora else 0}
    return {"request_router_class": "serve_app.llm_routing.request_router.CostAwareRouter",
            "request_router_kwargs": {"routing": weights, **adapters},
            "request_routing_stats_period_s": model.routing.stats_period_s,
            "request_routing_stats_timeout_s": max(1.0, model.routing.stats_period_s)}


def router_deployment(gateway: GatewayConfig, env: dict[str, str] | None = None) -> Deployment:
    """Keys travel as the router's user_config, not in its init args: an operator overrides it
    under `deployments: [{name: router, user_config: ...}]` and Serve applies it in place."""
    opts = _serve_options(gateway.deployment, ROUTER_BATCH_CAPACITY, ROUTER_GRACE_S)
    if env:
        opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(env)}
    return serve.deployment(Ingress).options(
        name=ROUTER_NAME, user_config=gateway.router_settings().model_dump(mode="json", exclude_none=True), **opts,
    )


def _serve_options(d: DeploymentSettings, batch_capacity: int, grace_s: float = MODEL_GRACE_S,
                   model: str | None = None, llm: bool = False) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": d.ray_actor_options.num_cpus}
    if d.ray_actor_options.num_gpus:
        actor["num_gpus"] = d.ray_actor_options.num_gpus
    if d.ray_actor_options.memory:
        actor["memory"] = d.ray_actor_options.memory
    if d.ray_actor_options.resources:
        actor["resources"] = dict(d.ray_actor_options.resources)
    opts: dict[str, Any] = {
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s if d.graceful_shutdown_timeout_s is not None else grace_s,
        "ray_actor_options": actor,
    }
    if d.autoscaling_config is not None:
        opts["autoscaling_config"] = d.autoscaling_config.serve_config(
            model, llm, max(1, min(batch_capacity, d.max_ongoing_requests) // 2))
    else:
        opts["num_replicas"] = d.num_replicas
    if d.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = d.max_replicas_per_node
    return opts


def check_router(cfg: AppConfig, overrides: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the router deployment as Serve will run it: its user_config
    override (the live keys) checked against the app's models, and whether its quotas hold in
    total (a memory limits_store counts per router replica: N replicas, N times the budget)."""
    problems, warnings = [], []
    override = next((d for d in overrides if d.get("name") == ROUTER_NAME), {})
    if "user_config" in override:
        try:
            RouterSettings.for_app(override["user_config"], cfg.models)
        except ConfigError as err:
            problems.append(f"deployments[{ROUTER_NAME}].user_config: {err}")
    d = cfg.gateway.deployment
    auto = override.get("autoscaling_config") or (d.autoscaling_config and d.autoscaling_config.model_dump())
    replicas = auto["max_replicas"] if auto else override.get("num_replicas", d.num_replicas) or 1
    if replicas > 1 and not cfg.gateway.shared_store:
        warnings.append(f"the router runs up to {replicas} replicas with limits_store 'memory': every key gets up to "
                        f"{replicas}x its quotas and usage is split across replicas; set gateway.limits_store to a Redis URL")
    return problems, warnings


def describe(cfg: AppConfig) -> list[dict[str, Any]]:
    """What `build_from_config` would deploy, for `python -m serve_app check`."""
    cfg = resolve(cfg)
    rows = [{"deployment": ROUTER_NAME, "serves": "HTTP ingress", **_brief(_serve_options(cfg.gateway.deployment, ROUTER_BATCH_CAPACITY, ROUTER_GRACE_S))}]
    for m in cfg.models:
        d = model_deployment(m)
        rows.append({
            "deployment": d.name, "serves": f"{m.kind.value} '{m.name}' on {m.engine.value}",
            "source": m.resolved_source(cfg.gateway.models_path), "tp": m.tensor_parallel_size,
            "pp": m.pipeline_parallel_size, "gpus_per_replica": m.gpus_per_replica,
            "preset": (p := find_preset(m)) and f"{p.name} ({p.why})", "routing": m.routing_policy,
            "scaling": m.deployment.autoscaling_config and m.deployment.autoscaling_config.resolved_policy(m.kind is ModelKind.llm),
            "adapters": sorted(m.adapters),
            **_brief({"ray_actor_options": {**d.ray_actor_options, "num_gpus": m.gpus_per_replica},
                      "num_replicas": d.num_replicas,
                      "autoscaling_config": m.deployment.autoscaling_config and m.deployment.autoscaling_config.model_dump()}),
        })
    return rows


def _brief(opts: dict[str, Any]) -> dict[str, Any]:
    actor = opts.get("ray_actor_options") or {}
    auto = opts.get("autoscaling_config")
    replicas = f"{auto['min_replicas']}..{auto['max_replicas']} (autoscaling)" if auto else str(opts.get("num_replicas"))
    return {"replicas": replicas, "cpus": actor.get("num_cpus", 0), "gpus": actor.get("num_gpus", 0)}
