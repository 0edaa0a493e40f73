"""Cluster behaviour on the simulated two-node cluster: replicas spread across nodes, autoscaling
up under load and down when idle, scale-from-zero with a bounded wait."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
from ray import serve

from deployments import serve_view
from tests.e2e.conftest import ce_app, deploy, kept_apps, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared")]  # the shared apps (tests/e2e/conftest.py)


def replica_states(app: str) -> dict:
    try:
        return serve_view.replica_states(app, "rerank-ce")
    except KeyError:  # the app is not listed yet
        return {}


def test_replicas_of_one_model_never_share_a_node(stack):
    """3 replicas, max_replicas_per_node 1, 2 nodes: two run on different nodes, the third waits."""
    apps = {**kept_apps(stack), "spread": ce_app(stack.tiny_models.ce, {
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
        deploy(kept_apps(stack))


def test_load_scales_up_and_idleness_scales_down(stack):
    """On the session's `scale` app: 1 -> 2 replicas under load, back to 1 when idle."""
    base = f"{stack.base}/scale"
    body = {"model": "ce", "query": "paris", "documents": [f"doc {i} paris capital" for i in range(400)]}
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


def test_scale_from_zero_serves_the_first_request_after_a_cold_start(stack):
    """On the session's `zero` app, which nothing has called yet: the first request waits for a replica."""
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
