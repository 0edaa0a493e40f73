"""Hostile input against the router's logic (fake handles) and the encoder replica's batch:
no 500 for a client's mistake, and no client's poison reaches anyone else's answer or the circuit."""

from __future__ import annotations

import asyncio
import collections
import types

import pytest
from starlette.testclient import TestClient

from serve_app.body import MAX_DEPTH
from serve_app.config import parse_app_config
from serve_app.errors import EngineFailure, from_exception
from serve_app.router import Router
from tests.fakes import FakeModel
from tests.test_router_unit import assert_error, chat, make_client


@pytest.fixture
def client() -> TestClient:
    return make_client()[0]


@pytest.mark.parametrize("raw,contains", [
    (b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "UTF-8"),
    (b'{"model": "chat", "temperature": NaN, "messages": []}', "not valid JSON"),
    (b'{"model": "chat", "temperature": Infinity, "messages": []}', "not valid JSON"),
    (b'{"model": "chat", "temperature": 1e999, "messages": []}', "infinity"),
    (b'{"model": "chat", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}", "not valid JSON"),  # past orjson's own limit
    (b'{"model": "chat", "x": ' + b"[" * (MAX_DEPTH + 5) + b"]" * (MAX_DEPTH + 5) + b"}", "levels deep"),
    (b"", "empty"),
    (b"   ", "empty"),
    (b'"just a string"', "JSON object"),
])
def test_bodies_that_crash_parsers_are_400_naming_the_problem(client, raw, contains):
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v2/rerank"):
        assert_error(client.post(route, content=raw), 400, contains=contains)


def test_a_body_without_content_length_is_cut_off_at_the_limit(client):
    sent = []

    def chunks():
        for _ in range(100):  # 100 KiB against a 4 KiB limit
            sent.append(1)
            yield b" " * 1024

    r = client.post("/v1/chat/completions", content=chunks())
    assert_error(r, 413, contains="exceeds the limit")
    assert "content-length" not in r.request.headers


def test_an_integer_beyond_64_bits_is_a_400_naming_it(client):
    assert_error(client.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a"], "top_n": 2**64}), 400,
                 param="top_n")


def test_an_invalid_request_id_is_refused_and_no_other_id_is_invented(client):
    r = client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "bad id with spaces"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "X-Request-ID" and "request_id" not in err
    assert "x-request-id" not in r.headers  # the ingress echoes the client's; we add none of ours
    ok = client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "trace/2026:abc"})
    assert ok.status_code == 200 and ok.json()["id"] == "chatcmpl-trace/2026:abc"


class PoisonOn(FakeModel):
    """Fails (as an engine error) on any input holding `marker`; serves everything else and its probe."""

    def __init__(self, *a, marker: str = "poison", **kw) -> None:
        super().__init__(*a, **kw)
        self.marker = marker

    async def _do_embed(self, req):
        if any(self.marker in t for t in req.inputs):
            raise EngineFailure("tokenizer crashed")
        return await super()._do_embed(req)


def test_poison_from_one_client_is_its_own_400_and_never_opens_the_circuit():
    c, handles = make_client(emb=PoisonOn("emb", "embed"))
    router_breaker = c.app  # noqa: F841 - keep the app alive
    for _ in range(12):  # more than breaker_failures (5), sent back to back
        err = assert_error(c.post("/v1/embeddings", json={"model": "emb", "input": ["ok", "poison"]}), 400)
        assert err["code"] == "input_failed"
        assert c.post("/v1/embeddings", json={"model": "emb", "input": ["clean"]}).status_code == 200
    calls = [n for n, _ in handles["emb"].calls]
    assert calls.count("probe") == 12  # each poison request: tried twice, then the probe said "healthy"


def test_a_model_that_fails_its_probe_too_is_sick_and_its_circuit_opens():
    cfg = parse_app_config({"gateway": {"breaker_failures": 2, "breaker_cooldown_s": 60},
                            "models": [{"name": "emb", "kind": "embed", "engine": "transformers", "source": "o/e"}]})
    sick = FakeModel("emb", "embed", fail=EngineFailure("CUDA error"))
    router = Router(cfg.gateway, cfg.models, {"emb": sick})
    c = TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False)
    for _ in range(2):
        assert_error(c.post("/v1/embeddings", json={"model": "emb", "input": ["x"]}), 500)
    assert router.dispatch.breakers["emb"].state == "open"
    assert_error(c.post("/v1/embeddings", json={"model": "emb", "input": ["x"]}), 503, contains="circuit is open")


def test_ray_failures_are_mapped_by_type():
    from ray import exceptions as rx
    from ray.serve import exceptions as sx
    from ray.serve._private.common import DeploymentID

    from serve_app.errors import InvalidRequest, Overloaded, ReplicaFailed, ServiceUnavailable

    full = from_exception(sx.BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=3.0))
    assert isinstance(full, Overloaded) and full.status == 503 and full.retry_after == 3
    gone = from_exception(sx.DeploymentUnavailableError(DeploymentID(name="d", app_name="a")))
    assert type(gone) is ServiceUnavailable and gone.code == "model_unavailable"
    assert isinstance(from_exception(rx.ActorDiedError()), ReplicaFailed)
    assert isinstance(from_exception(rx.ActorUnavailableError("gone", None)), ReplicaFailed)
    assert isinstance(from_exception(rx.WorkerCrashedError()), ReplicaFailed)
    ours = InvalidRequest("bad", "documents.3")
    assert from_exception(rx.RayTaskError("rerank", "tb", ours)) is ours
    engine = from_exception(rx.RayTaskError("rerank", "tb", RuntimeError("boom")).as_instanceof_cause())
    assert isinstance(engine, EngineFailure) and "RuntimeError" in engine.message and "boom" not in engine.message


