"""Baselines measured in the same run: the same handler on plain uvicorn, the raw model in-process,
bare `vllm serve`, Infinity (in its own venv), and two bare `vllm serve` behind vllm-router (in its
own venv) for the routing step."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

from bench.rooms import Meter, descendants, process_table
from bench.workloads import NULL_BODY, RERANK_BODY, RERANK_CONCURRENCY, RERANK_MAX_BATCH, llm_load, llm_model, rerank_pairs

INFINITY_VENV = pathlib.Path(".bench-venvs") / "infinity"
VLLM_ROUTER_VENV = pathlib.Path(".bench-venvs") / "vllm-router"
VLLM_ROUTER = "vllm-router==0.1.17"  # vLLM's Rust router (PyPI); its cache_aware policy is the peer


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
    """The bench cross-encoder in-process through our own engine class, at each batch size; the
    best one is the baseline. torch uses every core, as it does by default."""
    from bench.models import ensure_cross_encoder
    from deployments.engines.build import build_encoder
    from serve_app.config import ModelConfig

    path = ensure_cross_encoder()
    cfg = ModelConfig.model_validate({"name": "m", "kind": "rerank", "engine": "transformers", "source": str(path)})
    enc = build_encoder(cfg, str(path))
    import torch

    out: dict = {"threads": torch.get_num_threads(), "by_batch": {}}
    for batch in (8, 16, 32, 64, 128):
        pairs = rerank_pairs(batch)
        enc.score_pairs(pairs)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            enc.score_pairs(pairs)
            n += len(pairs)
        out["by_batch"][batch] = n / (time.perf_counter() - t0)
    out["best_batch"], out["pairs_per_s"] = max(out["by_batch"].items(), key=lambda kv: kv[1])
    return out


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.time() - t0
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    """Ends the server's whole process group (started with start_new_session): only what we started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        return  # it had ended (a server that failed to start)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def vllm_command(model, path: pathlib.Path, port: int) -> list[str]:
    """`vllm serve` with the engine and frontend settings our LLM replica gives `model`."""
    cmd = [str(pathlib.Path(sys.executable).parent / "vllm"), "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", model.name, "--max-model-len", str(model.max_input_tokens)]
    for key, value in model.engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    # the same frontend flags the stack's replica gets from the model's preset (tool parser etc.)
    if model.serving.tool_call_parser:
        cmd += ["--tool-call-parser", model.serving.tool_call_parser]
    if model.serving.enable_auto_tool_choice:
        cmd += ["--enable-auto-tool-choice"]
    if model.serving.reasoning_parser:
        cmd += ["--reasoning-parser", model.serving.reasoning_parser]
    return cmd


