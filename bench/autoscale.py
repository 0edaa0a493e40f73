"""LLM autoscaling, measured (docs/AUTOSCALING.md): the same bursty workload under Serve's default
policy (ongoing requests vs target_ongoing_requests) and under the token policy, each on a fresh
deployment of serve_config.yaml's LLM with min 1, max 2 replicas and the same delays.

The workload alternates what request counts get wrong both ways: a burst of many short chats (12
at a time: past Serve's default target of 8 ongoing, little prefill) and a burst of a few long
prompts (3 at a time, ~1,450 unique tokens each: under that target, all prefill), with quiet gaps.
Measured: time to first token of every request (p50, p99; and of the long prompts alone), and
replica-seconds held (every replica Serve lists, starting ones included, sampled each second).

Each replica gets one core (`OMP_NUM_THREADS=1`, threads not pinned): a replica is a unit of
compute, as a GPU replica is. With serve_config.yaml's "0-1" binding every replica would share the
same two cores, and a second replica could only slow the first (measured: docs/benchmarks.md).
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import threading
import time
import uuid

import httpx

CHAT_CLIENTS, LONG_CLIENTS = 12, 3
# A long-prompt burst lasts longer than a replica takes to start (~30-40 s on CPU), as real bursts do:
# a shorter one ends before any policy's new replica is up.
PHASES = [("chat", 30.0), ("quiet", 20.0), ("long", 90.0), ("quiet", 20.0)]
TTFT_TARGET_S = 1.0  # the token policy's target in this run (its default, 2 s, is looser than this load's TTFT)
ROUNDS = 2
FILLER = "the quick brown fox jumps over the lazy dog " * 160  # ~1,450 tokens: under max_input_tokens 2,048


def autoscale_bursts(base: str, policy: str, deploy) -> dict:
    """`deploy(models)`: bench/stack.py's deployer; `policy`: tokens | requests."""
    from bench.workloads import llm_entry
    from deployments.serve_view import replica_states

    entry = llm_entry()
    dep = {k: v for k, v in entry["deployment"].items() if k not in ("num_replicas", "autoscaling_config")}
    dep["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "policy": policy, "upscale_delay_s": 0,
                                 "downscale_delay_s": 10, "look_back_period_s": 2,
                                 **({"ttft_target_s": TTFT_TARGET_S} if policy == "tokens" else {})}
    env = dict(entry.get("engine_env") or {})
    if any(k.startswith("VLLM_CPU") for k in env):  # the CPU profile (a GPU config's replicas bring their own GPU)
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    deploy([{**entry, "engine_env": env, "deployment": dep}])
    model = entry["name"]
    deployment = "llm-" + model.replace(".", "_")
    held: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            states = replica_states("bench", deployment)  # not serve.status(): 0.7 CPU-s a call (serve_view)
            held.append(sum(n for s, n in states.items() if s != "STOPPING"))
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ttft: dict[str, list[float]] = {"chat": [], "long": []}
    errors = 0
    t0 = time.time()
    for _ in range(ROUNDS):
        for phase, seconds in PHASES:
            if phase == "quiet":
                time.sleep(seconds)
                continue
            stop = time.time() + seconds
            clients = CHAT_CLIENTS if phase == "chat" else LONG_CLIENTS

            def client(i: int, phase: str = phase, stop: float = stop) -> tuple[list[float], int]:
                got, failed = [], 0
                with httpx.Client(base_url=base, timeout=300) as c:
                    while time.time() < stop:
                        text = (f"Say hello to guest {i}." if phase == "chat" else f"{uuid.uuid4().hex} {FILLER}")
                        body = {"model": model, "max_tokens": 16 if phase == "long" else 32, "temperature": 0, "stream": True,
                                "messages": [{"role": "user", "content": text}]}
                        sent = time.perf_counter()
                        first = None
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            if r.status_code != 200:
                                failed += 1
                                r.read()
                                continue
                            for line in r.iter_lines():
                                if first is None and '"content":"' in line.replace(" ", "") and '"content":""' not in line:
                                    first = time.perf_counter()
                        if first is not None:
                            got.append((first - sent) * 1000)
                return got, failed

            with cf.ThreadPoolExecutor(clients) as pool:
                for got, failed in pool.map(client, range(clients)):
                    ttft[phase] += got
                    errors += failed
    wall = time.time() - t0
    done.set()
    sampler.join()
    every = ttft["chat"] + ttft["long"]
    from bench.stack import serve_rooms

    return {"code": serve_rooms()[1],
        "policy": policy, "wall_s": round(wall, 1), "replica_seconds": float(sum(held)), "max_replicas_held": max(held),
        "requests": len(every), "errors": errors,
        "ttft_p50_ms": _q(every, 0.5), "ttft_p99_ms": _q(every, 0.99),
        "long_ttft_p50_ms": _q(ttft["long"], 0.5), "long_ttft_p99_ms": _q(ttft["long"], 0.99),
        "chat_ttft_p99_ms": _q(ttft["chat"], 0.99), "long_requests": len(ttft["long"]),
    }


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q * 100) - 1))], 1)
