"""Protection logic of the router against fake handles: keys, quotas, deadlines, long lists."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from serve_app.config import AppConfig, hash_key
from serve_app.fanout import plan_chunks
from serve_app.router import Router
from tests.fakes import FakeModel
from tests.test_router_unit import assert_error

MODELS = [
    {"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"},
    {"name": "rr", "kind": "rerank", "engine": "transformers", "source": "org/rr", "batching": {"max_batch_size": 8}},
]
KEYS = [
    {"name": "app", "sha256": hash_key("sk-app"), "requests_per_minute": 3},
    {"name": "ops", "sha256": hash_key("sk-ops"), "admin": True},
    {"name": "small", "sha256": hash_key("sk-small"), "tokens_per_minute": 40},
]


def client(gateway: dict | None = None, **fakes: FakeModel) -> tuple[TestClient, dict]:
    cfg = AppConfig.model_validate({"gateway": gateway or {}, "models": MODELS})
    handles = {"chat": FakeModel("chat", "llm"), "rr": FakeModel("rr", "rerank"), **fakes}
    return TestClient(Router(cfg.gateway, cfg.models, handles).__serve_build_asgi_app__(), raise_server_exceptions=False), handles


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def test_keys_are_required_when_configured():
    c, _ = client({"api_keys": KEYS})
    assert_error(c.post("/v1/chat/completions", json=CHAT), 401, contains="Bearer")
    assert_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-wrong")), 401)
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-app")).status_code == 200
    assert c.get("/v1/models").status_code == 401


def test_health_and_ready_stay_open_but_ready_details_need_admin():
    c, _ = client({"api_keys": KEYS})
    assert c.get("/health").status_code == 200
    assert c.get("/ready").json() == {"status": "ready"}
    assert "models" not in c.get("/ready", headers=bearer("sk-app")).json()
    assert set(c.get("/ready", headers=bearer("sk-ops")).json()["models"]) == {"chat", "rr"}


def test_requests_per_minute_quota_is_429_with_retry_after():
    c, _ = client({"api_keys": KEYS})
    for _ in range(3):
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-app")).status_code == 200
    r = c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-app"))
    assert_error(r, 429, contains="requests per minute")
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-ops")).status_code == 200  # per key


def test_tokens_per_minute_quota_counts_estimated_tokens():
    c, _ = client({"api_keys": KEYS})
    small = {**CHAT, "max_tokens": 15}  # ~2 prompt tokens + 15
    assert c.post("/v1/chat/completions", json=small, headers=bearer("sk-small")).status_code == 200
    assert c.post("/v1/chat/completions", json=small, headers=bearer("sk-small")).status_code == 200
    assert_error(c.post("/v1/chat/completions", json=small, headers=bearer("sk-small")), 429, contains="tokens")
    huge = {**CHAT, "max_tokens": 500}
    assert_error(c.post("/v1/chat/completions", json=huge, headers=bearer("sk-small")), 429, contains="whole quota")


def test_keys_from_env_are_hashed_at_start(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "ci=sk-ci,root=sk-root:admin")
    c, _ = client({"api_keys_env": "TEST_KEYS"})
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-ci")).status_code == 200
    assert "models" in c.get("/ready", headers=bearer("sk-root")).json()
    assert_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("ci")), 401)


def test_deadline_is_504_and_cancels_the_replica_call():
    slow = FakeModel("chat", "llm", delay=2.0)
    c, _ = client({"request_timeout_s": 0.2}, chat=slow)
    err = assert_error(c.post("/v1/chat/completions", json=CHAT), 504)
    assert err["type"] == "timeout_error"
    assert [r.cancelled for r in slow.responses] == [True]  # the replica's work was cancelled
    assert_error(c.post("/v1/chat/completions", json={**CHAT, "stream": True}), 504)
    assert [s.cancelled for s in slow.streams] == [True]


def test_long_list_is_split_across_calls_and_merged_in_order():
    c, handles = client({"rerank_max_parallel_chunks": 4})
    docs = [f"doc {i}" for i in range(100)]
    docs[77] = "green apple pie"
    r = c.post("/v1/rerank", json={"model": "rr", "query": "green apple", "documents": docs, "top_n": 3})
    assert r.status_code == 200
    calls = [args[0] for name, args in handles["rr"].calls if name == "rerank"]
    assert [(q.offset, len(q.documents)) for q in calls] == [(0, 25), (25, 25), (50, 25), (75, 25)]
    assert r.json()["results"][0] == {"index": 77, "relevance_score": 1.0, "document": {"text": "green apple pie"}}
    assert len(r.json()["results"]) == 3


def test_fan_out_never_exceeds_what_the_model_runs_at_once():
    models = [MODELS[0], {**MODELS[1], "deployment": {"num_replicas": 1, "max_ongoing_requests": 2}}]
    cfg = AppConfig.model_validate({"gateway": {"rerank_max_parallel_chunks": 8}, "models": models})
    handles = {"chat": FakeModel("chat", "llm"), "rr": FakeModel("rr", "rerank")}
    c = TestClient(Router(cfg.gateway, cfg.models, handles).__serve_build_asgi_app__())
    assert c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"] * 100}).status_code == 200
    assert len([1 for name, _ in handles["rr"].calls if name == "rerank"]) == 2


def test_short_lists_stay_in_one_batch_sized_call():
    assert plan_chunks(5, 8, 4) == [(0, 5)]
    assert plan_chunks(20, 8, 4) == [(0, 8), (8, 16), (16, 20)]
    assert plan_chunks(10_000, 32, 8)[-1] == (8750, 10_000)


def test_document_cap_is_413_and_rerank_options_reach_the_replica():
    c, handles = client({"max_documents": 10})
    assert_error(c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"] * 11}), 413, param="documents")
    c.post("/v2/rerank", json={"model": "rr", "query": "q", "documents": ["d"], "max_tokens_per_doc": 7})
    c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"], "truncate": False})
    sent = [args[0] for name, args in handles["rr"].calls if name == "rerank"]
    assert (sent[0].max_tokens_per_doc, sent[0].truncate) == (7, True)
    assert (sent[1].max_tokens_per_doc, sent[1].truncate) == (None, False)


def test_a_failing_chunk_cancels_its_siblings():
    import asyncio

    from serve_app.errors import InvalidRequest

    class FirstChunkBad(FakeModel):
        async def _do_rerank(self, req):
            if req.offset == 0:
                raise InvalidRequest("documents[3] has 900 tokens", "documents.3")
            await asyncio.sleep(30)

    c, handles = client({"rerank_max_parallel_chunks": 4}, rr=FirstChunkBad("rr", "rerank"))
    assert_error(c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"] * 40}), 400, param="documents.3")
    responses = handles["rr"].responses
    assert responses[0]._task.done() and [r.cancelled for r in responses[1:]] == [True] * 3  # none left running


@pytest.mark.parametrize("top_n", [0, -1])
def test_bad_top_n(top_n):
    c, _ = client()
    assert_error(c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["d"], "top_n": top_n}), 400, param="top_n")


def test_huge_top_n_returns_everything():
    c, _ = client()
    r = c.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a", "b"], "top_n": 10**9})
    assert len(r.json()["results"]) == 2
