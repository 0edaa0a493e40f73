"""Runs one Serve configuration in this process and measures it (bench/run.py calls it in a
subprocess per step: Serve reads its ingress choice when it starts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from serve_app.ray_env import LOCAL_ENV

# Before anything imports Ray: a step run by hand gets the loopback settings bench/run.py gives it.
for _key, _value in LOCAL_ENV.items():
    os.environ.setdefault(_key, _value)

from bench.baselines import free_port  # noqa: E402
from bench.load import run, summarize  # noqa: E402
from bench.rooms import Meter, descendants, process_table, title  # noqa: E402
from bench.routing import POLICIES, routing  # noqa: E402
from bench.workloads import (  # noqa: E402
    NULL_BODY, QUERY, RERANK_BODY, RERANK_CONCURRENCY, app_args, cross_encoder_model, llm_entry, llm_load,
)
from deployments.protocol import ModelCard, RerankResult, ReplicaInfo  # noqa: E402

CORES = os.cpu_count() or 1


class NullReranker:
    """The trivial backend: answers at once, so what is measured is the stack around it."""

    def __init__(self) -> None:
        self.replica = ReplicaInfo("null", "null-replica", "node", "127.0.0.1")

    async def rerank(self, req):
        return RerankResult([0.0] * len(req.documents), len(req.documents), 0, self.replica)

    async def card(self):
        return ModelCard("null", "rerank", "transformers", 512, self.replica)


def gateway(base: str, seconds: float, stories: bool = True) -> dict:
    from ray import serve

    from serve_app.config import parse_app_config
    from serve_app.router import Ingress

    cfg = parse_app_config({"gateway": {"stories": {"enabled": stories}},
                            "models": [{"name": "null", "kind": "rerank", "engine": "transformers", "source": "org/null",
                                        "deployment": {"max_ongoing_requests": 256, "max_queued_requests": -1}}]})
    null = serve.deployment(NullReranker).options(name="null", max_ongoing_requests=256).bind()
    router = serve.deployment(Ingress).options(name="router", max_ongoing_requests=256)
    serve.run(router.bind(cfg.gateway, cfg.models, {"null": null}), name="bench", route_prefix="/")
    meter, code = serve_rooms()
    return {"code": code, **summarize({f"c{c}": asyncio.run(run(f"{base}/v1/rerank", NULL_BODY, c, seconds, meter=meter))
                                       for c in (1, 32)}, meter)}


def rerank(base: str, seconds: float, replicas: int) -> dict:
    """The machine's cores split among `replicas` (Ray gives a replica as many torch threads as its
    num_cpus): one replica with every core, as the raw baseline and Infinity run, or one
    single-threaded replica per core."""
    from bench.models import ensure_cross_encoder

    _deploy([cross_encoder_model(str(ensure_cross_encoder()), replicas=replicas, cpus=CORES / replicas)])
    r = asyncio.run(run(f"{base}/v1/rerank", RERANK_BODY, RERANK_CONCURRENCY, seconds))
    return {"pairs_per_s": r.rps * len(RERANK_BODY["documents"]), **r.summary()}


def long_list(base: str, seconds: float, replicas: int) -> dict:
    """A 1,000-document list, one request at a time: the router splits it across the replicas,
    which share the machine's cores."""
    from bench.models import ensure_cross_encoder

    _deploy([cross_encoder_model(str(ensure_cross_encoder()), replicas=replicas, cpus=CORES / replicas)])
    body = {"model": "minilm-ce", "query": QUERY, "return_documents": False,
            "documents": [f"Document {i} is about one of the many cities of Europe and their museums." for i in range(1000)]}
    # A request takes seconds: measure long enough for several of them.
    r = asyncio.run(run(f"{base}/v1/rerank", body, 1, max(3 * seconds, 24), warmup_s=0.1))
    return {"docs_per_s": r.rps * 1000, **r.summary()}


