"""Retries, fallbacks and the circuit breaker, against fake handles."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from serve_app.config import parse_app_config
from serve_app.errors import ContextLengthExceeded, EngineFailure, InvalidRequest, Overloaded, ReplicaFailed
from serve_app.resilience import CircuitBreaker
from serve_app.router import Router
from tests.fakes import FakeModel
from tests.test_router_unit import assert_error

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def client(primary: FakeModel, *, backup: FakeModel | None = None, big: FakeModel | None = None, **gateway):
    models = [
        {"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat", "fallbacks": ["backup"],
         "context_window_fallbacks": ["big"]},
        {"name": "backup", "kind": "llm", "engine": "vllm", "source": "org/backup"},
        {"name": "big", "kind": "llm", "engine": "vllm", "source": "org/big"},
    ]
    cfg = parse_app_config({"gateway": {"retry_backoff_s": 0, **gateway}, "models": models})
    handles = {"chat": primary, "backup": backup or FakeModel("backup", "llm"), "big": big or FakeModel("big", "llm")}
    router = Router(cfg.gateway, cfg.models, handles)
    return TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False), router


def test_breaker_opens_after_n_failures_then_admits_one_trial():
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    b.failure("x")
    assert b.state == "closed" and b.acquire() is not None
    b.failure("y")
    assert b.state == "open" and b.acquire() is None
    now[0] = 11
    trial = b.acquire()
    assert b.state == "half_open" and trial.trial and b.acquire() is None  # exactly one trial
    b.failure("z", trial)
    assert b.state == "open"
    now[0] = 22
    assert b.acquire() is not None
    b.success()
    assert b.state == "closed" and b.snapshot()["consecutive_failures"] == 0


def test_only_the_trials_holder_can_release_it():
    now = [0.0]
    b = CircuitBreaker(failures=1, cooldown_s=10, clock=lambda: now[0])
    early = b.acquire()  # admitted while closed, still running when the circuit opens
    b.failure("x")
    now[0] = 11
    trial = b.acquire()
    b.release(early)  # the early request ends with a client error: it must not free the trial
    assert b.acquire() is None
    b.release(trial)
    assert b.acquire() is not None


def test_a_cancelled_trial_releases_the_half_open_state():
    """The trial request's client goes away while it waits on the model: the circuit must not
    stay refused on this router replica (it used to, until the replica restarted)."""
    import asyncio

    from serve_app.resilience import Dispatcher

    cfg = parse_app_config({"gateway": {"breaker_failures": 1, "breaker_cooldown_s": 0.01},
                            "models": [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"}]})

    async def scenario() -> None:
        async def no_replica_needed(name, left):
            return None

        d = Dispatcher(cfg.gateway, {m.name: m for m in cfg.models}, {"chat": FakeModel("chat", "llm")}, no_replica_needed)
        breaker = d.breakers["chat"]
        breaker.failure("boom")
        await asyncio.sleep(0.02)
        assert breaker.state == "half_open"
        hang = asyncio.Event()

        async def slow(handle, left):
            await hang.wait()

        task = asyncio.ensure_future(d.run("chat", slow))
        await asyncio.sleep(0.01)
        assert breaker.trial is not None and breaker.acquire() is None  # the trial is taken
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.trial is None and breaker.acquire() is not None

    asyncio.run(scenario())


def test_a_dead_replica_is_retried_and_the_client_never_sees_it():
    primary = FakeModel("chat", "llm", fail=ReplicaFailed("died"), fail_times=2)
    c, router = client(primary)
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert r.status_code == 200 and r.json()["model"] == "chat"
    assert [n for n, _ in primary.calls].count("create") == 3
    assert router.events[("retry", "chat")] == 2
    assert router.dispatch.breakers["chat"].state == "closed"  # a dead replica is not a sick model


def test_many_requests_failing_with_one_dead_replica_do_not_open_the_circuit():
    primary = FakeModel("chat", "llm", fail=ReplicaFailed("died"), fail_times=8)
    c, router = client(primary, breaker_failures=2, retry_attempts=10)
    for _ in range(4):
        assert c.post("/v1/chat/completions", json={"model": "chat", **CHAT}).json()["model"] == "chat"
    assert router.dispatch.breakers["chat"].state == "closed"


def test_full_queue_falls_back_at_once_and_says_who_answered():
    primary = FakeModel("chat", "llm", fail=Overloaded("full"))
    c, router = client(primary)
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert r.status_code == 200 and r.json()["model"] == "backup"
    assert r.headers["x-served-model"] == "backup"
    assert [n for n, _ in primary.calls].count("create") == 1  # no retry into a full queue
    assert router.dispatch.breakers["chat"].state == "closed"  # load is not sickness


def test_too_long_input_goes_to_the_context_window_fallback():
    primary = FakeModel("chat", "llm", fail=ContextLengthExceeded("prompt 9000 > 4096", "messages"))
    c, _ = client(primary)
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert r.status_code == 200 and r.json()["model"] == "big"


def test_client_mistakes_are_final_and_do_not_trip_the_circuit():
    primary = FakeModel("chat", "llm", fail=InvalidRequest("bad", "messages"))
    c, router = client(primary)
    for _ in range(10):
        assert_error(c.post("/v1/chat/completions", json={"model": "chat", **CHAT}), 400)
    assert [n for n, _ in primary.calls].count("create") == 10
    assert router.dispatch.breakers["chat"].state == "closed"


def test_repeated_engine_failures_open_the_circuit_and_traffic_moves_to_the_fallback():
    primary = FakeModel("chat", "llm", fail=EngineFailure("boom"))
    c, router = client(primary, breaker_failures=3, breaker_cooldown_s=60)
    for _ in range(6):
        r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT})
        assert r.status_code == 200 and r.json()["model"] == "backup"
    # each request: the call, its second look, then the probe fails too (a sick model); after 3
    # requests the circuit kept traffic away
    assert [n for n, _ in primary.calls].count("create") == 6
    assert [n for n, _ in primary.calls].count("probe") == 3
    snap = router.dispatch.breakers["chat"].snapshot()
    assert snap["state"] == "open" and snap["last_error"] == "boom"


def test_everything_down_is_a_clear_503():
    c, _ = client(FakeModel("chat", "llm", fail=Overloaded("full")), backup=FakeModel("backup", "llm", fail=Overloaded("full")))
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert_error(r, 503)
    assert r.json()["error"]["code"] == "model_overloaded"


def test_stream_retries_before_the_first_token():
    primary = FakeModel("chat", "llm", fail=ReplicaFailed("died"), fail_times=1)
    c, _ = client(primary)
    r = c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT})
    assert r.status_code == 200
    chunks = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == "hello"


def test_stream_failing_mid_way_ends_with_an_error_event_carrying_the_request_id():
    class DiesMidStream(FakeModel):
        async def _do_create_stream(self, api, body, rid):
            from deployments.protocol import stream_item

            yield stream_item([json.dumps({"choices": [{"index": 0, "delta": {"content": "partial "}}]})], None, self.replica)
            raise ReplicaFailed("died mid-stream")

    c, _ = client(DiesMidStream("chat", "llm"))
    r = c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT}, headers={"x-request-id": "rid-77"})
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["request_id"] == "rid-77" and err["code"] == "replica_failed"


def test_a_router_reads_the_stream_items_of_an_llm_replica_not_yet_updated():
    """Rolling update: the router (seconds) is new before the LLM replicas (minutes), which still
    send the old dataclass item."""
    from deployments.protocol import OpenAIChunk, as_stream_item

    class OldReplica(FakeModel):
        async def _do_create_stream(self, api, body, rid):
            async for item in super()._do_create_stream(api, body, rid):
                events, usage = item[0], item[1]
                yield OpenAIChunk(events, usage, self.replica)

    c, _ = client(OldReplica("chat", "llm"))
    r = c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT})
    chunks = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert r.status_code == 200 and "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == "hello"
    assert as_stream_item((["e"], None)) == (["e"], None)


def test_fallbacks_must_be_models_of_the_same_kind():
    from serve_app.config import ConfigError

    with pytest.raises(ConfigError, match="is a rerank model"):
        parse_app_config({"models": [
            {"name": "a", "kind": "llm", "engine": "vllm", "source": "o/a", "fallbacks": ["r"]},
            {"name": "r", "kind": "rerank", "engine": "transformers", "source": "o/r"}]})
    with pytest.raises(ConfigError, match="not another model"):
        parse_app_config({"models": [{"name": "a", "kind": "llm", "engine": "vllm", "source": "o/a", "fallbacks": ["a"]}]})


def test_status_view_is_admin_only_and_shows_circuits():
    from serve_app.config import hash_key

    models = [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"}]
    keys = [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}, {"name": "app", "sha256": hash_key("sk-app")}]
    cfg = parse_app_config({"gateway": {"api_keys": keys, "breaker_failures": 1}, "models": models})
    fake = FakeModel("chat", "llm", fail=EngineFailure("boom"))
    c = TestClient(Router(cfg.gateway, cfg.models, {"chat": fake}).__serve_build_asgi_app__(), raise_server_exceptions=False)
    assert_error(c.get("/v1/status", headers={"authorization": "Bearer sk-app"}), 403)
    c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"authorization": "Bearer sk-app"})
    view = c.get("/v1/status", headers={"authorization": "Bearer sk-ops"}).json()
    assert view["models"]["chat"]["circuit"]["state"] == "open"
    assert view["models"]["chat"]["circuit"]["last_error"] == "boom"

    from serve_app.cli import render_status

    view["models"]["chat"]["replicas"] = [{"replica_id": "abc123", "state": "silent", "node_id": "n" * 40, "node_ip": "10.0.0.7",
                                           "in_flight": 2, "last_probe_ms": 12.5, "last_probe_ok": False,
                                           "last_error": "stalled: 2 request(s) in flight", "last_error_at": 1.0}]
    table = render_status(view)
    assert "circuit: open" in table and "abc123" in table and "10.0.0.7" in table and "12ms FAIL" in table and "stalled" in table
    assert view["batches"] == {"store": view["batches"]["store"], "batches": []} and "sqlite" in view["batches"]["store"]
    view["batches"]["batches"] = [{"id": "batch_x1", "owner": "ops", "endpoint": "/v1/embeddings", "status": "in_progress",
                                   "completed": 7, "failed": 1, "pending": 40, "running": 2, "lines_per_s": 3.5, "eta_s": 12}]
    table = render_status(view)
    assert "batch store: sqlite" in table and "batch_x1" in table and "in_progress" in table and "12s" in table


def test_metrics_count_requests_tokens_retries_and_rejections():
    from collections import Counter as Tally

    from serve_app.metrics import RouterMetrics

    recorded: Tally = Tally()

    class Mem:
        def __init__(self, name):
            self.name = name

        def inc(self, value=1.0, tags=None):
            recorded[(self.name, tuple(sorted((tags or {}).items())))] += value

        def observe(self, value, tags=None):
            recorded[(self.name + ":count", tuple(sorted((tags or {}).items())))] += 1

    metrics = RouterMetrics(factory=lambda kind, name, desc, tags: Mem(name))
    models = [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"}]
    cfg = parse_app_config({"gateway": {"retry_backoff_s": 0}, "models": models})
    fake = FakeModel("chat", "llm", fail=ReplicaFailed("died"), fail_times=1)
    c = TestClient(Router(cfg.gateway, cfg.models, {"chat": fake}, metrics=metrics).__serve_build_asgi_app__(),
                   raise_server_exceptions=False)
    assert c.post("/v1/chat/completions", json={"model": "chat", **CHAT}).status_code == 200
    assert c.post("/v1/chat/completions", json={"model": "nope", **CHAT}).status_code == 404
    route = "/v1/chat/completions"
    assert recorded[("serve_app_requests", (("model", "chat"), ("route", route), ("status", "200")))] == 1
    assert recorded[("serve_app_requests", (("model", "-"), ("route", route), ("status", "404")))] == 1
    assert recorded[("serve_app_retries", (("model", "chat"),))] == 1
    assert recorded[("serve_app_tokens", (("model", "chat"), ("type", "prompt")))] == 3
    assert recorded[("serve_app_request_latency_ms:count", (("model", "chat"), ("route", route)))] == 1


def test_grafana_dashboard_charts_only_metrics_we_export():
    import pathlib
    import re

    from serve_app.metrics import EXPORTED_ELSEWHERE, RouterMetrics

    names = list(EXPORTED_ELSEWHERE)  # the autoscaler's (Serve controller) and the LLM replicas' own
    RouterMetrics(factory=lambda kind, name, desc, tags: names.append(name) or type("M", (), {"inc": None, "observe": None, "set": None})())
    dash = json.loads((pathlib.Path(__file__).resolve().parents[1] / "docs" / "grafana" / "serve_app.json").read_text())
    ours = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_(serve_app_\w+?)(?:_total|_bucket)?\b", t["expr"])}
    assert ours and ours <= set(names), ours - set(names)
    assert set(names) - {"serve_app_circuit_rejections"} <= ours | {"serve_app_circuit_rejections"}


def test_a_split_rerank_list_is_never_scored_by_two_models():
    class FullOnce(FakeModel):
        """The primary's queue is full for one chunk only."""

        async def _do_rerank(self, req):
            if req.offset == 8 and not getattr(self, "refused", False):
                self.refused = True
                raise Overloaded("full")
            return await super()._do_rerank(req)

    models = [
        {"name": "rr", "kind": "rerank", "engine": "transformers", "source": "o/rr", "fallbacks": ["rr2"],
         "batching": {"max_batch_size": 8}},
        {"name": "rr2", "kind": "rerank", "engine": "transformers", "source": "o/rr2", "batching": {"max_batch_size": 8}},
    ]
    cfg = parse_app_config({"gateway": {"retry_backoff_s": 0, "rerank_max_parallel_chunks": 4}, "models": models})
    primary, backup = FullOnce("rr", "rerank"), FakeModel("rr2", "rerank")
    c = TestClient(Router(cfg.gateway, cfg.models, {"rr": primary, "rr2": backup}).__serve_build_asgi_app__())
    r = c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": [f"d{i}" for i in range(24)]})
    assert r.status_code == 200 and r.json()["model"] == "rr2"
    # the fallback first took the refused chunk (8), then rescored every chunk so one model ranks all
    assert sorted(args[0].offset for name, args in backup.calls if name == "rerank") == [0, 8, 8, 16]
