"""The status page in a real headless Chromium: it renders every model → replica → node from
/v1/status, shows a killed replica as gone and counted in the model's restarts after one
refresh, asks for a key when keys are on, and logs no console error. The router serves the page without a key and nothing else with it."""

from __future__ import annotations

import json
import re
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.status_page import page_response
from tests.browser import chromium_dom, console_errors, needs_chromium
from tests.local_servers import ThreadedServer


def restarts_cell(dom: str) -> tuple[str, str]:
    """The model's restarts cell, found by its tooltip."""
    match = re.search(r'<td( class="\w+")? title="replicas Serve lost[^"]*">([^<]*)</td>', dom)
    assert match, dom
    return match.group(1) or "", match.group(2)


def view(victim_state: str) -> dict:
    victim = {"replica_id": "victim01", "model": "ce", "state": victim_state, "serve_state": "RUNNING",
              "node_id": "e1f07c22aa90" + "0" * 28, "node_ip": "10.0.0.12", "device": "cuda:1", "dtype": "bfloat16",
              "gpu_ids": ["1"], "in_flight": 3, "stalled_for_s": 0, "last_probe_at": time.time() - 2, "last_probe_ms": 41.0,
              "last_probe_ok": True, "last_error": None, "failed_request_ids": []}
    if victim_state == "gone":
        victim.update(gone_at=time.time() - 1, in_flight=0)
    keeper = {**victim, "replica_id": "keeper02", "state": "reporting", "node_id": "69dc193b0542" + "1" * 28,
              "node_ip": "10.0.0.11", "gpu_ids": ["0"], "last_error": "stalled: 2 request(s) in flight <b>x</b>",
              "last_error_at": time.time() - 5, "failed_request_ids": ["rid-42"]}
    return {"app": "llm-stack", "generated_at": time.time(), "models": {"ce": {
        "kind": "rerank", "engine": "transformers", "deployment": "rerank-ce", "serve_status": "HEALTHY",
        "serve_message": "", "replica_states": {"RUNNING": 2},
        "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
        "circuit": {"state": "open", "last_error": "boom"}, "router_events": {"retry": 3},
        "restarts": 1 if victim_state == "gone" else 0, "replicas": [keeper, victim], "history": HISTORY}},
        "alerts": {"enabled": True, "delivery": {"sent": 1, "failed": 0, "dropped": 0},
                   "recent": [{"at": time.time(), "event": "alert", "text": "[llm-stack] ALERT ce: replica victim01 gone"}]},
        "batches": {"store": "sqlite:///data/batches-llm-stack.sqlite3", "batches": [
            {"id": "batch_nightly01", "owner": "etl", "endpoint": "/v1/embeddings", "status": "in_progress",
             "created_at": time.time() - 60, "expires_at": time.time() + 86_000, "ended_at": None, "total": 2000,
             "completed": 1500, "failed": 3, "running": 16, "pending": 481, "lines_per_s": 25.0, "eta_s": 20,
             "pending_by_model": {"ce": 497}}]}}


# Twenty minutes of 10 s points: traffic rising, one burst of errors; a reranker has no TTFT, tokens or KV use.
HISTORY = [{"t": time.time() - 1200 + 10 * i, "requests": 10 + i, "rps": (10 + i) / 10, "error_rate": 0.5 if i == 60 else 0.0,
            "p50_ms": 20.0 + i, "p99_ms": 80.0 + 2 * i, "ttft_p50_ms": None, "tokens_per_s": 0.0, "kv_usage": None,
            "in_flight": i % 5} for i in range(120)]


class FakeGateway:
    """The page and a scripted /v1/status on a loopback port (uvicorn in a thread)."""

    def __init__(self, key: str | None = None, make=None) -> None:
        self.calls, self.key = 0, key
        make = make or view

        async def status(request: Request):
            if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": "needs an admin key"}}, status_code=401)
            self.calls += 1
            return JSONResponse(make("reporting" if self.calls == 1 else "gone"))

        self.server = ThreadedServer(Starlette(routes=[Route("/app/status", lambda r: page_response()),
                                                       Route("/app/v1/status", status)]))
        self.url = f"{self.server.url}/app/status"

    def close(self) -> None:
        self.server.close()