def overload(base: str, seconds: float) -> dict:
    """Capacity is max_ongoing + max_queued = 8 requests; 24 clients keep sending (3x). Twice: clients
    that resend a rejected request at once (a storm), and clients that wait Retry-After as the
    openai SDK does."""
    from bench.models import ensure_cross_encoder

    _deploy([cross_encoder_model(str(ensure_cross_encoder()), cpus=CORES, max_ongoing_requests=4, max_queued_requests=4)])
    body = {**RERANK_BODY, "documents": RERANK_BODY["documents"][:8]}
    out: dict = {"capacity": 8, "clients": 24, "unloaded": asyncio.run(run(f"{base}/v1/rerank", body, 1, seconds)).summary()}
    for name, polite in (("storm", False), ("sdk", True)):
        loaded = asyncio.run(run(f"{base}/v1/rerank", body, 24, seconds, honour_retry_after=polite))
        out[name] = {**loaded.summary(), "admitted_p50": loaded.pct(0.5, 200), "admitted_p99": loaded.pct(0.99, 200),
                     "rejected_p50": loaded.pct(0.5, 503), "rejected_p99": loaded.pct(0.99, 503),
                     "admitted_per_s": len(loaded.by_code.get(200, [])) / loaded.seconds}
    return out


def batch(base: str, seconds: float) -> dict:
    """Interactive rerank latency on a model with a big batch queued on it vs the same load without
    (same run, same replica). Steady: one client, 0.25 s between requests: the model never stays
    quiet for batch.quiet_s, so the batch waits. Sporadic: 2.5 s between requests: the batch runs in
    every gap and each interactive request preempts it (what that costs is this row)."""
    import httpx

    from bench.models import ensure_cross_encoder

    _deploy([cross_encoder_model(str(ensure_cross_encoder()), cpus=CORES)])
    url = f"{base}/v1/rerank"
    body = {**RERANK_BODY, "documents": RERANK_BODY["documents"][:16]}
    phases = {"steady": (0.25, 3 * seconds), "sporadic": (2.5, max(6 * seconds, 40))}

    def measure() -> dict:
        return {name: asyncio.run(run(url, body, 1, length, warmup_s=0.1, think_s=think)).summary()
                for name, (think, length) in phases.items()}

    alone = measure()
    lines = b"\n".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/rerank", "body": {
        **body, "query": f"{QUERY} ({i})"}}).encode() for i in range(20_000))
    with httpx.Client(base_url=base, timeout=120) as http:
        f = http.post("/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"}).json()
        b = http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/rerank", "completion_window": "24h"}).json()
        time.sleep(3)  # the batch is running: the model is quiet
        done = {"start": http.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"]}
        out: dict = {"alone": alone, "with_batch": {}}
        for name, (think, length) in phases.items():
            before = http.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"]
            t0 = time.time()
            out["with_batch"][name] = asyncio.run(run(url, body, 1, length, warmup_s=0.1, think_s=think)).summary()
            after = http.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"]
            done[name] = (after - before) / (time.time() - t0)
        http.post(f"/v1/batches/{b['id']}/cancel")
    out["batch_lines_per_s"] = done
    return out


def llm(base: str, seconds: float, migration: bool = True) -> dict:
    """serve_config.yaml's LLM alone, the same engine settings bare `vllm serve` gets.
    `migration=False`: streams untracked (docs/MIGRATION.md), the cost of tracking them."""
    t0 = time.time()
    _deploy([{**llm_entry(), **({} if migration else {"migration": {"enabled": False}})}])
    ready_s = time.time() - t0
    meter, code = serve_rooms()
    return {"ready_s": ready_s, "code": code, **llm_load(f"{base}/v1/chat/completions", seconds, meter)}


def serve_rooms(app: str = "bench") -> tuple[Meter, dict[str, dict]]:
    """The request path's processes of this step's own Ray cluster (the descendants of this process:
    other Ray clusters on the machine are not ours): HAProxy, the router replica, the model
    replica, what the model replica started (vLLM's engine core), and the rest of Ray (controller,
    proxy actor, raylet, GCS), our status board actor (deployments/status_board.py) and this process
    (the load generator) as background. Also, from inside each replica, where its serve_app
    and deployments were imported from: a bench of another checkout must run that checkout's code."""
    import ray

    replicas: dict[str, dict] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        prefix = f"SERVE_REPLICA::{app}#"
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix):
            handle = ray.get_actor(actor["name"], namespace="serve")
            replicas[actor["name"][len(prefix):].split("#")[0]] = ray.get(handle.__ray_call__.remote(_whoami), timeout=60)
    router = replicas["router"]["pid"]
    (model,) = (info for name, info in replicas.items() if name != "router")  # one model per scenario

    def find() -> dict[str, list]:
        table = process_table()
        ours = descendants(os.getpid(), table)
        engine = descendants(model["pid"], table)
        haproxy = [pid for pid in ours if table[pid][1] == "haproxy"]
        board = [pid for pid in ours if title(pid).startswith("ray::StatusBoard")]
        named = {router, model["pid"], *engine, *haproxy, *board}
        return {"haproxy": haproxy, "router": [router], "replica": [model["pid"]], "engine": engine,
                "status board": board, "ray": [pid for pid in ours if pid not in named], "client": [os.getpid()]}

    return Meter(find, background=("status board", "ray", "client")), replicas


