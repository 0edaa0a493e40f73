"""Runs one Serve configuration in this process and measures it (called by bench/run.py in a
subprocess per configuration, because the proxy choice is read when Serve starts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.load import run  # noqa: E402
from deployments.protocol import ModelCard, RerankResult, ReplicaInfo  # noqa: E402

NULL_BODY = {"model": "null", "query": "q", "documents": ["a"]}


class NullReranker:
    """The trivial backend: answers at once, so what is measured is the stack around it."""

    def __init__(self) -> None:
        self.replica = ReplicaInfo("null", "null-replica", "node", "127.0.0.1")

    async def rerank(self, req):
        return RerankResult([0.0] * len(req.documents), len(req.documents), 0, self.replica)

    async def card(self):
        return ModelCard("null", "rerank", "transformers", 512, self.replica)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", choices=["gateway", "rerank"], required=True)
    p.add_argument("--port", type=int, default=8031)
    p.add_argument("--seconds", type=float, default=8)
    args = p.parse_args()

    import ray
    import yaml
    from ray import serve

    from serve_app.config import parse_app_config
    from serve_app.router import Ingress

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    out: dict = {}
    if args.scenario == "gateway":
        cfg = parse_app_config({"models": [{"name": "null", "kind": "rerank", "engine": "transformers", "source": "org/null",
                                            "deployment": {"max_ongoing_requests": 256, "max_queued_requests": -1}}]})
        null = serve.deployment(NullReranker).options(name="null", max_ongoing_requests=256).bind()
        router = serve.deployment(Ingress).options(name="router", max_ongoing_requests=256)
        serve.run(router.bind(cfg.gateway, cfg.models, {"null": null}), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}/v1/rerank"
        for c in (1, 32):
            r = asyncio.run(run(url, NULL_BODY, c, args.seconds))
            out[f"c{c}"] = {"rps": r.rps, "p50": r.pct(0.5), "p99": r.pct(0.99), "codes": r.codes}
    else:
        from serve_app.app import build_app

        app_args = yaml.safe_load(open("serve_config.yaml"))["applications"][0]["args"]
        app_args["models"] = [m for m in app_args["models"] if m["kind"] == "rerank"]
        serve.run(build_app(app_args), name="bench", route_prefix="/")
        model = app_args["models"][0]["name"]
        docs = [f"Document {i} talks about the capital city of a European country." for i in range(32)]
        body = {"model": model, "query": "What is the capital of France?", "documents": docs, "return_documents": False}
        r = asyncio.run(run(f"http://127.0.0.1:{args.port}/v1/rerank", body, 8, args.seconds))
        out["http"] = {"pairs_per_s": r.rps * len(docs), "p50": r.pct(0.5), "p99": r.pct(0.99), "codes": r.codes}
    serve.shutdown()
    ray.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
