"""Router logic against fake handles: request parsing, error shapes, streaming, shaping."""

from __future__ import annotations

import json
import time

import pytest
from starlette.responses import Response
from starlette.testclient import TestClient

from serve_app.config import AppConfig
from serve_app.router import Router
from tests.fakes import FakeModel

CFG = AppConfig.model_validate({
    "gateway": {"max_body_bytes": 4096},
    "models": [
        {"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"},
        {"name": "rr", "kind": "rerank", "engine": "transformers", "source": "org/rr"},
        {"name": "emb", "kind": "embed", "engine": "transformers", "source": "org/emb"},
    ],
})


def make_client(**fakes: FakeModel) -> tuple[TestClient, dict[str, FakeModel]]:
    handles = {"chat": FakeModel("chat", "llm"), "rr": FakeModel("rr", "rerank"), "emb": FakeModel("emb", "embed")}
    handles.update(fakes)
    router = Router(CFG.gateway, CFG.models, handles)
    return TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False), handles


@pytest.fixture
def client() -> TestClient:
    return make_client()[0]


def chat(**kw):
    return {"model": "chat", "messages": [{"role": "user", "content": "hello big world"}], **kw}


def assert_error(r, status: int, *, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["request_id"] == r.headers["x-request-id"]
    if param is not None:
        assert err["param"] == param
    assert contains in err["message"]
    return err


def test_chat_non_streaming_shape(client):
    r = client.post("/v1/chat/completions", json=chat(max_tokens=8))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello big world"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert r.headers["x-served-replica"] == "fake-replica"


def test_request_id_is_echoed_or_generated(client):
    r = client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "abc-123"})
    assert r.json()["id"] == "chatcmpl-abc-123"
    r2 = client.get("/health")
    assert len(r2.headers["x-request-id"]) >= 16


