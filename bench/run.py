"""`python -m bench.run`: measure the stack against baselines from the same run, print ratios.

Each step runs in its own subprocess (Serve reads its ingress choice when it starts), one after
another on this machine, so the numbers are comparable with each other and nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

from serve_app.ray_env import LOCAL_ENV, SERVE_ENV

# The ingress steps switch off, one at a time, what serve_app/ray_env.py turns on.
PLAIN = {**SERVE_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
HAPROXY_ONLY = {**SERVE_ENV, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
STEPS = [
    ("uvicorn", "plain uvicorn, same trivial handler (baseline)", ["bench.baselines", "uvicorn"], {}),
    ("serve-default", "full stack, trivial backend, Serve's defaults (Python proxy)", ["bench.stack", "--scenario", "gateway"], PLAIN),
    ("serve-haproxy", "full stack, trivial backend, HAProxy ingress", ["bench.stack", "--scenario", "gateway"], HAPROXY_ONLY),
    ("serve-ours", "full stack, trivial backend, as shipped: HAProxy + throughput profile", ["bench.stack", "--scenario", "gateway"], SERVE_ENV),
    ("serve-ours-logbuf", "as shipped, but request logs buffered (Serve's throughput default)", ["bench.stack", "--scenario", "gateway"],
     {**SERVE_ENV, "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}),
    ("raw-rerank", "MiniLM-size cross-encoder in-process, best batch (baseline)", ["bench.baselines", "raw-rerank"], {}),
    ("http-rerank-1", "the same model through the stack, one replica with every core, 32 docs/request, c=8",
     ["bench.stack", "--scenario", "rerank", "--replicas", "1"], SERVE_ENV),
    ("http-rerank", "the same model through the stack, one single-threaded replica per core, 32 docs/request, c=8",
     ["bench.stack", "--scenario", "rerank", "--replicas", str(os.cpu_count() or 1)], SERVE_ENV),
    ("infinity", "the same model on Infinity, 32 docs/request, c=8", ["bench.baselines", "infinity"], {}),
    ("long-list-1", "1,000-document rerank, one replica", ["bench.stack", "--scenario", "long-list", "--replicas", "1"], SERVE_ENV),
    ("long-list-2", "1,000-document rerank, two replicas", ["bench.stack", "--scenario", "long-list", "--replicas", "2"], SERVE_ENV),
    ("overload", "rerank at 3x capacity vs unloaded", ["bench.stack", "--scenario", "overload"], SERVE_ENV),
    ("batch", "interactive rerank p99 with a 20,000-line batch on the same model vs without (same run)",
     ["bench.stack", "--scenario", "batch"], SERVE_ENV),
    ("vllm-serve", "bare `vllm serve`, SmolLM2 (baseline)", ["bench.baselines", "vllm-serve"], {}),
    ("llm-stack", "SmolLM2 through the stack", ["bench.stack", "--scenario", "llm"], SERVE_ENV),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8, help="measured seconds per load level")
    p.add_argument("--only", nargs="*", choices=[s[0] for s in STEPS], help="steps to run (default: all)")
    args = p.parse_args()
    results: dict[str, dict] = {}
    steps = [s for s in STEPS if not args.only or s[0] in args.only]
    for i, (name, what, cmd, extra) in enumerate(steps, 1):
        print(f"[bench {i}/{len(steps)}] {name}: {what} ...", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", *cmd, "--seconds", str(args.seconds)],
                              env={**os.environ, **LOCAL_ENV, **extra}, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[bench] {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        print(f"[bench {i}/{len(steps)}] {name}: done in {time.time() - t0:.0f}s", flush=True)
    os.makedirs("bench/results", exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    with open(f"bench/results/{stamp}.json", "w") as f:
        json.dump({"machine": _machine(), "seconds": args.seconds, "results": results}, f, indent=2)
    print(table(results))


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def table(r: dict[str, dict]) -> str:
    rows = [f"machine: {_machine()}", "", "| measure | value | baseline | ratio |", "|---|---|---|---|"]
    add = rows.append
    if base := r.get("uvicorn"):
        for name in ("serve-default", "serve-haproxy", "serve-ours", "serve-ours-logbuf"):
            for c in ("c1", "c32") if name in r else ():
                s, b = r[name][c], base[c]
                add(f"| {name}: req/s at {c} | {s['rps']:,.0f} | {b['rps']:,.0f} (uvicorn) | {_x(s['rps'], b['rps'])} |")
                add(f"| {name}: p50 at {c} | {s['p50']:.2f} ms | {b['p50']:.2f} ms | +{s['p50'] - b['p50']:.2f} ms |")
                add(f"| {name}: p99 at {c} | {s['p99']:.2f} ms | {b['p99']:.2f} ms | {_x(s['p99'], b['p99'])} |")
    raw = r.get("raw-rerank")
    for name, label in (("http-rerank-1", "stack, one replica x all cores"), ("http-rerank", "stack, one replica per core"), ("infinity", "Infinity")):
        if name in r and raw:
            v = r[name]["pairs_per_s"]
            add(f"| rerank pairs/s, {label} | {v:,.0f} | {raw['pairs_per_s']:,.0f} (raw, batch {raw['best_batch']}) | {_x(v, raw['pairs_per_s'])} |")
    if "http-rerank" in r and "infinity" in r:
        add(f"| rerank pairs/s, stack vs Infinity | {r['http-rerank']['pairs_per_s']:,.0f} | {r['infinity']['pairs_per_s']:,.0f} (Infinity) "
            f"| {_x(r['http-rerank']['pairs_per_s'], r['infinity']['pairs_per_s'])} |")
    if "long-list-1" in r and "long-list-2" in r:
        one, two = r["long-list-1"], r["long-list-2"]
        add(f"| 1,000-doc rerank, two replicas: docs/s | {two['docs_per_s']:,.0f} | {one['docs_per_s']:,.0f} (one replica) | {_x(two['docs_per_s'], one['docs_per_s'])} |")
        add(f"| 1,000-doc rerank, two replicas: p50 | {two['p50']:,.0f} ms | {one['p50']:,.0f} ms | {_x(two['p50'], one['p50'])} |")
    if o := r.get("overload"):
        u = o["unloaded"]
        add(f"| overload 3x, unloaded reference | {u['rps']:.1f} req/s | p50 {u['p50']:.1f} ms, p99 {u['p99']:.1f} ms | |")
        for name, label in (("storm", "clients resend at once"), ("sdk", "clients wait Retry-After")):
            lo = o[name]
            add(f"| overload 3x ({label}): admitted p99 | {lo['admitted_p99']:.1f} ms | {u['p99']:.1f} ms (unloaded) | {_x(lo['admitted_p99'], u['p99'])} |")
            add(f"| overload 3x ({label}): admitted req/s | {lo['admitted_per_s']:.1f} | {u['rps']:.1f} (unloaded, c=1) | {_x(lo['admitted_per_s'], u['rps'])} |")
            add(f"| overload 3x ({label}): rejection p50 / p99 | {lo['rejected_p50']:.1f} / {lo['rejected_p99']:.1f} ms | | |")
            add(f"| overload 3x ({label}): status codes | {lo['codes']} | | |")
    if b := r.get("batch"):
        for name, label in (("steady", "steady, 0.25 s between requests"), ("sporadic", "sporadic, 2.5 s between: each preempts the batch")):
            a, w = b["alone"][name], b["with_batch"][name]
            add(f"| interactive rerank p99 with a batch running ({label}) | {w['p99']:.1f} ms | {a['p99']:.1f} ms (no batch) | {_x(w['p99'], a['p99'])} |")
            add(f"| interactive rerank p50 with a batch running ({label}) | {w['p50']:.1f} ms | {a['p50']:.1f} ms (no batch) | {_x(w['p50'], a['p50'])} |")
            add(f"| batch lines/s meanwhile ({name}) | {b['batch_lines_per_s'][name]:.1f} | | |")
        add(f"| batch lines done in the first 3 s on the quiet model | {b['batch_lines_per_s']['start']} | | |")
    if "vllm-serve" in r and "llm-stack" in r:
        v, s = r["vllm-serve"], r["llm-stack"]
        for c in ("c1", "c8"):
            add(f"| LLM tokens/s at {c} | {s[c]['tokens_per_s']:.1f} | {v[c]['tokens_per_s']:.1f} (vllm serve) | {_x(s[c]['tokens_per_s'], v[c]['tokens_per_s'])} |")
            add(f"| LLM TTFT p50 at {c} | {s[c]['ttft_p50']:.0f} ms | {v[c]['ttft_p50']:.0f} ms | +{s[c]['ttft_p50'] - v[c]['ttft_p50']:.0f} ms |")
        add(f"| LLM ready after start | {s['ready_s']:.0f} s | {v['ready_s']:.0f} s | {_x(s['ready_s'], v['ready_s'])} |")
    return "\n".join(rows)


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
