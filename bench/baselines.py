"""Baselines measured in the same run: the same handler on plain uvicorn, and the raw model."""

from __future__ import annotations

import argparse
import asyncio
import json
import time


def uvicorn_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def rerank(request: Request):
        body = await request.json()
        scores = [0.0] * len(body["documents"])
        return JSONResponse({"id": "x", "model": body["model"], "results": [{"index": i, "relevance_score": s} for i, s in enumerate(scores)],
                             "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    return Starlette(routes=[Route("/v1/rerank", rerank, methods=["POST"])])


def raw_rerank(seconds: float) -> dict:
    """MiniLM bi-encoder in-process, batches of 32 pairs, as the replica runs it."""
    import pathlib

    from deployments.engines.transformers_encoder import TransformersEncoder
    from serve_app.config import ModelConfig, RerankMode

    cfg = ModelConfig.model_validate({"name": "m", "kind": "rerank", "engine": "transformers", "rerank_mode": "bi_encoder",
                                      "source": "prepared:all-minilm-l6-v2", "max_input_tokens": 256})
    path = str(pathlib.Path("models") / "all-minilm-l6-v2")
    enc = TransformersEncoder(cfg, path, mode=RerankMode.bi_encoder)
    pairs = [("What is the capital of France?", f"Document {i} talks about the capital city of a European country.") for i in range(32)]
    enc.score_pairs(pairs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.score_pairs(pairs)
        n += len(pairs)
    return {"pairs_per_s": n / (time.perf_counter() - t0)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["uvicorn", "raw-rerank"])
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--seconds", type=float, default=8)
    args = p.parse_args()
    if args.what == "raw-rerank":
        print("RESULT " + json.dumps(raw_rerank(args.seconds)), flush=True)
        return
    import threading

    import uvicorn

    from bench.load import run

    server = uvicorn.Server(uvicorn.Config(uvicorn_app(), host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    out = {}
    body = {"model": "null", "query": "q", "documents": ["a"]}
    for c in (1, 32):
        r = asyncio.run(run(f"http://127.0.0.1:{args.port}/v1/rerank", body, c, args.seconds))
        out[f"c{c}"] = {"rps": r.rps, "p50": r.pct(0.5), "p99": r.pct(0.99), "codes": r.codes}
    server.should_exit = True
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