# --- the encoder replica's shared batch ---

@pytest.fixture
def outside_serve(monkeypatch):
    """`@serve.batch` runs in plain asyncio except one start-up warning that asks Serve's context."""
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)

def _embedder(forward):
    """An EmbedderServer without Serve or a model: `forward(texts)` stands in for the engine."""
    from deployments.embedder import EmbedderServer
    from deployments.health import HealthMonitor
    from deployments.protocol import ReplicaInfo
    from serve_app.config import HealthSettings

    server = EmbedderServer.__new__(EmbedderServer)
    server.cfg = types.SimpleNamespace(name="emb")
    server.engine = types.SimpleNamespace(embed=forward)
    server.replica = ReplicaInfo("emb", "r1", "n1", "127.0.0.1")
    server.largest_batch, server.forward_passes, server.recent_batches, server.fault = 0, 0, collections.deque(), None
    server.health = HealthMonitor(HealthSettings())
    server._batched.set_max_batch_size(16)
    server._batched.set_batch_wait_timeout_s(0.05)
    return server


def test_a_poison_input_in_a_shared_batch_fails_only_its_own_request(outside_serve):
    """Serve's batch queue is per class (one replica per process), so both phases share one loop."""
    from deployments.engines.base import Scored
    from deployments.protocol import EmbedRequest
    from serve_app.errors import InputFailed

    batches, broken = [], [False]

    def forward(texts):
        batches.append(list(texts))
        if broken[0]:
            raise RuntimeError("CUDA error: device-side assert triggered")
        if any("\u2620" in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[...]")
        return [Scored([float(len(t))], 1, False) for t in texts]

    server = _embedder(forward)

    async def scenario():
        poisoned = await asyncio.gather(
            server.embed(EmbedRequest("a", ["alpha", "beta"])),
            server.embed(EmbedRequest("b", ["ok", "\u2620"])),
            server.embed(EmbedRequest("c", ["gamma"])),
            return_exceptions=True,
        )
        broken[0] = True  # now the engine itself fails, whatever the input
        sick = await asyncio.gather(server.embed(EmbedRequest("d", ["x"])), server.embed(EmbedRequest("e", ["y"])),
                                    return_exceptions=True)
        return poisoned, sick

    (a, b, c), sick = asyncio.run(scenario())
    assert len(batches[0]) == 5  # one shared forward pass first
    assert a.vectors == [[5.0], [4.0]] and c.vectors == [[5.0]]
    assert isinstance(b, InputFailed) and b.param == "input.1" and "TypeError" in b.message
    # every input failing alone too is the engine's error for all (the router's second look and
    # the probe then call the model sick)
    assert all(isinstance(r, RuntimeError) and not isinstance(r, InputFailed) for r in sick)


# --- the status view forgets the dead ---

def test_status_rows_show_gone_replicas_then_drop_them(monkeypatch):
    from serve_app import status

    calls = []

    async def board_call(app, method, *args):
        calls.append((method, args))

    monkeypatch.setattr(status, "_board_call", board_call)
    model = parse_app_config({"models": [{"name": "m", "kind": "embed", "engine": "transformers", "source": "o/m"}]}).models[0]
    now = 1000.0
    reported = {
        "alive": {"replica_id": "alive", "reported_at": now - 1, "last_probe_ok": True},
        "dead": {"replica_id": "dead", "reported_at": now - 500},
        "long-dead": {"replica_id": "long-dead", "reported_at": now - 900, "gone_at": now - 400},
    }
    dep = {"replicas": {"alive": {"state": "RUNNING"}, "new": {"state": "STARTING", "node_id": "n2", "node_ip": "10.0.0.2"}}}
    rows = asyncio.run(status._replicas("app", "m", model, dep, reported, 300.0, now))
    by_id = {r["replica_id"]: r for r in rows}
    assert by_id["alive"]["state"] == "reporting" and by_id["alive"]["serve_state"] == "RUNNING"
    assert by_id["dead"]["state"] == "gone" and by_id["dead"]["gone_at"] == now and by_id["dead"]["in_flight"] == 0
    assert "long-dead" not in by_id  # past the retention: dropped from the view and the board
    assert by_id["new"]["state"] == "starting"
    assert ("mark_gone", ("m", "dead", now)) in calls and ("forget", ("m", "long-dead")) in calls
    # Serve cannot be asked: no replica is claimed live, silent or gone
    unknown = asyncio.run(status._replicas("app", "m", model, None, reported, 300.0, now))
    assert {r["state"] for r in unknown} == {"unknown"}