def vllm_serve(seconds: float, port: int) -> dict:
    """Bare `vllm serve` on the default LLM with the engine settings serve_config.yaml gives it (its
    environment too: the idle-spin cap reaches a bare vLLM through the same plugin)."""
    from serve_app.app import replica_environment

    model, path = llm_model()
    cmd = vllm_command(model, path, port)
    env = {**os.environ, **replica_environment(model)}
    log = open("bench/results/vllm-serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready_s = _wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 300)
        # The same rooms as the stack's (bench/stack.py): the API server runs vLLM's OpenAI serving
        # layer as our LLM replica does; what it started is the engine core.
        meter = Meter(lambda: {"api server": [proc.pid], "engine": descendants(proc.pid, process_table()),
                               "client": [os.getpid()]}, background=("client",))
        return {"ready_s": ready_s, **llm_load(f"http://127.0.0.1:{port}/v1/chat/completions", seconds, meter)}
    finally:
        _stop(proc)


def vllm_router(port: int) -> dict:
    """The routing step's peer: two bare `vllm serve` with the routing step's engine settings, behind
    `vllm-router --policy cache_aware` (vLLM's Rust router, in its own venv, installed on first
    use), under the routing step's workload. Each engine's hit and request counters come from its
    /metrics."""
    from bench.routing import ENGINE, routing_entry, run_phases
    from serve_app.app import replica_environment
    from serve_app.config import ModelConfig
    from serve_app.presets import apply_preset

    model = apply_preset(ModelConfig.model_validate(routing_entry()))
    path = model.resolved_source(pathlib.Path("models"))
    binary = VLLM_ROUTER_VENV / "bin" / "vllm-router"
    if not binary.exists():
        print(f"[bench] installing {VLLM_ROUTER} into {VLLM_ROUTER_VENV} (first run only) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_ROUTER_VENV)], check=True)
        subprocess.run([str(VLLM_ROUTER_VENV / "bin" / "pip"), "install", "-q", VLLM_ROUTER], check=True)
    engine_ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in engine_ports]
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.time()
        for i, p in enumerate(engine_ports):
            log = open(f"bench/results/vllm-router-engine{i}.log", "w")
            procs.append(subprocess.Popen(vllm_command(model, path, p), env={**os.environ, **replica_environment(model)}, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        for url, proc in zip(urls, procs):
            _wait_http(f"{url}/v1/models", proc, 600)
        log = open("bench/results/vllm-router.log", "w")
        router = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
                                   "--policy", "cache_aware", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(router)
        _wait_http(f"http://127.0.0.1:{port}/health", router, 120)
        ready_s = time.time() - t0
        return {"ready_s": round(ready_s, 1), "policy": "vllm-router cache_aware", "kv_blocks": ENGINE["num_gpu_blocks_override"],
                **run_phases(f"http://127.0.0.1:{port}", lambda: {url: _engine_counters(url) for url in urls}, settle_s=1)}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _engine_counters(url: str) -> dict[str, int]:
    """A bare vLLM's prefix-cache and finished-request counters, from its Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    names = {"vllm:prefix_cache_queries_total": "queried", "vllm:prefix_cache_hits_total": "hit",
             "vllm:request_success_total": "requests"}
    out = dict.fromkeys(names.values(), 0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                out[names[sample.name]] += int(sample.value)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infinity(seconds: float, port: int) -> dict:
    """Infinity (infinity-emb) serving the same cross-encoder from its own venv (it pins old
    numpy/transformers); installed on first use."""
    from bench.load import run
    from bench.models import ensure_cross_encoder

    path = ensure_cross_encoder()
    binary = INFINITY_VENV / "bin" / "infinity_emb"
    if not binary.exists():
        print("[bench] installing Infinity into .bench-venvs/infinity (first run only) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(INFINITY_VENV)], check=True)
        subprocess.run([str(INFINITY_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "infinity-emb[server,torch]"], check=True)
    log = open("bench/results/infinity.log", "w")
    cmd = [str(binary), "v2", "--model-id", str(path), "--served-model-name", RERANK_BODY["model"], "--engine", "torch",
           "--device", "cpu", "--batch-size", str(RERANK_MAX_BATCH), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 300)
        r = asyncio.run(run(f"http://127.0.0.1:{port}/rerank", RERANK_BODY, RERANK_CONCURRENCY, seconds))
        return {"pairs_per_s": r.rps * len(RERANK_BODY["documents"]), **r.summary()}
    finally:
        _stop(proc)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["uvicorn", "raw-rerank", "vllm-serve", "infinity", "vllm-router"])
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--seconds", type=float, default=8)
    args = p.parse_args()
    os.makedirs("bench/results", exist_ok=True)
    if args.what == "raw-rerank":
        out = raw_rerank(args.seconds)
    elif args.what == "vllm-serve":
        out = vllm_serve(args.seconds, args.port)
    elif args.what == "infinity":
        out = infinity(args.seconds, args.port)
    elif args.what == "vllm-router":
        out = vllm_router(args.port)
    else:
        out = _uvicorn(args.seconds, args.port)
    print("RESULT " + json.dumps(out), flush=True)


def _uvicorn(seconds: float, port: int) -> dict:
    import threading

    import uvicorn

    from bench.load import run, summarize

    server = uvicorn.Server(uvicorn.Config(uvicorn_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    # The server is a thread of this process, beside the load generator: its own CPU time.
    meter = Meter(lambda: {"uvicorn": [(os.getpid(), thread.native_id)]})
    levels = {f"c{c}": asyncio.run(run(f"http://127.0.0.1:{port}/v1/rerank", NULL_BODY, c, seconds, meter=meter)) for c in (1, 32)}
    server.should_exit = True
    return summarize(levels, None)  # the thread is idle between requests: no idle figure to take off


if __name__ == "__main__":
    main()
