"""Mid-stream continuation, measured (docs/MIGRATION.md): two SmolLM2 replicas; a greedy stream's
replica is SIGKILLed after 20 tokens, N times; per kill, the time from the kill to the next token on
the client, beside the stream's own time between tokens before the kill."""

from __future__ import annotations

import os
import signal
import statistics
import time

import httpx

KILL_AFTER_TOKENS = 20


def migration_kills(base: str, kills: int, deploy) -> dict:
    """`deploy(models)`: bench/stack.py's deployer. Serve restarts each killed replica; the next kill
    waits for both replicas to run again."""
    from bench.workloads import llm_entry

    entry = llm_entry()
    dep = {k: v for k, v in entry["deployment"].items() if k not in ("num_replicas", "autoscaling_config")}
    deploy([{**entry, "deployment": {**dep, "num_replicas": 2}}])
    model = entry["name"]
    gaps, steps, continued, killed = [], [], 0, set()
    with httpx.Client(base_url=base, timeout=600) as http:
        for k in range(kills):
            _wait_two(http, model, killed)
            body = {"model": model, "max_tokens": 120, "temperature": 0, "stream": True,
                    "messages": [{"role": "user", "content": f"Tell me a long story about a lighthouse keeper, part {k}."}]}
            times, killed_at, victim = [], None, None
            with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": f"bench-kill-{k}"}) as r:
                victim = r.headers["x-served-replica"]
                for line in r.iter_lines():
                    if not line.startswith("data: {") or '"content":"' not in line.replace(" ", "") or '"content":""' in line:
                        continue
                    now = time.perf_counter()
                    if killed_at is not None and len(gaps) == k:
                        gaps.append((now - killed_at) * 1000)
                    times.append(now)
                    if killed_at is None and len(times) == KILL_AFTER_TOKENS:
                        steps.append(statistics.median(b - a for a, b in zip(times, times[1:])) * 1000)
                        _sigkill(model, victim)
                        killed.add(victim)
                        killed_at = time.perf_counter()
            story = http.get(f"/v1/requests/bench-kill-{k}").json()
            continued += any(m.get("outcome") == "continued" for m in story.get("migrations") or [])
            if len(gaps) == k:  # the stream ended at the kill: no next token
                gaps.append(float("nan"))
    ok = [g for g in gaps if g == g]
    return {"kills": kills, "continued": continued, "kill_to_next_token_ms": [round(g, 1) for g in gaps],
            "kill_to_next_token_p50_ms": statistics.median(ok) if ok else None,
            "inter_token_p50_ms": statistics.median(steps) if steps else None}


def _wait_two(http: httpx.Client, model: str, killed: set[str], timeout_s: float = 300) -> None:
    """Two running replicas, neither one killed before: a killed replica stays listed (and its last
    report fresh) for a moment after it died, and a stream sent to it then would measure a
    continuation with no other replica to go to."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        rows = http.get("/v1/status").json()["models"][model]["replicas"]
        live = [r for r in rows if r.get("serve_state") == "RUNNING" and r.get("state") == "reporting"]
        if len(live) == 2 and not {r["replica_id"] for r in live} & killed:
            return
        time.sleep(1)
    raise RuntimeError("two replicas were not running again in time")


def _sigkill(model: str, replica_id: str) -> None:
    """The replica's process, found in the GCS actor table (this bench started the cluster)."""
    from ray._private.state import actors

    deployment = "llm-" + model.replace(".", "_")
    name = f"SERVE_REPLICA::bench#{deployment}#{replica_id}"
    pid = next(a["Pid"] for a in actors(actor_state_name="ALIVE").values() if a["Name"] == name)
    os.kill(pid, signal.SIGKILL)
