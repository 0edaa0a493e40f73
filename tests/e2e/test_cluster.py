"""Cluster behaviour on the simulated two-node cluster: replicas spread across nodes, autoscaling
up under load and down when idle, scale-from-zero with a bounded wait."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
from ray import serve

from tests.e2e.conftest import all_apps, deploy, wait_for

pytestmark = pytest.mark.e2e


def ce_app(ce, deployment: dict, gateway: dict | None = None) -> dict:
    return {
        "gateway": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}, **(gateway or {})},
        "models": [{"name": "ce", "kind": "rerank", "engine": "transformers", "source": str(ce),
                    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.001}, "deployment": deployment}],
    }


def replica_states(app: str) -> dict:
    status = serve.status().applications.get(app)
    if status is None or "rerank-ce" not in status.deployments:
        return {}
    return {str(k.value if hasattr(k, "value") else k): v for k, v in status.deployments["rerank-ce"].replica_states.items()}


def test_replicas_of_one_model_never_share_a_node(stack):
    """3 replicas, max_replicas_per_node 1, 2 nodes: two run on different nodes, the third waits."""
    apps = {**all_apps(stack.tiny_models), "spread": ce_app(stack.tiny_models.ce, {
        "num_replicas": 3, "max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": 0}})}
    deploy(apps, wait=False)
    try:
        wait_for(lambda: replica_states("spread").get("RUNNING") == 2, 120, "2 running replicas")
        time.sleep(3)  # give a wrong scheduler the chance to start a third
        assert replica_states("spread").get("RUNNING") == 2
        handle = serve.get_deployment_handle("rerank-ce", app_name="spread")
        seen = {}
        for _ in range(40):
            card = handle.card.remote().result()
            seen[card.replica.replica_id] = card.replica.node_id
        assert len(seen) == 2 and len(set(seen.values())) == 2, seen
    finally:
        deploy(all_apps(stack.tiny_models))


def test_load_scales_up_and_idleness_scales_down(stack):
    apps = {**all_apps(stack.tiny_models), "scale": ce_app(stack.tiny_models.ce, {
        "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                               "upscale_delay_s": 0, "downscale_delay_s": 3, "look_back_period_s": 1}})}
    deploy(apps)
    base = f"{stack.base}/scale"
    body = {"model": "ce", "query": "paris", "documents": [f"doc {i} paris capital" for i in range(400)]}
    try:
        assert replica_states("scale").get("RUNNING") == 1
        stop = time.time() + 60

        def load(_):
            with httpx.Client(base_url=base, timeout=60) as c:
                while time.time() < stop and replica_states("scale").get("RUNNING", 0) < 2:
                    assert c.post("/v1/rerank", json=body).status_code in (200, 503)

        with cf.ThreadPoolExecutor(6) as pool:
            list(pool.map(load, range(6)))
        assert replica_states("scale").get("RUNNING") == 2, "load did not add a replica"
        wait_for(lambda: replica_states("scale").get("RUNNING") == 1 and len(replica_states("scale")) == 1,
                 60, "idle downscale to 1")
    finally:
        deploy(all_apps(stack.tiny_models))


def test_scale_from_zero_serves_the_first_request_after_a_cold_start(stack):
    apps = {**all_apps(stack.tiny_models), "zero": ce_app(stack.tiny_models.ce, {
        "ray_actor_options": {"num_cpus": 0},
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                               "upscale_delay_s": 0, "downscale_delay_s": 600}},
        gateway={"cold_start_timeout_s": 120})}
    deploy(apps)
    try:
        assert replica_states("zero").get("RUNNING", 0) == 0
        with httpx.Client(base_url=f"{stack.base}/zero", timeout=180) as c:
            t0 = time.time()
            r = c.post("/v1/rerank", json={"model": "ce", "query": "paris", "documents": ["paris", "apple"]})
            assert r.status_code == 200, r.text
            cold = time.time() - t0
            r = c.post("/v1/rerank", json={"model": "ce", "query": "paris", "documents": ["paris", "apple"]})
            assert r.status_code == 200
        assert replica_states("zero").get("RUNNING") == 1
        print(f"cold start served in {cold:.1f}s")
    finally:
        deploy(all_apps(stack.tiny_models))
