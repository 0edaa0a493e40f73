"""The LLM routing step: two SmolLM2 replicas, the same workload under each policy (issue 21).

Workload (seeded, the same for every policy): groups of conversations sharing a long prefix (a
system prompt plus a document, ~1,000 tokens), three turns each, mixed with unique prompts,
sent with a few requests in flight; then a second phase where every request shares one system
prompt and asks its own question. Measured from outside: TTFT (streamed), output tokens/s, the
share of requests per replica (x-served-replica), and vLLM's own prefix-cache hit rate on each
replica (its counters in /v1/status, before and after).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx

from bench.workloads import app_args, llm_entry

MODEL = "smollm2-135m-instruct"
WORDS = ("account billing refund invoice shipping order warranty product customer support policy return exchange "
         "delivery tracking payment card address subscription plan upgrade discount coupon store region language "
         "manual device battery screen charger cable network router firmware update reset password email").split()


def routing_model(policy: str) -> dict:
    """serve_config.yaml's LLM, two replicas, the given routing policy."""
    entry = llm_entry()
    # Replicas post vLLM's prefix counters to /v1/status with each health check (every 5 s here).
    # The probe gets 60 s: on 2 cores a saturated replica's 1-token probe waits behind ~1,000-token
    # prefills, and with 1 s checks and the default 10 s budget the first run had its replicas
    # replaced mid-phase (see docs/benchmarks.md).
    deployment = {**entry["deployment"], "num_replicas": 2, "health_check_period_s": 5, "health_check_timeout_s": 90}
    return {**entry, "deployment": deployment, "health": {"probe_timeout_s": 60},
            "routing": {"policy": policy, "stats_period_s": 1}}


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(seed: int = 0, groups: int = 6, per_group: int = 3, turns: int = 3, unique: int = 12) -> list[list[dict]]:
    """Each conversation is a list of request bodies, one per turn (each turn's body holds the
    earlier turns, with a fixed stand-in for the assistant's answers so bodies do not depend on
    what the model said)."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prefix = [{"role": "system", "content": f"Group {g}. " + _text(rng, 300)},
                  {"role": "user", "content": "Document: " + _text(rng, 600)}]
        for _ in range(per_group):
            messages, bodies = list(prefix), []
            for t in range(turns):
                messages = messages + [{"role": "user", "content": f"Question {t}: " + _text(rng, 12)}]
                bodies.append(_body(messages))
                messages = messages + [{"role": "assistant", "content": "Noted: " + _text(rng, 10)}]
            out.append(bodies)
    out += [[_body([{"role": "user", "content": _text(rng, 200)}])] for _ in range(unique)]
    rng.shuffle(out)
    return out


def shared_system(seed: int = 1, n: int = 40) -> list[list[dict]]:
    rng = random.Random(seed)
    system = {"role": "system", "content": _text(rng, 400)}
    return [[_body([system, {"role": "user", "content": f"{i}: " + _text(rng, 15)}])] for i in range(n)]


def _body(messages: list[dict]) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def _one(http: httpx.AsyncClient, body: dict) -> dict:
    """One streamed request: time to the first non-empty content (the role-only first event is
    not a token), completion tokens from vLLM's usage, the replica that served it."""
    t0 = time.perf_counter()
    ttft, tokens, replica, ok = None, 0, None, False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            replica, ok = r.headers.get("x-served-replica"), r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    ttft = time.perf_counter() - t0
                tokens = ((event.get("usage") or {}).get("completion_tokens")) or tokens
    except httpx.HTTPError:
        ok = False
    return {"ok": ok and ttft is not None, "ttft": ttft, "tokens": tokens, "replica": replica}


async def _drive(base: str, convs: list[list[dict]], concurrency: int) -> tuple[list[dict], float]:
    """Conversations run concurrently (`concurrency` at a time), turns of one in order."""
    queue = list(convs)
    results: list[dict] = []

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            for body in queue.pop():
                results.append(await _one(http, body))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def _hits(base: str) -> dict[str, tuple[int, int]]:
    rows = httpx.get(f"{base}/v1/status", timeout=30).json()["models"][MODEL]["replicas"]
    return {r["replica_id"]: ((r.get("prefix_cache") or {}).get("queried_tokens", 0), (r.get("prefix_cache") or {}).get("hit_tokens", 0))
            for r in rows}


def _phase(base: str, convs: list[list[dict]], concurrency: int) -> dict:
    before = _hits(base)
    results, wall = asyncio.run(_drive(base, convs, concurrency))
    time.sleep(7)  # replicas post vLLM's counters with each health check (every 5 s)
    after = _hits(base)
    queried = sum(after[r][0] - before.get(r, (0, 0))[0] for r in after)
    hit = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    ttfts = sorted(x["ttft"] for x in results if x["ok"]) or [float("nan")]
    share: dict[str, int] = {}
    for x in results:
        share[x["replica"]] = share.get(x["replica"], 0) + 1
    return {
        "requests": len(results), "failed": sum(not x["ok"] for x in results),
        "vllm_hit_rate": round(hit / queried, 3) if queried else None,
        "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3),
        "output_tokens_per_s": round(sum(x["tokens"] for x in results) / wall, 2),
        "max_replica_share": round(max(share.values()) / len(results), 3), "wall_s": round(wall, 1),
    }


def routing(base: str, policy: str) -> dict:
    from ray import serve

    from serve_app.app import build_app

    t0 = time.time()
    serve.run(build_app(app_args([routing_model(policy)])), name="bench", route_prefix="/")
    ready_s = time.time() - t0
    time.sleep(3)  # first load reports
    return {"ready_s": round(ready_s, 1), "policy": policy,
            "conversations": _phase(base, conversations(), concurrency=4),
            "shared_system_prompt": _phase(base, shared_system(), concurrency=4)}
