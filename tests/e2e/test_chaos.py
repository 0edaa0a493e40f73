"""Chaos on a real Ray cluster: replicas killed, failing health checks, stalls, a node removed.
Non-streaming traffic keeps flowing with zero failed requests, and the status view shows each
fault while it lasts."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from tests.e2e.conftest import chaos_app, deploy, kept_apps, wait_for

pytestmark = pytest.mark.e2e
DEPLOYMENT = "rerank-ce"


class Load:
    """Non-streaming requests from a few threads until stopped; every status is kept."""

    def __init__(self, base: str, threads: int = 4, documents: int = 16, retry_dropped: bool = False, model: str = "ce") -> None:
        self.base, self.codes, self.errors, self.documents, self.model = base, [], [], documents, model
        self.failures: list[str] = []  # no HTTP response at all (connection dropped)
        self.retry_dropped, self.dropped = retry_dropped, []
        self.sent: list[tuple[float, float, str]] = []  # (sent at, answered at, request id) of each answer
        self._stop = threading.Event()
        self._pool = cf.ThreadPoolExecutor(threads)
        self._futures = [self._pool.submit(self._run) for _ in range(threads)]

    def _run(self) -> None:
        body = {"model": self.model, "query": "paris", "documents": [f"doc {i} paris" for i in range(self.documents)]}
        with httpx.Client(base_url=self.base, timeout=90) as c:
            while not self._stop.is_set():
                t0 = time.time()
                r = self._post(c, body)
                if r is None:
                    continue
                self.sent.append((t0, time.time(), r.headers.get("x-request-id", "")))
                self.codes.append(r.status_code)
                if r.status_code != 200:
                    self.errors.append(r.text[:300])

    def _post(self, c: httpx.Client, body: dict) -> httpx.Response | None:
        """One request. With `retry_dropped`, a dropped connection is sent once more, as the openai
        and cohere clients do; a request that never gets a response is recorded as status 0."""
        for attempt in range(2 if self.retry_dropped else 1):
            try:
                return c.post("/v1/rerank", json=body)
            except httpx.TransportError as e:
                (self.dropped if self.retry_dropped and attempt == 0 else self.failures).append(repr(e))
        self.codes.append(0)
        return None

    def stop(self) -> None:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()


def replica_ids(app: str, tries: int = 30, deployment: str = DEPLOYMENT) -> set[str]:
    handle = serve.get_deployment_handle(deployment, app_name=app)
    return {handle.card.remote().result().replica.replica_id for _ in range(tries)}


def router_nodes(app: str) -> set[str]:
    from ray._private.state import actors  # the GCS actor table; the state API needs the dashboard

    alive = actors(actor_state_name="ALIVE").values()
    return {a["Address"]["NodeID"] for a in alive if a["ActorClassName"] == f"ServeReplica:{app}:router"}


def status(stack, app: str) -> dict:
    with httpx.Client(base_url=f"{stack.base}/{app}", timeout=30) as c:
        return c.get("/v1/status").json()["models"]["ce"]


@pytest.fixture(scope="module")
def chaos(stack):
    deploy({**kept_apps(stack), "chaos": chaos_app(stack.tiny_models.ce, {})})
    yield f"{stack.base}/chaos"
    deploy(kept_apps(stack))


def test_killing_a_replica_under_load_loses_no_request(stack, chaos):
    before = replica_ids("chaos")
    assert len(before) == 2
    load = Load(chaos, threads=6, documents=400)  # long enough that both replicas always have work in flight
    time.sleep(3)
    victim = sorted(before)[0]
    killed_at = time.time()
    ray.kill(ray.get_actor(f"SERVE_REPLICA::chaos#{DEPLOYMENT}#{victim}", namespace="serve"), no_restart=True)
    time.sleep(6)
    load.stop()
    assert load.codes and set(load.codes) == {200}, load.errors[:3]
    view = status(stack, "chaos")
    assert view["router_events"].get("retry", 0) >= 1  # the router, not luck, saved them
    _the_retried_request_tells_its_story(chaos, load, victim, killed_at)
    shown = wait_for(lambda: next((r for r in status(stack, "chaos")["replicas"] if r["replica_id"] == victim), None),
                     20, "the killed replica in the status view")
    assert shown["state"] == "gone" and shown["gone_at"] > time.time() - 30  # never "silent" or live
    wait_for(lambda: len(replica_ids("chaos")) == 2 and victim not in replica_ids("chaos"), 60, "a replacement replica")
    wait_for(lambda: victim not in {r["replica_id"] for r in status(stack, "chaos")["replicas"]}, 30,
             "the gone replica dropped after status_gone_retention_s")
    assert all(r["state"] != "gone" for r in status(stack, "chaos")["replicas"])


def _the_retried_request_tells_its_story(base: str, load: Load, victim: str, killed_at: float) -> None:
    """A request in flight when its replica was killed: GET /v1/requests/{id} and `trace` show the
    attempt on the dead replica (named, with its node) and the retry that answered elsewhere, and
    `trace` prints the request's log lines from the replicas."""
    import subprocess
    import sys

    in_flight = [rid for t0, t1, rid in load.sent if t0 <= killed_at <= t1]
    assert in_flight
    with httpx.Client(base_url=base, timeout=30) as c:
        stories = [wait_for(lambda rid=rid: (lambda r: r.json() if r.status_code == 200 else None)(c.get(f"/v1/requests/{rid}")),
                            10, f"the story of {rid}") for rid in in_flight]
    retried = [s for s in stories if any(a["outcome"] == "replica_failed" for a in s["attempts"])]
    assert retried, [s["attempts"] for s in stories][:3]
    story = retried[0]
    dead = [a for a in story["attempts"] if a["outcome"] == "replica_failed"]
    assert {a["replica"] for a in dead} == {victim} and all(a["node_ip"] for a in dead), dead
    served = [a for a in story["attempts"] if a["outcome"] == "ok"]
    assert served and all(a["replica"] and a["node_id"] and a["node_ip"] for a in served), story["attempts"]
    # A chunk of the request the victim answered before it died is served by it, rightly; the
    # retry of the one it lost (started after that attempt failed) is served by another replica.
    failed_at = min(a["at_ms"] + a["duration_ms"] for a in dead)
    retried_ok = [a for a in served if a["at_ms"] >= failed_at - 1]  # at_ms and duration_ms are rounded to 0.1 ms
    assert retried_ok and all(a["replica"] != victim for a in retried_ok), story["attempts"]
    assert story["status"] == 200 and story["outcome"] == "ok" and story["retries"] >= 1 and story["fallbacks"] == []
    assert story["router"]["replica_id"] and story["router"]["node_id"] and story["path"] == "/chaos/v1/rerank"
    out = subprocess.run([sys.executable, "-m", "serve_app", "trace", story["id"], "--url", base,
                          "--local-logs"],  # the test cluster has no dashboard for Ray's log API
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"replica {victim}" in out.stdout and "-> replica_failed" in out.stdout and "-> 200 (ok)" in out.stdout, out.stdout
    logs = out.stdout.split("log lines (", 1)[1].splitlines()[1:]
    assert any("replica_chaos_rerank-ce_" in line for line in logs) and all(story["id"] in line for line in logs), out.stdout[-3000:]


def test_a_request_answered_by_a_fallback_tells_the_chain(stack, chaos):
    """ce's only replica stalls: a request times out (504) and opens ce's circuit (breaker_failures
    1); the next is answered by its fallback. Both stories say so."""
    app = chaos_app(stack.tiny_models.ce, {"num_replicas": 1}, names=("ce", "ce-spare"))
    app["gateway"].update(breaker_failures=1, breaker_cooldown_s=120, request_timeout_s=3, retry_attempts=1)
    app["models"][0]["fallbacks"] = ["ce-spare"]
    deploy({**kept_apps(stack), "chaos": chaos_app(stack.tiny_models.ce, {}), "chaosfb": app})
    try:
        serve.get_deployment_handle(DEPLOYMENT, app_name="chaosfb").inject_fault.remote("stall").result()
        body = {"model": "ce", "query": "paris", "documents": ["paris", "rome"]}
        with httpx.Client(base_url=f"{stack.base}/chaosfb", timeout=60) as c:
            timed_out = c.post("/v1/rerank", json=body)
            answered = c.post("/v1/rerank", json=body)
            assert timed_out.status_code == 504 and answered.status_code == 200, (timed_out.text, answered.text)
            first = c.get(f"/v1/requests/{timed_out.headers['x-request-id']}").json()
            second = c.get(f"/v1/requests/{answered.headers['x-request-id']}").json()
        assert first["outcome"] == "failed" and first["error"]["status"] == 504
        assert [a["outcome"] for a in first["attempts"]] == ["deadline_exceeded"] and first["attempts"][0]["duration_ms"] >= 2500
        assert [(a["model"], a["outcome"]) for a in second["attempts"]] == [("ce", "circuit_open"), ("ce-spare", "ok")]
        assert second["fallbacks"] == ["ce-spare"] and second["model"] == "ce-spare" and second["status"] == 200
    finally:
        deploy({**kept_apps(stack), "chaos": chaos_app(stack.tiny_models.ce, {})})


def test_failing_health_check_gets_the_replica_replaced_while_traffic_continues(stack, chaos):
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name="chaos")
    sick = handle.inject_fault.remote("unhealthy").result()
    load = Load(chaos, threads=2)
    try:
        seen = wait_for(lambda: next((r for r in status(stack, "chaos")["replicas"]
                                      if r["replica_id"] == sick and r.get("last_error")), None), 20, "the fault in the status view")
        assert "fault injected" in seen["last_error"]
        wait_for(lambda: sick not in replica_ids("chaos", 20), 60, "the unhealthy replica to be replaced")
    finally:
        load.stop()
    assert set(load.codes) == {200}, load.errors[:3]


