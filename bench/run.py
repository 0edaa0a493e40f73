"""`python -m bench.run`: measure the stack against baselines from the same run, print ratios.

Each step runs in its own subprocess (Serve reads its ingress choice when it starts), one after
another on this machine, so the numbers are comparable with each other and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench.stack import haproxy_listeners
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
    ("serve-ours-nostories", "as shipped, but no request stories kept (gateway.stories.enabled: false)",
     ["bench.stack", "--scenario", "gateway", "--stories", "off"], SERVE_ENV),
    ("stories-memory", "request stories: memory of 10,000 kept (tracemalloc, no Serve)", ["bench.stories"], {}),
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
    ("llm-stack-nomigration", "the same, streams not tracked for continuation (migration.enabled: false)",
     ["bench.stack", "--scenario", "llm", "--migration", "off"], SERVE_ENV),
    ("migration-kills", "two SmolLM2 replicas; the serving one SIGKILLed 20 tokens into a stream, 10 times",
     ["bench.stack", "--scenario", "migration"], SERVE_ENV),
    ("autoscale-requests", "SmolLM2 min 1 max 2, bursts of short chats and of long prompts, Serve's default policy (baseline)",
     ["bench.stack", "--scenario", "autoscale", "--scaling", "requests"], SERVE_ENV),
    ("autoscale-tokens", "the same, our token policy (docs/AUTOSCALING.md)",
     ["bench.stack", "--scenario", "autoscale", "--scaling", "tokens"], SERVE_ENV),
    ("routing-default", "two SmolLM2 replicas, shared-prefix conversations, Serve's default router (baseline)",
     ["bench.stack", "--scenario", "routing", "--policy", "power_of_two"], SERVE_ENV),
    ("routing-ours", "the same, our cost-aware router", ["bench.stack", "--scenario", "routing", "--policy", "cache_aware"], SERVE_ENV),
    ("routing-ray-prefix", "the same, Ray Serve LLM's PrefixCacheAffinityRouter in our stack",
     ["bench.stack", "--scenario", "routing", "--policy", "ray_prefix"], SERVE_ENV),
    ("routing-vllm-router", "the same engines as two bare `vllm serve` behind vllm-router --policy cache_aware",
     ["bench.baselines", "vllm-router"], {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8, help="measured seconds per load level")
    p.add_argument("--only", nargs="*", choices=[s[0] for s in STEPS], help="steps to run (default: all)")
    p.add_argument("--baseline-rev", metavar="REV",
                   help="also run every stack step on git revision REV (a temporary worktree, removed after), next to "
                        "the same step on this checkout: rows STEP@REV, and ratios of this checkout vs REV")
    p.add_argument("--step-timeout", type=float, default=1800, metavar="S",
                   help="end a step (and every process it started) that runs longer than this")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run everything N times (a step and its STEP@REV in turn first) and table the median of each figure")
    args = p.parse_args()
    steps = [s for s in STEPS if not args.only or s[0] in args.only]
    here = pathlib.Path.cwd().resolve()
    runs: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        plan = [(name, what, cmd, extra, here) for name, what, cmd, extra in steps]
        if args.baseline_rev:
            rev, tree = stack.enter_context(worktree(args.baseline_rev))
        for round_ in range(args.repeat):
            if args.repeat > 1:
                print(f"[bench] round {round_ + 1}/{args.repeat}", flush=True)
            this = with_revision(plan, rev, tree, rev_first=round_ % 2 == 0) if args.baseline_rev else plan
            for name, result in run_steps(this, args.seconds, args.step_timeout).items():
                runs.setdefault(name, []).append(result)
    results = {name: merge_runs(rs) | {"runs": len(rs)} for name, rs in runs.items()}
    os.makedirs("bench/results", exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    with open(f"bench/results/{stamp}.json", "w") as f:
        json.dump({"machine": _machine(), "seconds": args.seconds, "baseline_rev": args.baseline_rev, "results": results,
                   "runs": runs if args.repeat > 1 else None}, f, indent=2)
    print(table(results))


def merge_runs(runs: list[Any]) -> Any:
    """Several runs of one step as one: the median of each number over the runs that have it, the
    first run's value of anything else."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: merge_runs([r[key] for r in runs if isinstance(r, dict) and key in r]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(isinstance(r, (int, float)) for r in runs):
        return statistics.median(runs)
    return first


Step = tuple[str, str, list[str], dict[str, str], pathlib.Path]  # name, what, module + args, env, checkout


