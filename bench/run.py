"""`python -m bench.run`: measure the stack against baselines from the same run, print ratios.

Each configuration runs in its own subprocess (Serve reads its proxy choice at start), one after
another on this machine, so the numbers are comparable with each other and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

STEPS = [
    ("uvicorn", "plain uvicorn, same handler (baseline)", ["bench.baselines", "uvicorn"], {}),
    ("serve-default", "full stack, Serve's default proxy", ["bench.stack", "--scenario", "gateway"], {"RAY_SERVE_ENABLE_HA_PROXY": "0"}),
    ("serve-haproxy", "full stack, Serve's HAProxy ingress", ["bench.stack", "--scenario", "gateway"], {"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
    ("raw-rerank", "MiniLM in-process, batch 32 (baseline)", ["bench.baselines", "raw-rerank"], {}),
    ("http-rerank", "MiniLM through the stack (HAProxy), 32 docs/request, c=8", ["bench.stack", "--scenario", "rerank"],
     {"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--only", nargs="*", help="step names to run")
    args = p.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    results: dict[str, dict] = {}
    for name, what, cmd, extra in STEPS:
        if args.only and name not in args.only:
            continue
        print(f"[bench] {name}: {what} ...", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", *cmd, "--seconds", str(args.seconds)], env={**env, **extra},
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[bench] {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        print(f"[bench] {name}: done in {time.time() - t0:.0f}s", flush=True)
    os.makedirs("bench/results", exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    with open(f"bench/results/{stamp}.json", "w") as f:
        json.dump({"machine": _machine(), "results": results}, f, indent=2)
    print(table(results))


def table(r: dict[str, dict]) -> str:
    rows = [f"machine: {_machine()}", "", "| measure | value | baseline | ratio |", "|---|---|---|---|"]
    base = r.get("uvicorn")
    for name in ("serve-default", "serve-haproxy"):
        if name in r and base:
            for c in ("c1", "c32"):
                s, b = r[name][c], base[c]
                rows.append(f"| {name} req/s at {c} | {s['rps']:.0f} | {b['rps']:.0f} (uvicorn) | {s['rps'] / b['rps']:.3f}x |")
                rows.append(f"| {name} p50 at {c} | {s['p50']:.2f} ms | {b['p50']:.2f} ms | +{s['p50'] - b['p50']:.2f} ms |")
                rows.append(f"| {name} p99 at {c} | {s['p99']:.2f} ms | {b['p99']:.2f} ms | {s['p99'] / b['p99']:.2f}x |")
    if "http-rerank" in r and "raw-rerank" in r:
        s, b = r["http-rerank"]["http"], r["raw-rerank"]
        rows.append(f"| rerank pairs/s through HTTP | {s['pairs_per_s']:.0f} | {b['pairs_per_s']:.0f} (raw model) | {s['pairs_per_s'] / b['pairs_per_s']:.3f}x |")
    return "\n".join(rows)


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