def test_a_stalled_replica_is_detected_within_two_health_periods(stack, chaos):
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name="chaos")
    stalled = handle.inject_fault.remote("stall").result()
    t0 = time.time()
    load = Load(chaos, threads=4)  # some requests land on the stalled replica and stop progressing
    try:
        seen = wait_for(lambda: next((r for r in status(stack, "chaos")["replicas"]
                                      if r["replica_id"] == stalled and "stalled" in (r.get("last_error") or "")), None),
                        30, "the stall in the status view")
        detected_after = seen["last_error_at"] - t0
        assert detected_after <= 2 * 1 + 1 + 1  # 2 health periods + stall_after_s + report slack
        wait_for(lambda: stalled not in replica_ids("chaos", 20), 60, "the stalled replica to be replaced")
    finally:
        load.stop()
    assert set(load.codes) == {200}, load.errors[:3]


def _fault_on_every_replica(kind: str | None, expected: int = 2) -> set[str]:
    """A handle call lands on any one replica: repeat until every replica has the fault."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name="chaos")
    hit: set[str] = set()
    for _ in range(60):
        hit.add(handle.inject_fault.remote(kind).result())
        if len(hit) >= expected:
            break
    return hit


def test_poison_from_one_client_leaves_every_other_client_at_100_percent(stack, chaos):
    """Inputs that crash the engine (as a tokenizer crashes on some text) get their sender a 400,
    share batches with clean requests without spoiling them, and never open the circuit, however
    many are sent (it used to open after 5 and refuse everyone for 15 s)."""
    from deployments.health import POISON_MARKER

    wait_for(lambda: len(replica_ids("chaos")) == 2, 60, "both replicas (earlier tests replaced some)")
    refused_before = status(stack, "chaos")["router_events"].get("circuit_open", 0)
    assert len(_fault_on_every_replica("poison")) == 2
    load = Load(chaos, threads=3)  # everyone else
    poison: list[tuple[int, str | None]] = []
    try:
        with httpx.Client(base_url=chaos, timeout=60) as c:
            until = time.time() + 10
            while time.time() < until:
                r = c.post("/v1/rerank", json={"model": "ce", "query": "paris", "documents": ["fine", f"bad {POISON_MARKER}"]})
                poison.append((r.status_code, r.json().get("error", {}).get("code")))
    finally:
        load.stop()
        _fault_on_every_replica(None)
    assert len(poison) > 5 and set(poison) == {(400, "input_failed")}, poison[:3]  # 5 = breaker_failures
    assert load.codes and set(load.codes) == {200}, load.errors[:3]
    view = status(stack, "chaos")
    assert view["circuit"]["state"] == "closed" and view["router_events"].get("circuit_open", 0) == refused_before


def test_removing_a_node_that_hosts_a_router_and_a_model_replica_loses_no_request(stack):
    """Each of two nodes holds one router replica and one model replica; one node goes. The router
    retries the model call on the survivor, and HAProxy replays requests whose router died before
    answering (RAY_SERVE_HAPROXY_RETRY_ON) on the other router replica. A connection can still drop
    now and then (one in one of four runs here); the client sends that request once more, as the
    openai and cohere clients do. No request may fail."""
    cluster = stack.cluster
    nodes = [cluster.add_node(num_cpus=2, resources={"chaos_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    pinned = {"max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": 0, "resources": {"chaos_slot": 0.5}}}
    router = {"num_replicas": 2, **pinned}
    deploy({**kept_apps(stack), "chaosnode": chaos_app(stack.tiny_models.ce, pinned, router)})
    try:
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name="chaosnode")
        homes = {}
        for _ in range(30):
            card = handle.card.remote().result()
            homes[card.replica.replica_id] = card.replica.node_id
        assert set(homes.values()) == {n.node_id for n in nodes}
        assert router_nodes("chaosnode") == {n.node_id for n in nodes}
        load = Load(f"{stack.base}/chaosnode", retry_dropped=True)
        time.sleep(2)
        cluster.remove_node(nodes[0])
        time.sleep(8)
        load.stop()
        assert load.codes and set(load.codes) == {200}, (load.errors[:3], load.failures[:3])
        survivors = {handle.card.remote().result().replica.node_id for _ in range(10)}
        assert survivors == {nodes[1].node_id}
    finally:
        deploy(kept_apps(stack))
        cluster.remove_node(nodes[1])