def with_revision(plan: list[Step], rev: str, tree: pathlib.Path, rev_first: bool = True) -> list[Step]:
    """Each stack step also as `STEP@rev` on the other checkout, next to it (so both see the
    machine in the same state; --repeat alternates which goes first). Baselines run once: they
    hold none of our code."""
    out: list[Step] = []
    for name, what, cmd, extra, root in plan:
        pair = [(name, what, cmd, extra, root)]
        if cmd[0] == "bench.stack":
            other = (f"{name}@{rev}", f"{what}, at {rev}", cmd, extra, tree)
            pair = [other, *pair] if rev_first else [*pair, other]
        out += pair
    return out


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[tuple[str, pathlib.Path]]:
    """A detached `git worktree` of REV in a temporary directory, sharing this checkout's prepared
    models; removed afterwards."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], check=True, capture_output=True, text=True).stdout.strip()
    tree = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{short}-")).resolve()
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), short], check=True, capture_output=True)
    try:
        for shared in ("models", ".bench-venvs"):
            if pathlib.Path(shared).exists() and not (tree / shared).exists():
                (tree / shared).symlink_to(pathlib.Path(shared).resolve())
        yield short, tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


def run_steps(plan: list[Step], seconds: float, timeout_s: float = 1800) -> dict[str, dict]:
    """Each step in its own process, run from its checkout (`python -m` puts the working directory
    first on sys.path, and Ray hands the driver's sys.path to its workers), with that checkout
    first on PYTHONPATH too, ahead of the editable install's finder."""
    results: dict[str, dict] = {}
    for i, (name, what, cmd, extra, root) in enumerate(plan, 1):
        print(f"[bench {i}/{len(plan)}] {name}: {what} ...", flush=True)
        t0 = time.time()
        path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
        # HAProxy's listeners here, not in the step: another checkout's bench may not move them.
        env = {**haproxy_listeners(), **os.environ, **LOCAL_ENV, **extra, "PYTHONPATH": path}
        stdout, stderr = _run_step([sys.executable, "-m", *cmd, "--seconds", str(seconds)], root, env, timeout_s)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[bench] {name} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}", file=sys.stderr)
            continue
        result = json.loads(line[len("RESULT "):])
        if wrong := foreign_code(result.get("code", {}), root):
            print(f"[bench] {name} dropped: its replicas ran another checkout's code: {'; '.join(wrong)}", file=sys.stderr)
            continue
        if "code" not in result and cmd[0] == "bench.stack":
            print(f"[bench] {name}: not checked which code its replicas ran (that revision's bench does not report it)", file=sys.stderr)
        results[name] = result
        print(f"[bench {i}/{len(plan)}] {name}: done in {time.time() - t0:.0f}s", flush=True)
    return results


