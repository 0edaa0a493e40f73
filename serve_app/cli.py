"""`python -m serve_app ...`: check a config, prepare models, bring the stack up and down.

It launches the local Ray processes, with the environment from `serve_app/ray_env.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from serve_app.config import PREPARED_PREFIX, AppConfig, ConfigError, hash_key, load_serve_config
from serve_app.ray_env import RAY_ENV
from serve_app.tracing import EXPORTER

DASHBOARD = "http://127.0.0.1:8265"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="validate a Serve config and print what would be deployed")
    p.add_argument("config")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--gpus-per-node", type=float, help="also check that every replica fits nodes of this many GPUs")
    fit.add_argument("--cluster", nargs="?", const="auto", metavar="ADDRESS",
                     help="also check that every replica fits the running Ray cluster's nodes")
    p = sub.add_parser("prepare-models", help="build the prepared:NAME models a config uses")
    p.add_argument("config")
    p = sub.add_parser("up", help="start a local Ray head, deploy the config, wait until RUNNING")
    p.add_argument("config")
    p.add_argument("--num-cpus", type=int, default=max(8, 2 * (os.cpu_count() or 1)))
    p.add_argument("--timeout", type=float, default=900.0)
    sub.add_parser("down", help="shut Serve down and stop the local Ray head")
    sub.add_parser("hash-key", help="read an API key on stdin, print the sha256 to put in api_keys")
    p = sub.add_parser("status", help="print every model and replica: health, node, circuit, autoscaling")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key-env", default="SERVE_APP_ADMIN_KEY", help="env var holding an admin API key, if keys are on")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("usage", help="print requests and tokens per API key name and model for a time range")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key-env", default="SERVE_APP_ADMIN_KEY", help="env var holding an admin API key, if keys are on")
    p.add_argument("--since", help="ISO 8601 time, unix seconds, or an age such as 7d / 12h (default: 24h ago)")
    p.add_argument("--until", help="same forms (default: now)")
    p.add_argument("--key", help="one key name only")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("batches", help="list batches (progress, rate, ETA, failures) or cancel one")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key-env", default="SERVE_APP_ADMIN_KEY", help="env var holding an admin API key, if keys are on")
    p.add_argument("--cancel", metavar="BATCH_ID", help="cancel this batch: no new line starts, finished results stay")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("trace", help="what happened to one request, by its id: attempts, replicas, nodes, timings, logs")
    p.add_argument("request_id")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL (with its route prefix)")
    p.add_argument("--key-env", default="SERVE_APP_ADMIN_KEY", help="env var holding an admin API key, if keys are on")
    p.add_argument("--ray-address", default="auto", help="the Ray cluster (auto, or the GCS host:port), for the log lines of "
                   "every node through Ray's log API (needs its dashboard)")
    p.add_argument("--local-logs", action="store_true", help="log lines from this machine's Ray session files only")
    p.add_argument("--no-logs", action="store_true", help="the story only")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("kuberay", help="print a KubeRay RayService manifest generated from a Serve config")
    p.add_argument("config")
    p.add_argument("--name", default="llm-stack")
    p.add_argument("--image", default="registry.example.com/rayserve-llm-stack:0.1.0-gpu")
    p.add_argument("--gpus-per-worker", type=int, default=8)
    p.add_argument("--max-workers", type=int, default=4)
    p = sub.add_parser("alert-rules", help="print the Prometheus alert rules as a KubeRay-friendly PrometheusRule")
    p.add_argument("rules", nargs="?", default="docs/grafana/serve_app_alerts.yaml")
    p.add_argument("--name", default="llm-stack")
    args = parser.parse_args(argv)
    try:
        commands = {"check": cmd_check, "prepare-models": cmd_prepare, "up": cmd_up, "down": cmd_down,
                    "hash-key": cmd_hash_key, "kuberay": cmd_kuberay, "status": cmd_status, "usage": cmd_usage,
                    "batches": cmd_batches, "trace": cmd_trace,
                    "alert-rules": cmd_alert_rules}
        return commands[args.cmd](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _serve_traces(raw: dict) -> bool:
    """Serve's cluster-wide tracing is on, through our OTLP exporter (serve_app/tracing.py)."""
    tc = raw.get("tracing_config") or {}
    return bool(tc.get("enabled")) and tc.get("exporter_import_path") == EXPORTER