def _whoami(_replica) -> dict:
    """Runs inside a replica (`__ray_call__`)."""
    import deployments
    import serve_app

    return {"pid": os.getpid(), "serve_app": serve_app.__file__, "deployments": deployments.__file__}


def _deploy(models: list[dict]) -> None:
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(app_args(models)), name="bench", route_prefix="/")


def haproxy_listeners() -> dict[str, str]:
    """Free ports for HAProxy's stats and metrics listeners: their fixed defaults (8404, 9101) are
    held by any other Serve on this machine (a `make up`, a test session), and HAProxy would
    refuse to start."""
    return {key: str(free_port()) for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", choices=["gateway", "rerank", "long-list", "overload", "llm", "batch", "routing", "migration",
                                          "autoscale"], required=True)
    p.add_argument("--scaling", choices=["tokens", "requests"], default="tokens",
                   help="autoscale: the LLM's autoscaling policy (requests: Serve's default)")
    p.add_argument("--migration", choices=["on", "off"], default="on", help="llm: streams tracked for continuation")
    p.add_argument("--kills", type=int, default=10, help="migration: replicas SIGKILLed mid-stream")
    p.add_argument("--policy", choices=POLICIES, default="cache_aware",
                   help="routing: the LLM policy (ray_prefix: Ray Serve LLM's PrefixCacheAffinityRouter, bench/peers.py)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--stories", choices=["on", "off"], default="on", help="gateway: request stories kept (serve_app/stories.py)")
    p.add_argument("--port", type=int, default=8031)
    p.add_argument("--seconds", type=float, default=8)
    args = p.parse_args()

    import ray
    from ray import serve

    if args.scenario == "batch":  # a fresh batch store, not the checkout's data/ (read by the router at start)
        import tempfile

        os.environ["SERVE_APP_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-data-")
    for key, value in haproxy_listeners().items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    base = f"http://127.0.0.1:{args.port}"
    try:
        if args.scenario == "routing":
            out = {**routing(base, args.policy), "code": serve_rooms()[1]}  # which checkout's code the replicas ran
        elif args.scenario in ("long-list", "rerank"):
            out = {"long-list": long_list, "rerank": rerank}[args.scenario](base, args.seconds, args.replicas)
        elif args.scenario == "gateway":
            out = gateway(base, args.seconds, stories=args.stories == "on")
        elif args.scenario == "llm":
            out = llm(base, args.seconds, migration=args.migration == "on")
        elif args.scenario == "migration":
            from bench.migration import migration_kills

            out = migration_kills(base, args.kills, _deploy)
        elif args.scenario == "autoscale":
            from bench.autoscale import autoscale_bursts

            out = autoscale_bursts(base, args.scaling, _deploy)
        else:
            out = {"overload": overload, "batch": batch}[args.scenario](base, args.seconds)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