def _run_step(argv: list[str], root: pathlib.Path, env: dict[str, str], timeout_s: float) -> tuple[str, str]:
    """One step in its own session, so that a step that hangs (a Ray head that never comes up on a
    swamped machine) is ended with everything it started: Ray's processes, vLLM's, HAProxy."""
    proc = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stdout = stderr = ""
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                stdout, stderr = proc.communicate(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                stdout, stderr = "", ""
        return stdout or "", f"{stderr or ''}\n[bench] ended after {timeout_s:.0f}s"


def foreign_code(code: dict[str, dict[str, str]], root: pathlib.Path) -> list[str]:
    """What each replica imported (bench/stack.py asks it) that is not from `root`."""
    root = pathlib.Path(root).resolve()
    return [f"{replica}: {module} from {path}" for replica, where in sorted(code.items()) for module, path in sorted(where.items())
            if module != "pid" and not pathlib.Path(path).resolve().is_relative_to(root)]


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def _plus(a: float, b: float, unit: str = "ms", digits: int = 2) -> str:
    return f"{a - b:+.{digits}f} {unit}"


# Rooms (bench/rooms.py) in table order: the path from the client inwards, then the background.
ROOMS = ("haproxy", "router", "replica", "api server", "engine", "sum", "status board", "ray", "client", "uvicorn")
ROOM_LABELS = {"haproxy": "HAProxy", "router": "router replica", "replica": "model replica", "api server": "API server",
               "engine": "engine core", "sum": "all rooms on the path", "status board": "status board actor (background)",
               "ray": "rest of Ray (background)",
               "client": "load generator (background)", "uvicorn": "uvicorn server thread"}
# The LLM rows pair each of our rooms with bare `vllm serve`'s room that does the same job.
LLM_ROOMS = (("haproxy", None, "HAProxy"), ("router", None, "router replica"),
             ("replica", "api server", "serving layer (LLM replica vs vllm serve's API server)"),
             ("engine", "engine", "engine core"), ("sum", "sum", "all rooms on the path"),
             ("status board", None, "status board actor (ours, off the path)"), ("ray", None, "rest of Ray (off the path)"))


def variants(r: dict[str, dict], name: str) -> list[str]:
    """`name` and its runs on other revisions (`name@REV`, bench.run --baseline-rev), those first."""
    return sorted((k for k in r if k.startswith(name + "@")), key=str) + ([name] if name in r else [])


def _cpu(level: dict) -> dict:
    """The figures a CPU row shows: net of each room's idle use where the step measured it."""
    cpu = level.get("cpu") or {}
    return cpu.get("net") or cpu


def cpu_cell(level: dict, room: str) -> str:
    """'ms per request, µs per streamed token' of one room at one load level (net of idle, with the
    raw figure beside it, where the step measured the room idle), or '' if unmeasured."""
    cpu, raw = _cpu(level), level.get("cpu") or {}
    if room not in cpu.get("ms_per_request", {}):
        return ""
    cell = f"{cpu['ms_per_request'][room]:.2f} ms/req"
    if room in cpu.get("us_per_token", {}):
        cell += f", {cpu['us_per_token'][room]:,.0f} µs/token"
    if cpu is not raw:
        cell += f" net of idle (raw {raw['ms_per_request'][room]:.2f})"
    return cell


def cpu_ratio(level: dict, base: dict, room: str, base_room: str) -> str:
    """Per streamed token where both streamed, else per request; net of idle where both are."""
    a, b = _cpu(level), _cpu(base)
    if ("net" in (level.get("cpu") or {})) != ("net" in (base.get("cpu") or {})):
        a, b = level.get("cpu") or {}, base.get("cpu") or {}  # compare like with like
    for unit in ("us_per_token", "ms_per_request"):
        if room in a.get(unit, {}) and base_room in b.get(unit, {}):
            return _x(a[unit][room], b[unit][base_room])
    return "n/a"


def meter_cost(step: dict) -> str:
    """What reading the rooms at both ends of each window took, against the windows' length."""
    levels = [v["cpu"] for v in step.values() if isinstance(v, dict) and (v.get("cpu") or {}).get("meter_ms") is not None]
    if not levels:
        return ""
    own, window = sum(c["meter_ms"] for c in levels), sum(c["window_s"] for c in levels)
    return f"{own / len(levels):.1f} ms per load level ({own / 10 / window:.2f}% of the measured time)"


def idle_cell(step: dict, room: str) -> str:
    rate = ((step.get("idle_cpu") or {}).get("ms_per_s") or {})
    if room == "sum":
        return ""
    return f"{rate[room]:.1f} ms/s" if room in rate else ""


def compare_rows(name: str, rev: str, now: dict, before: dict) -> list[str]:
    """This checkout's run of a step against the same step on `rev` (same bench run)."""
    rows, label = [], f"{name} now vs @{rev}"
    for key in ("pairs_per_s", "docs_per_s", "ready_s"):
        if key in now and key in before:
            rows.append(f"| {label}: {key} | {now[key]:,.1f} | {before[key]:,.1f} | {_x(now[key], before[key])} |")
    for level in (k for k, v in now.items() if isinstance(v, dict) and "rps" in v and isinstance(before.get(k), dict)):
        a, b = now[level], before[level]
        if "tokens_per_s" in a and "tokens_per_s" in b:
            rows.append(f"| {label}: tokens/s at {level} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {_x(a['tokens_per_s'], b['tokens_per_s'])} |")
            rows.append(f"| {label}: TTFT p50 at {level} | {a['ttft_p50']:.0f} ms | {b['ttft_p50']:.0f} ms | {_plus(a['ttft_p50'], b['ttft_p50'], digits=0)} |")
        else:
            rows.append(f"| {label}: req/s at {level} | {a['rps']:,.0f} | {b['rps']:,.0f} | {_x(a['rps'], b['rps'])} |")
            rows.append(f"| {label}: p50 at {level} | {a['p50']:.2f} ms | {b['p50']:.2f} ms | {_plus(a['p50'], b['p50'])} |")
        for room in ROOMS:
            if cpu_cell(a, room) and cpu_cell(b, room):
                rows.append(f"| {label}: CPU at {level}, {ROOM_LABELS[room]} | {cpu_cell(a, room)} | {cpu_cell(b, room)} "
                            f"| {cpu_ratio(a, b, room, room)} |")
    return rows


def table(r: dict[str, dict]) -> str:
    rows = [f"machine: {_machine()}", "", "| measure | value | baseline | ratio |", "|---|---|---|---|"]
    add = rows.append
    if base := r.get("uvicorn"):
        for name in (v for n in ("serve-default", "serve-haproxy", "serve-ours", "serve-ours-logbuf") for v in variants(r, n)):
            for c in ("c1", "c32"):
                s, b = r[name][c], base[c]
                add(f"| {name}: req/s at {c} | {s['rps']:,.0f} | {b['rps']:,.0f} (uvicorn) | {_x(s['rps'], b['rps'])} |")
                add(f"| {name}: p50 at {c} | {s['p50']:.2f} ms | {b['p50']:.2f} ms | {_plus(s['p50'], b['p50'])} |")
                add(f"| {name}: p99 at {c} | {s['p99']:.2f} ms | {b['p99']:.2f} ms | {_x(s['p99'], b['p99'])} |")
                for room in ("haproxy", "router", "replica", "sum", "ray"):
                    if cell := cpu_cell(s, room):
                        label = "null backend replica" if room == "replica" else ROOM_LABELS[room]
                        versus = (f"{cpu_cell(b, 'uvicorn')} (uvicorn server thread)", cpu_ratio(s, b, "sum", "uvicorn")) \
                            if room == "sum" and cpu_cell(b, "uvicorn") else ("", "")
                        add(f"| {name}: CPU at {c}, {label} | {cell} | {versus[0]} | {versus[1]} |")
            if own := meter_cost(r[name]):
                add(f"| {name}: the CPU split's own work (outside the measured latencies) | {own} | | |")
    if (on := r.get("serve-ours")) and (off := r.get("serve-ours-nostories")):
        for c in ("c1", "c32"):
            add(f"| request stories kept: req/s at {c} | {on[c]['rps']:,.0f} | {off[c]['rps']:,.0f} (stories off) | {_x(on[c]['rps'], off[c]['rps'])} |")
            add(f"| request stories kept: p50 at {c} | {on[c]['p50']:.2f} ms | {off[c]['p50']:.2f} ms | {_plus(on[c]['p50'], off[c]['p50'])} |")
    if m := r.get("stories-memory"):
        for shape, label in (("rerank", "a rerank"), ("llm", "an LLM stream (routing, engine timings)"), ("retried", "a retried LLM stream")):
            add(f"| request stories: memory per 10,000 kept, {label} | {m[shape]['bytes_per_10k'] / 2**20:.1f} MiB | | |")
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
    if v := r.get("vllm-serve"):
        for name in variants(r, "llm-stack"):
            s, tag = r[name], "LLM" + name[len("llm-stack"):]
            for c in ("c1", "c8"):
                add(f"| {tag} tokens/s at {c} | {s[c]['tokens_per_s']:.1f} | {v[c]['tokens_per_s']:.1f} (vllm serve) | {_x(s[c]['tokens_per_s'], v[c]['tokens_per_s'])} |")
                add(f"| {tag} TTFT p50 at {c} | {s[c]['ttft_p50']:.0f} ms | {v[c]['ttft_p50']:.0f} ms | {_plus(s[c]['ttft_p50'], v[c]['ttft_p50'], digits=0)} |")
                for room, bare, label in LLM_ROOMS:
                    if cell := cpu_cell(s[c], room):
                        versus = (cpu_cell(v[c], bare), cpu_ratio(s[c], v[c], room, bare)) if bare and cpu_cell(v[c], bare) else ("", "")
                        add(f"| {tag} CPU at {c}, {label} | {cell} | {versus[0]} | {versus[1]} |")
            for room, bare, label in LLM_ROOMS:
                if cell := idle_cell(s, room):
                    versus = idle_cell(v, bare) if bare else ""
                    add(f"| {tag} CPU with no traffic, {label} | {cell} | {versus} | |")
            add(f"| {tag} ready after start | {s['ready_s']:.0f} s | {v['ready_s']:.0f} s | {_x(s['ready_s'], v['ready_s'])} |")
            if own := meter_cost(s):
                add(f"| {tag} the CPU split's own work (outside the measured latencies) | {own} | | |")
    if (on := r.get("llm-stack")) and (off := r.get("llm-stack-nomigration")):
        for c in ("c1", "c8"):
            add(f"| LLM streams tracked for continuation: tokens/s at {c} | {on[c]['tokens_per_s']:.1f} | "
                f"{off[c]['tokens_per_s']:.1f} (migration off) | {_x(on[c]['tokens_per_s'], off[c]['tokens_per_s'])} |")
            add(f"| LLM streams tracked for continuation: TTFT p50 at {c} | {on[c]['ttft_p50']:.0f} ms | "
                f"{off[c]['ttft_p50']:.0f} ms (migration off) | {_plus(on[c]['ttft_p50'], off[c]['ttft_p50'], digits=0)} |")
    if k := r.get("migration-kills"):
        add(f"| replica SIGKILLed mid-stream: kill to the next token on the client, p50 of {k['kills']:.0f} | "
            f"{k['kill_to_next_token_p50_ms']:.0f} ms | {k['inter_token_p50_ms']:.0f} ms (between tokens before the kill) | |")
        add(f"| streams continued after the kill | {k['continued']:.0f} of {k['kills']:.0f} | | |")
    if (ours := r.get("autoscale-tokens")) and (serve_default := r.get("autoscale-requests")):
        for key, label in (("ttft_p99_ms", "TTFT p99, every request"), ("ttft_p50_ms", "TTFT p50, every request"),
                           ("long_ttft_p99_ms", "TTFT p99, the long prompts"), ("chat_ttft_p99_ms", "TTFT p99, the short chats")):
            if ours.get(key) and serve_default.get(key):
                add(f"| autoscaling, bursts of chats and long prompts: {label} | {ours[key]:.0f} ms (token policy) | "
                    f"{serve_default[key]:.0f} ms (Serve's default) | {_x(ours[key], serve_default[key])} |")
        add(f"| autoscaling, the same run: replica-seconds held | {ours['replica_seconds']:.0f} | "
            f"{serve_default['replica_seconds']:.0f} | {_x(ours['replica_seconds'], serve_default['replica_seconds'])} |")
    if d := r.get("routing-default"):
        rows.extend(routing_rows(r, d))
    for name in sorted(k for k in r if "@" in k):
        step, rev = name.split("@", 1)
        if step in r:
            rows.extend(compare_rows(step, rev, r[step], r[name]))
    return "\n".join(rows)


ROUTING_POLICIES = (("routing-ours", ""), ("routing-ray-prefix", " (Ray's PrefixCacheAffinityRouter)"),
                    ("routing-vllm-router", " (vllm-router cache_aware)"))
ROUTING_PHASES = (("conversations", "shared-prefix conversations"), ("shared_system_prompt", "one system prompt for all"))


def routing_rows(r: dict[str, dict], d: dict) -> list[str]:
    """Each routing policy that ran against Serve's default (`d`), same run; then ours against the
    best peer's hit rate."""
    rows = []
    add = rows.append
    for phase, label in ROUTING_PHASES:
        for step, who in ROUTING_POLICIES:
            if step not in r:
                continue
            a, b = r[step][phase], d[phase]
            if a["vllm_hit_rate"] is not None and b["vllm_hit_rate"] is not None:
                add(f"| routing, {label}{who}: vLLM prefix hit rate | {a['vllm_hit_rate']:.3f} | {b['vllm_hit_rate']:.3f} (Serve's default) | {_x(a['vllm_hit_rate'], max(b['vllm_hit_rate'], 1e-9))} |")
            add(f"| routing, {label}{who}: TTFT p50 | {a['ttft_p50_s'] * 1000:.0f} ms | {b['ttft_p50_s'] * 1000:.0f} ms | {_x(a['ttft_p50_s'], b['ttft_p50_s'])} |")
            add(f"| routing, {label}{who}: TTFT p99 | {a['ttft_p99_s'] * 1000:.0f} ms | {b['ttft_p99_s'] * 1000:.0f} ms | {_x(a['ttft_p99_s'], b['ttft_p99_s'])} |")
            add(f"| routing, {label}{who}: output tokens/s | {a['output_tokens_per_s']:.1f} | {b['output_tokens_per_s']:.1f} | {_x(a['output_tokens_per_s'], b['output_tokens_per_s'])} |")
            add(f"| routing, {label}{who}: busiest replica's share | {a['max_replica_share']:.0%} | {b['max_replica_share']:.0%} | |")
            add(f"| routing, {label}{who}: failed requests | {a['failed']} of {a['requests']} | {b['failed']} of {b['requests']} | |")
        peers = [(r[s][phase]["vllm_hit_rate"], who.strip(" ()")) for s, who in ROUTING_POLICIES[1:]
                 if s in r and r[s][phase]["vllm_hit_rate"] is not None]
        if peers and (ours := r.get("routing-ours")) and ours[phase]["vllm_hit_rate"] is not None:
            best, name = max(peers)
            add(f"| routing, {label}: our hit rate vs the best peer's | {ours[phase]['vllm_hit_rate']:.3f} | {best:.3f} ({name}) | {_x(ours[phase]['vllm_hit_rate'], max(best, 1e-9))} |")
    return rows


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