def test_chat_streaming_yields_every_token_then_done(client):
    r = client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    events = [line[len("data: "):] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello big world"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_completion_stream_and_plain(client):
    r = client.post("/v1/completions", json={"model": "chat", "prompt": "a b", "stream": True})
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "a b"
    r = client.post("/v1/completions", json={"model": "chat", "prompt": ["a b"]})
    assert r.json()["choices"][0]["text"] == "a b"


def test_stream_error_before_first_token_gets_a_real_status():
    from serve_app.errors import InvalidRequest

    c, _ = make_client(chat=FakeModel("chat", "llm", fail=InvalidRequest("too long", "max_tokens")))
    assert_error(c.post("/v1/chat/completions", json=chat(stream=True)), 400, param="max_tokens")


@pytest.mark.parametrize("body,param", [
    ({"model": "chat"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    (chat(n=0), "n"),
    (chat(n=17), "n"),  # protection: vLLM itself would run any n
    (chat(messages=[]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(stream="maybe"), "stream"),
])
def test_what_the_router_reads_of_a_chat_body_is_checked_there(client, body, param):
    """Everything else (sampling ranges, tools, roles, unknown fields) is checked by vLLM's own
    protocol in the replica: tests/e2e/test_default_app.py."""
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=param)


def test_the_body_reaches_the_replica_as_sent(client):
    c, handles = make_client()
    body = chat(tools=[{"type": "function", "function": {"name": "f"}}], logprobs=True, top_k=5, frobnicate=1)
    assert c.post("/v1/chat/completions", json=body).status_code == 200
    (api, sent, rid), = [args for name, args in handles["chat"].calls if name == "create"]
    assert api == "chat" and sent == body and rid


def test_malformed_bodies(client):
    assert_error(client.post("/v1/chat/completions", content=b"{not json"), 400, contains="not valid JSON")
    assert_error(client.post("/v1/chat/completions", content=b'{"model": "\xff"}'), 400, contains="UTF-8")
    assert_error(client.post("/v1/chat/completions", content=b"[1, 2]"), 400, contains="JSON object")
    assert_error(client.post("/v1/chat/completions", content=b"x" * 5000), 413)


def test_unknown_model_is_404_and_wrong_kind_is_400(client):
    err = assert_error(client.post("/v1/chat/completions", json=chat(model="nope")), 404, param="model")
    assert err["code"] == "model_not_found"
    assert_error(client.post("/v1/embeddings", json={"model": "chat", "input": "x"}), 400, param="model")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v2/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_engine_failure_is_500_in_error_shape_and_backpressure_is_503():
    from ray.serve.exceptions import BackPressureError  # Ray's own, as the handle raises it

    c, _ = make_client(chat=FakeModel("chat", "llm", fail=RuntimeError("boom")))
    err = assert_error(c.post("/v1/chat/completions", json=chat()), 500)
    assert "boom" not in err["message"]  # internals are logged, not leaked
    c, _ = make_client(rr=FakeModel("rr", "rerank", fail=BackPressureError(num_queued_requests=5, max_queued_requests=4)))
    app = c.app
    # Serve adds its own plain-text 503 handler for BackPressureError to the ingress app; ours must win.
    app.add_exception_handler(BackPressureError, lambda req, exc: Response("plain", status_code=503))
    r = c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a"]})
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"


def test_rerank_jina_shape_sorting_and_top_n(client):
    docs = ["red apple", {"text": "green apple pie"}, "blue sky"]
    r = client.post("/v1/rerank", json={"model": "rr", "query": "green apple", "documents": docs, "top_n": 2})
    body = r.json()
    assert [x["index"] for x in body["results"]] == [1, 0]
    assert body["results"][0]["document"] == {"text": "green apple pie"}
    assert body["usage"]["total_tokens"] == 7
    r = client.post("/rerank", json={"model": "rr", "query": "q", "documents": ["a"], "return_documents": False})
    assert "document" not in r.json()["results"][0]


def test_rerank_cohere_v2_shape(client):
    r = client.post("/v2/rerank", json={"model": "rr", "query": "green apple", "documents": ["x", "green"], "top_n": 1})
    body = r.json()
    assert body["results"] == [{"index": 1, "relevance_score": 0.5}]
    assert body["meta"]["api_version"]["version"] == "2"


@pytest.mark.parametrize("body", [
    {"model": "rr", "query": "q", "documents": []},
    {"model": "rr", "query": "", "documents": ["a"]},
    {"model": "rr", "query": "q", "documents": [1, 2]},
    {"model": "rr", "query": "q", "documents": ["a"], "top_n": -1},
])
def test_bad_rerank_requests(client, body):
    assert_error(client.post("/v1/rerank", json=body), 400)


def test_embeddings_shape(client):
    r = client.post("/v1/embeddings", json={"model": "emb", "input": ["ab", "abc"]})
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][1]["embedding"] == [3.0, 1.0]
    assert_error(client.post("/v1/embeddings", json={"model": "emb", "input": []}), 400, param="input")
    b64 = client.post("/v1/embeddings", json={"model": "emb", "input": ["abc"], "encoding_format": "base64"}).json()
    import base64
    import struct
    assert struct.unpack("<2f", base64.b64decode(b64["data"][0]["embedding"])) == (3.0, 1.0)


def test_models_and_ready(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["chat", "rr", "emb"]
    assert data[0]["max_model_len"] == 128  # from the replica's card, not the config
    assert client.get("/ready").json()["status"] == "ready"


def test_ready_is_503_when_a_model_has_no_live_replica():
    c, _ = make_client(emb=FakeModel("emb", "embed", fail=RuntimeError("dead")))
    r = c.get("/ready")
    assert r.status_code == 503
    assert r.json()["models"]["emb"]["ready"] is False
    assert r.json()["models"]["chat"]["ready"] is True


@pytest.mark.parametrize("busy", ["queue full", "no slot in time"])
def test_ready_names_a_saturated_model_and_stays_ready_while_serve_runs_its_replicas(monkeypatch, busy):
    """A full queue is a busy model, not a dead one: /ready answers within its timeout, 200, and
    names the model; only with no running replica is it not ready."""
    from serve_app.errors import Overloaded
    from serve_app.handlers import admin

    monkeypatch.setattr(admin, "READY_TIMEOUT_S", 0.2)
    running = {"n": 2}

    async def running_replicas(deployment: str) -> int:
        assert deployment == CFG.models[2].deployment_name  # emb's own deployment
        return running["n"]

    monkeypatch.setattr(admin, "running_replicas", running_replicas)
    emb = FakeModel("emb", "embed", fail=Overloaded("the model's queue is full; retry later")) if busy == "queue full" \
        else FakeModel("emb", "embed", delay=5)
    c, _ = make_client(emb=emb)
    t0 = time.monotonic()
    r = c.get("/ready")
    assert time.monotonic() - t0 < 2  # within the probe's timeout, not after the slow model
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["saturated"] == ["emb"]
    assert r.json()["models"]["emb"]["saturated"] is True and r.json()["models"]["emb"]["running_replicas"] == 2
    assert "saturated" not in r.json()["models"]["chat"]
    running["n"] = 0  # Serve runs none of its replicas: that is not ready
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["models"]["emb"]["ready"] is False


def test_tokenize_goes_to_the_named_llm_and_models_by_id(client):
    r = client.post("/tokenize", json={"model": "chat", "prompt": "a b c"})
    assert r.status_code == 200 and r.json()["count"] == 3 and r.headers["x-served-replica"] == "fake-replica"
    assert_error(client.post("/tokenize", json={"model": "rr", "prompt": "x"}), 400, param="model")
    assert_error(client.post("/tokenize", json={"prompt": "x"}), 400, param="model")
    one = client.get("/v1/models/chat").json()
    assert one["id"] == "chat" and one["max_model_len"] == 128
    assert_error(client.get("/v1/models/nope"), 404, param="model")


def test_aliases_reach_the_model():
    cfg = AppConfig.model_validate({"models": [
        {"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat", "serving": {"aliases": ["gpt-4o-mini"]}}]})
    fake = FakeModel("chat", "llm")
    c = TestClient(Router(cfg.gateway, cfg.models, {"chat": fake}).__serve_build_asgi_app__())
    r = c.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"))
    assert r.status_code == 200 and r.headers["x-served-model"] == "chat"
    assert c.get("/v1/models").json()["data"][0]["aliases"] == ["gpt-4o-mini"]


def test_score_in_vllms_shape_one_to_many_and_pairwise(client):
    r = client.post("/v1/score", json={"model": "rr", "text_1": "green apple", "text_2": ["red apple", "green apple pie", "sky"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["data"][1]["score"] == 1.0 and body["object"] == "list"
    r = client.post("/score", json={"model": "rr", "queries": ["sky", "apple"], "documents": ["blue sky", "an apple"]})
    assert [d["score"] for d in r.json()["data"]] == [1.0, 1.0]
    assert_error(client.post("/v1/score", json={"model": "rr", "text_1": ["a", "b"], "text_2": ["x", "y", "z"]}), 400)
    assert_error(client.post("/v1/score", json={"model": "rr", "text_1": "a"}), 400)
    assert_error(client.post("/v1/score", json={"model": "chat", "text_1": "a", "text_2": "b"}), 400, param="model")