@needs_chromium
def test_the_page_renders_models_replicas_and_nodes_and_shows_a_killed_replica_gone_after_one_refresh(tmp_path):
    gw = FakeGateway()
    try:
        first, log = chromium_dom(gw.url, 1000, tmp_path, screenshot="status-charts.png")  # before the first refresh
        assert "victim01" in first and "keeper02" in first and "10.0.0.12" in first and "10.0.0.11" in first
        assert "cuda:1 bfloat16" in first and "rid-42" in first and "min 1 / max 4, target 8 ongoing" in first
        assert "open (last error: boom)" in first and "ALERT ce: replica victim01 gone" in first
        assert "&lt;b&gt;x&lt;/b&gt;" in first  # data is text, never markup
        assert restarts_cell(first) == ("", "0")
        batch = first[first.index("batch_nightly01"):].split("</tr>")[0]
        assert all(f">{v}<" in batch for v in ("etl", "/v1/embeddings", "in_progress", "1500", "3", "497", "25", "20s")), batch
        # the last hour as charts: one line per measure the model has, every point drawn, last and peak values
        charts = re.findall(r'<div class="chart" data-field="(\w+)"><div>([^<]*)</div><svg[^>]*><polyline points="([^"]*)" '
                            r'data-points="(\d+)"', first)
        assert [c[0] for c in charts] == ["rps", "p50_ms", "p99_ms", "error_rate", "tokens_per_s", "in_flight"], charts
        assert all(int(c[3]) == 120 and len(c[2].split()) == 120 for c in charts), charts
        assert dict((c[0], c[1]) for c in charts)["error_rate"] == "server errors: 0% (max 50%)"
        assert dict((c[0], c[1]) for c in charts)["p99_ms"] == "p99 latency: 318 ms (max 318 ms)"
        assert console_errors(log) == [], console_errors(log)
        gw.calls = 0
        later, log = chromium_dom(gw.url, 4000, tmp_path)  # one refresh (every 3 s) later
        assert gw.calls >= 2
        row = later[later.index("victim01"):].split("</tr>")[0]
        assert ">gone<" in row and "gone since" in row, row
        assert restarts_cell(later) == (' class="warn"', "1")
        assert console_errors(log) == [], console_errors(log)
    finally:
        gw.close()


def llm_view(_state: str) -> dict:
    """An LLM on the token policy that just scaled up: its decision, KV use and waiting tokens."""
    out = view("reporting")
    model = out["models"].pop("ce")
    decided = {"replicas": 2, "action": "up", "reason": "prompt-token drain time at 3.10x its target on 1 replica(s)",
               "pressure": 3.1, "terms": {"kv_cache": 0.2, "waiting": 0.4, "drain": 3.1, "ttft": 1.2}, "at": time.time() - 30}
    model.update(kind="llm", engine="vllm", deployment="llm-chat", history=[
        {**p, "kv_usage": 0.5, "waiting_tokens": 4000 + i, "replicas": 1 + (i > 100)} for i, p in enumerate(HISTORY)])
    model["scaling"] = {
        "policy": "tokens", "targets": {"ttft_target_s": 2.0, "kv_cache_target": 0.8, "waiting_target": 5, "scale_down_below": 0.5},
        "last_decision": {**decided, "action": "hold", "replicas": 2, "reason": "waiting for 1 starting replica(s) before deciding again"},
        "recent_changes": [decided], "load_s": 41.5, "kv_usage": 0.83, "prompt_tokens_waiting": 6200, "waiting_requests": 3,
        "token_queue": {"waiting_prompt_tokens": 5100, "bound": 131072, "reported_prompt_tokens": 6200, "drain_tokens_per_s": 900.0},
    }
    out["models"]["chat"] = model
    return out


@needs_chromium
def test_an_llm_on_the_token_policy_shows_what_its_autoscaler_decided_and_why(tmp_path):
    gw = FakeGateway(make=llm_view)
    try:
        dom, log = chromium_dom(gw.url, 1000, tmp_path)
        box = dom[dom.index('<div class="scaling">'):].split("</div>")[0]
        for shown in ("tokens: TTFT 2 s, KV 80%, waiting 5", "hold -&gt; 2", "waiting for 1 starting replica(s)",
                      ">83%<", ">6200<", "5100 / 131072", "41.5 s", "up -&gt; 2", "prompt-token drain time at 3.10x"):
            assert shown in box, (shown, box)
        assert '<td class="warn">83%</td>' in box  # KV use over its target is marked
        charts = re.findall(r'<div class="chart" data-field="(\w+)">', dom)
        assert "waiting_tokens" in charts and "kv_usage" in charts and "replicas" in charts, charts
        assert console_errors(log) == [], console_errors(log)
    finally:
        gw.close()


@needs_chromium
def test_with_keys_on_the_page_asks_for_an_admin_key_and_shows_no_data(tmp_path):
    gw = FakeGateway(key="sk-ops")
    try:
        dom, _ = chromium_dom(gw.url, 1000, tmp_path)
        assert 'id="login" style="display: block;"' in dom and "enter an admin key" in dom
        assert "victim01" not in dom and gw.calls == 0
    finally:
        gw.close()


def test_the_router_serves_the_page_without_a_key_and_keeps_the_data_admin_only():
    from serve_app.config import hash_key, parse_app_config
    from serve_app.router import Router

    keys = [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}, {"name": "app", "sha256": hash_key("sk-app")}]
    cfg = parse_app_config({"gateway": {"api_keys": keys},
                            "models": [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"}]})
    c = TestClient(Router(cfg.gateway, cfg.models, {}).__serve_build_asgi_app__(), raise_server_exceptions=False)
    page = c.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "fetch(\"v1/status\"" in page.text and "connect-src 'self'" in page.headers["content-security-policy"]
    # no CDN, no remote asset: the one URL is SVG's namespace, a name that is never fetched
    assert "<script src" not in page.text and re.findall(r"https?://[^\"' ]+", page.text.split("<script>")[1]) == [
        "http://www.w3.org/2000/svg"]
    assert c.get("/v1/status").status_code == 401
    assert c.get("/v1/status", headers={"authorization": "Bearer sk-app"}).status_code == 403
    assert json.loads(c.get("/v1/status", headers={"authorization": "Bearer sk-ops"}).text)["models"]["chat"]