def _apps(path: str) -> list[tuple[str, AppConfig]]:
    _, apps = load_serve_config(path)
    if not apps:
        raise ConfigError(f"{path}: no application uses import_path serve_app.app:build_app")
    return apps


def cmd_check(args: argparse.Namespace) -> int:
    """Validate, apply presets, check each model against its engine; exit 2 on any problem."""
    from serve_app.app import check_router, describe, resolve
    from serve_app.compat import check_engine_kwargs, check_fit, check_model, check_tool_template

    problems, notes, warnings = [], [], []
    node_gpus = _node_gpus(args)
    raw, _ = load_serve_config(args.config)
    overrides = {a.get("name", f"app{i}"): a.get("deployments") or [] for i, a in enumerate(raw["applications"])}
    for name, cfg in _apps(args.config):
        print(f"application '{name}': {len(cfg.models)} model(s)")
        for row in describe(cfg):
            extra = f"  source={row['source']}  tp={row['tp']}" if "source" in row else ""
            extra += f"  routing={row['routing']}" if row.get("routing") else ""
            extra += f"  scaling={row['scaling']}" if row.get("scaling") else ""
            extra += f"  adapters={','.join(row['adapters'])}" if row.get("adapters") else ""
            print(f"  {row['deployment']:<36} {row['serves']:<48} replicas={row['replicas']} "
                  f"cpus={row['cpus']} gpus={row['gpus']}{extra}")
            if row.get("preset"):
                print(f"  {'':<36} preset: {row['preset']}")
        for m in resolve(cfg).models:
            problems += check_model(m, cfg.gateway.models_path)
            found, noted = check_engine_kwargs(m)
            problems, notes = problems + found, notes + noted + check_tool_template(m, cfg.gateway.models_path)
        problems += check_fit(cfg.models, node_gpus)
        found, warned = check_router(cfg, overrides.get(name, []))
        problems, warnings = problems + found, warnings + [f"application '{name}': {w}" for w in warned]
        if cfg.gateway.tracing.otlp_endpoint and not _serve_traces(raw):
            warnings.append(f"application '{name}': gateway.tracing.otlp_endpoint is set but Serve's tracing is off: add "
                            f"`tracing_config: {{enabled: true, exporter_import_path: {EXPORTER}}}` at the top of "
                            f"{args.config} (nothing is exported without it)")
    for n in notes:
        print(f"note: {n}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 2
    print("config OK")
    return 0


def _node_gpus(args: argparse.Namespace) -> list[float]:
    if args.gpus_per_node is not None:
        return [args.gpus_per_node]
    if args.cluster:
        import ray

        os.environ.update(RAY_ENV)
        ray.init(address=args.cluster, logging_level="ERROR", log_to_driver=False)
        try:
            return [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["Alive"]]
        finally:
            ray.shutdown()
    return []


def cmd_status(args: argparse.Namespace) -> int:
    view = _admin_get(args, "/v1/status")
    if view is None:
        return 1
    print(json.dumps(view, indent=2) if args.json else render_status(view))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    params = {k: v for k, v in {"since": _age(args.since), "until": _age(args.until), "key": args.key}.items() if v}
    view = _admin_get(args, "/v1/usage?" + urllib.parse.urlencode(params))
    if view is None:
        return 1
    print(json.dumps(view, indent=2) if args.json else render_usage(view))
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    if args.cancel:
        batch = _admin_get(args, f"/v1/batches/{urllib.parse.quote(args.cancel, safe='')}/cancel", method="POST")
        if batch is None:
            return 1
        print(json.dumps(batch, indent=2) if args.json else f"{batch['id']}: {batch['status']} {batch['request_counts']}")
        return 0
    view = _admin_get(args, "/v1/status")
    if view is None:
        return 1
    print(json.dumps(view.get("batches"), indent=2) if args.json else render_batches(view.get("batches") or {}))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from serve_app import trace

    story = _admin_get(args, f"/v1/requests/{urllib.parse.quote(args.request_id, safe='')}")
    if story is None:
        return 1
    logs, where = ([], "") if args.no_logs else trace.log_lines(args.request_id, args.ray_address, args.local_logs)
    if args.json:
        story["log_lines"] = [dataclasses.asdict(line) for line in logs]
        print(json.dumps(story, indent=2))
    else:
        print(trace.render(story, None if args.no_logs else logs, where))
    return 0


def _admin_get(args: argparse.Namespace, path: str, method: str = "GET") -> dict | None:
    """Call one of the router's admin views with the admin key from `--key-env`; None after saying why."""
    headers = {"x-request-id": f"cli-{args.cmd}-{int(time.time())}"}
    key = os.environ.get(args.key_env)
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{args.url.rstrip('/')}{path}", headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        print(f"error: {e.code} {e.read().decode(errors='replace')[:300]}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
    return None


def _age(value: str | None) -> str | None:
    """'7d' / '12h' / '30m' -> unix seconds that long ago; anything else goes to the router as given."""
    units = {"d": 86400, "h": 3600, "m": 60}
    if value and value[-1:] in units and value[:-1].isdigit():
        return str(int(time.time()) - int(value[:-1]) * units[value[-1]])
    return value


def render_usage(view: dict) -> str:
    lines = [f"usage {view['since']} .. {view['until']} (hours that start in the range)",
             f"{'key':<24} {'model':<36} {'requests':>9} {'prompt':>12} {'completion':>12} {'total':>12}"]
    for r in view.get("data", []):
        lines.append(f"{r['key'][:24]:<24} {r['model'][:36]:<36} {r['requests']:>9} {r['prompt_tokens']:>12} "
                     f"{r['completion_tokens']:>12} {r['total_tokens']:>12}")
    if not view.get("data"):
        lines.append("(nothing served in this range)")
    return "\n".join(lines)


def render_status(view: dict) -> str:
    """The status view as a table a person reads at 3 a.m.: sick things say why and where."""
    lines = [f"application {view.get('app')}"]
    store = view.get("quota_store")
    if store:
        degraded = f"  DEGRADED: quotas on router memory ({store.get('last_error')})" if store.get("degraded") else ""
        lines.append(f"quota store: {store.get('kind')} (as the answering router replica sees it){degraded}")
    for name, m in view.get("models", {}).items():
        circuit = m.get("circuit") or {}
        states = ", ".join(f"{k}={v}" for k, v in (m.get("replica_states") or {}).items()) or "-"
        auto = m.get("autoscaling") or {}
        scale = (f"autoscale {auto.get('min_replicas')}..{auto.get('max_replicas')} target {auto.get('target_ongoing_requests')}"
                 if "max_replicas" in auto else f"replicas {auto.get('num_replicas')}")
        events = ", ".join(f"{k}={v}" for k, v in (m.get("router_events") or {}).items())
        restarts = "" if m.get("restarts") is None else f"  restarts: {m['restarts']}"
        lines.append(f"\n{name} [{m['kind']}/{m['engine']}] {m['serve_status']}  replicas: {states}  {scale}  "
                     f"circuit: {circuit.get('state', '-')}{restarts}" + (f"  router: {events}" if events else ""))
        if circuit.get("last_error"):
            lines.append(f"  circuit last error: {circuit['last_error']} at {_ts(circuit.get('last_error_at'))}")
        if m.get("serve_message"):
            lines.append(f"  serve: {m['serve_message'][:200]}")
        sc = m.get("scaling") or {}
        if sc.get("policy") == "tokens":
            d = sc.get("last_decision") or {}
            kv = "-" if sc.get("kv_usage") is None else f"{sc['kv_usage']:.0%}"
            lines.append(f"  autoscaler (tokens): KV {kv}, prompt tokens waiting {sc.get('prompt_tokens_waiting', '-')}; "
                         + (f"{d.get('action')} -> {d.get('replicas')}: {d.get('reason')} ({_ts(d.get('at'))})" if d else "no decision yet"))
        lines.append(f"  {'replica':<10} {'state':<10} {'node':<14} {'ip':<15} {'device':<14} {'inflight':>8} {'probe':>12}  last error")
        for r in m.get("replicas", []):
            probe = "-" if r.get("last_probe_ms") is None else f"{r['last_probe_ms']:.0f}ms {'ok' if r.get('last_probe_ok') else 'FAIL'}"
            err = f"{r['last_error'][:60]} ({_ts(r.get('last_error_at'))})" if r.get("last_error") else "-"
            if r.get("state") == "gone":
                err = f"gone since {_ts(r.get('gone_at'))}; Serve no longer lists it" + ("" if err == "-" else f"; last error {err}")
            lines.append(f"  {r.get('replica_id', '?'):<10} {r.get('state', '?'):<10} {str(r.get('node_id', '?'))[:12]:<14} "
                         f"{r.get('node_ip', '?'):<15} {_device(r):<14} {r.get('in_flight', 0):>8} {probe:>12}  {err}")
    if view.get("batches"):
        lines.append("\n" + render_batches(view["batches"]))
    return "\n".join(lines)


def render_batches(view: dict) -> str:
    """Batches running or ended within the hour, newest first."""
    lines = [f"batch store: {view.get('store', '?')}" + (f"  ERROR: {view['error']}" if view.get("error") else ""),
             f"{'batch':<40} {'owner':<14} {'status':<11} {'done':>7} {'failed':>7} {'left':>7} {'lines/s':>8} {'eta':>8}  endpoint"]
    for b in view.get("batches", []):
        eta = "-" if b.get("eta_s") is None else f"{b['eta_s']}s"
        lines.append(f"{b['id'][:40]:<40} {b['owner'][:14]:<14} {b['status']:<11} {b['completed']:>7} {b['failed']:>7} "
                     f"{b['pending'] + b['running']:>7} {b['lines_per_s']:>8} {eta:>8}  {b['endpoint']}")
    if not view.get("batches"):
        lines.append("(no batch running or ended within the hour)")
    return "\n".join(lines)


def _device(r: dict) -> str:
    gpus = ",".join(r.get("gpu_ids") or ())
    where = f"{r.get('device') or '?'}{':' + gpus if gpus else ''}"
    return f"{where} {r['dtype']}" if r.get("dtype") else where


def _ts(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def cmd_kuberay(args: argparse.Namespace) -> int:
    from serve_app.kuberay import rayservice, render

    _apps(args.config)  # validates first: a manifest is never generated from a broken config
    manifest = rayservice(args.config, name=args.name, image=args.image,
                          gpus_per_worker=args.gpus_per_worker, max_workers=args.max_workers)
    sys.stdout.write(render(manifest, args.config))
    return 0


def cmd_alert_rules(args: argparse.Namespace) -> int:
    from serve_app.kuberay import prometheus_rule, render_rule

    sys.stdout.write(render_rule(prometheus_rule(args.rules, name=args.name), args.rules))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    """The key comes on stdin, not argv, so it stays out of shell history and `ps`."""
    secret = sys.stdin.readline().strip()
    if not secret:
        print("error: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(secret))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from deployments.prepared_models import prepare

    for _, cfg in _apps(args.config):
        names = sorted({m.source[len(PREPARED_PREFIX):] for m in cfg.models if m.source.startswith(PREPARED_PREFIX)})
        if names:
            prepare(cfg.gateway.models_path, names)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    apps = _apps(args.config)
    env = {**os.environ, **RAY_ENV}
    bindir = pathlib.Path(sys.executable).parent
    ray_cli, serve_cli = str(bindir / "ray"), str(bindir / "serve")
    if not _dashboard_up():
        print(f"[up] starting a local Ray head (dashboard {DASHBOARD}, loopback only) ...", flush=True)
        subprocess.run(
            [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6379",
             "--dashboard-host=127.0.0.1", "--dashboard-port=8265", f"--num-cpus={args.num_cpus}",
             "--disable-usage-stats"],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )
        _wait(lambda: _dashboard_up(), 60, "the Ray dashboard to answer")
    print(f"[up] serve deploy {args.config}", flush=True)
    subprocess.run([serve_cli, "deploy", args.config, "--address", DASHBOARD], env=env, check=True)
    names = [n for n, _ in apps]
    if not _wait_running(names, args.timeout):
        return 1
    raw, _ = load_serve_config(args.config)
    http = raw.get("http_options") or {}
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    prefixes = {a.get("name", "default"): a.get("route_prefix", "/") for a in raw.get("applications") or []}
    _print_endpoints(base, apps, {n: prefixes.get(n, "/") for n in names})
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    env = {**os.environ, **RAY_ENV}
    bindir = pathlib.Path(sys.executable).parent
    if _dashboard_up():
        subprocess.run([str(bindir / "serve"), "shutdown", "-y", "--address", DASHBOARD], env=env, check=False)
    subprocess.run([str(bindir / "ray"), "stop"], env=env, check=False)
    return 0


def _dashboard_up() -> bool:
    try:
        with urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise SystemExit(f"[up] timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1)


def _serve_state() -> dict:
    with urllib.request.urlopen(f"{DASHBOARD}/api/serve/applications/", timeout=10) as r:
        return json.loads(r.read())


def _wait_running(names: list[str], timeout: float) -> bool:
    """Show progress until every application is RUNNING; on failure print each deployment's message."""
    t0, last = time.time(), ""
    while time.time() - t0 < timeout:
        try:
            apps = _serve_state().get("applications", {})
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            apps = {}
        parts, failed = [], []
        for name in names:
            app = apps.get(name, {})
            status = app.get("status", "NOT_STARTED")
            deps = app.get("deployments", {})
            ready = sum(d.get("status") == "HEALTHY" for d in deps.values())
            parts.append(f"{name}: {status} ({ready}/{len(deps)} deployments healthy)")
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                failed.append((name, app))
        line = "; ".join(parts)
        if line != last:
            print(f"[up] {time.time() - t0:5.0f}s  {line}", flush=True)
            last = line
        if failed:
            for name, app in failed:
                print(f"[up] application '{name}' failed: {app.get('message', '')}", file=sys.stderr)
                for dname, d in app.get("deployments", {}).items():
                    if d.get("status") != "HEALTHY":
                        print(f"[up]   deployment {dname}: {d.get('status')}: {d.get('message', '')}", file=sys.stderr)
            print("[up] replica logs: /tmp/ray/session_latest/logs/serve/", file=sys.stderr)
            return False
        if all(apps.get(n, {}).get("status") == "RUNNING" for n in names):
            return True
        time.sleep(2)
    print(f"[up] timed out after {timeout:.0f}s; see `serve status` and /tmp/ray/session_latest/logs/serve/", file=sys.stderr)
    return False


def _print_endpoints(base: str, apps: list[tuple[str, AppConfig]], prefixes: dict[str, str]) -> None:
    """Every route of the router (openapi.ROUTES, which the schema test holds to the route table),
    under each app's route prefix."""
    from serve_app.openapi import ROUTES

    where = ", ".join(f"{name} at {base}{'' if prefix in ('', '/') else prefix}" for name, prefix in prefixes.items())
    print(f"\nRUNNING: {where}. Each app's endpoints, under its prefix:")
    for key, doc in ROUTES.items():
        method, _, path = key.rpartition(" ")
        print(f"  {method or ('POST' if doc.body else 'GET'):<6} {path:<32} {doc.summary}")
    print(f"  Ray dashboard: {DASHBOARD}")
    llm = next((m.name for _, c in apps for m in c.models if m.kind.value == "llm"), None)
    if llm:
        body = json.dumps({"model": llm, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]})
        print(f"\nTry:\n  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    if shutil.which("curl") is None:
        print("(curl is not installed here; any HTTP client or the openai package works)")
