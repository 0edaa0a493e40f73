"""The LLM routing step: two SmolLM2 replicas, the same workload under each policy (issue 21).

Workload (seeded, the same for every policy): groups of conversations sharing a long prefix (a
system prompt plus a document, ~1,100 tokens), three turns each, mixed with unique prompts,
sent with a few requests in flight; then a second phase where every request shares one system
prompt and asks its own question. Each replica's KV cache holds 6,144 tokens (192 blocks of 32):
about three of the twelve group prefixes beside the requests in flight, so a policy that spreads
every group over both replicas makes vLLM evict prefixes it will need again. (The first run gave
10,240 tokens: Serve's default already reached a 0.67 hit rate against ~0.78 at best.)
`BENCH_ROUTING_KV_BLOCKS=96` halves it, for the eviction-heavy runs 3 and 4 (docs/benchmarks.md).

Measured from outside: TTFT (streamed), output tokens/s, the share of requests per replica, and
vLLM's own prefix-cache hit rate on each replica (its counters, before and after): through our
/v1/status for the stack's policies, from each `vllm serve`'s /metrics for vllm-router.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Callable

import httpx

from bench.workloads import app_args, llm_entry

MODEL = "smollm2-135m-instruct"
WORDS = ("account billing refund invoice shipping order warranty product customer support policy return exchange "
         "delivery tracking payment card address subscription plan upgrade discount coupon store region language "
         "manual device battery screen charger cable network router firmware update reset password email").split()


# Every policy's engines, ours and bare `vllm serve` alike: a KV cache small enough to evict.
# BENCH_ROUTING_KV_BLOCKS=96 (3,072 tokens, under three group prefixes) is the eviction-heavy run.
ENGINE = {"block_size": 32, "num_gpu_blocks_override": int(os.environ.get("BENCH_ROUTING_KV_BLOCKS", "192"))}
POLICIES = ("power_of_two", "cache_aware", "ray_prefix")  # ray_prefix: Ray Serve LLM's router (bench/peers.py)
Counters = dict[str, dict[str, int]]  # replica -> {"queried", "hit", "requests"}


def routing_entry() -> dict:
    """serve_config.yaml's LLM with the bench's KV cache: what every policy's engines run."""
    entry = llm_entry()
    return {**entry, "engine_kwargs": {**entry.get("engine_kwargs", {}), **ENGINE}}


def routing_model(policy: str) -> dict:
    """The bench's LLM, two replicas, the given routing policy (Ray's router rides on `cache_aware`'s
    request-router slot: see routing())."""
    entry = routing_entry()
    # Replicas post vLLM's prefix counters to /v1/status with each health check (every 5 s here).
    # The probe gets 60 s: on 2 cores a saturated replica's 1-token probe waits behind ~1,000-token
    # prefills, and with 1 s checks and the default 10 s budget the first run had its replicas
    # replaced mid-phase (see docs/benchmarks.md).
    deployment = {**entry["deployment"], "num_replicas": 2, "health_check_period_s": 5, "health_check_timeout_s": 90}
    return {**entry, "deployment": deployment, "health": {"probe_timeout_s": 60},
            "routing": {"policy": "cache_aware" if policy == "ray_prefix" else policy, "stats_period_s": 1}}


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(seed: int = 0, groups: int = 12, per_group: int = 2, turns: int = 3, unique: int = 12) -> list[list[dict]]:
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


def stack_counters(base: str) -> Counters:
    """vLLM's prefix counters of each replica, as our replicas post them to /v1/status."""
    rows = httpx.get(f"{base}/v1/status", timeout=30).json()["models"][MODEL]["replicas"]
    return {r["replica_id"]: {"queried": (r.get("prefix_cache") or {}).get("queried_tokens", 0),
                              "hit": (r.get("prefix_cache") or {}).get("hit_tokens", 0), "requests": 0}
            for r in rows}


def phase(base: str, convs: list[list[dict]], concurrency: int, counters: Callable[[], Counters], settle_s: float = 7) -> dict:
    """One phase against `base`. The share per replica comes from x-served-replica where the
    server names it (ours), else from each engine's finished-request counter (vllm-router)."""
    before = counters()
    results, wall = asyncio.run(_drive(base, convs, concurrency))
    time.sleep(settle_s)  # our replicas post vLLM's counters with each health check (every 5 s)
    after = counters()
    delta = {r: {k: after[r][k] - before.get(r, {}).get(k, 0) for k in after[r]} for r in after}
    queried, hit = sum(d["queried"] for d in delta.values()), sum(d["hit"] for d in delta.values())
    ttfts = sorted(x["ttft"] for x in results if x["ok"]) or [float("nan")]
    share: dict[str, int] = {}
    for x in results:
        if x["replica"]:
            share[x["replica"]] = share.get(x["replica"], 0) + 1
    if not share:
        share = {r: d["requests"] for r, d in delta.items()}
    return {
        "requests": len(results), "failed": sum(not x["ok"] for x in results),
        "vllm_hit_rate": round(hit / queried, 3) if queried else None,
        "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3),
        "output_tokens_per_s": round(sum(x["tokens"] for x in results) / wall, 2),
        "max_replica_share": round(max(share.values()) / max(1, sum(share.values())), 3), "wall_s": round(wall, 1),
    }


def run_phases(base: str, counters: Callable[[], Counters], settle_s: float = 7) -> dict:
    return {"conversations": phase(base, conversations(), 4, counters, settle_s),
            "shared_system_prompt": phase(base, shared_system(), 4, counters, settle_s)}


def routing(base: str, policy: str) -> dict:
    from ray import serve

    import serve_app.app
    from serve_app.app import build_app

    if policy == "ray_prefix":
        # Ray's router in the slot our cost-aware router takes, with Ray Serve LLM's defaults.
        from bench.peers import RAY_PREFIX_ROUTER

        serve_app.app.llm_request_router = lambda model: {"request_router_class": RAY_PREFIX_ROUTER}
    t0 = time.time()
    serve.run(build_app(app_args([routing_model(policy)])), name="bench", route_prefix="/")
    ready_s = time.time() - t0
    time.sleep(3)  # first load reports
    return {"ready_s": round(ready_s, 1), "policy": policy, "kv_blocks": ENGINE["num_gpu_blocks_override"],
            **run_phases(base, lambda: stack_counters(base))}
