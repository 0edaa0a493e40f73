"""Request stories (serve_app/stories.py): what the router records of each request, the bounded
book, and GET /v1/requests/{id}, through the real router app over fake handles."""

from __future__ import annotations

import json

from serve_app.config import parse_app_config
from serve_app.errors import EngineFailure, Overloaded, ReplicaFailed, dead_replica
from serve_app.stories import StoriesConfig, StoryBook, encode, merge
from tests.browser import needs_chromium
from tests.fakes import FakeModel
from tests.test_resilience_unit import CHAT, client
from tests.test_router_unit import assert_error

RAY_DEATH = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:default:chat\n"
             "\tactor_id: 8c3e\n\tpid: 4242\n\tname: SERVE_REPLICA::default#chat#k2x9q1\n\tnamespace: serve\n\tip: 10.0.0.7\n")


def story(c, rid: str, **headers) -> dict:
    r = c.get(f"/v1/requests/{rid}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_retried_request_tells_both_attempts_and_the_dead_replica():
    dead = ReplicaFailed("died")
    dead.replica = dead_replica(RAY_DEATH)
    c, _ = client(FakeModel("chat", "llm", fail=dead, fail_times=1))
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "req-retry-1"})
    assert r.status_code == 200
    s = story(c, "req-retry-1")
    assert s["id"] == "req-retry-1" and s["status"] == 200 and s["outcome"] == "ok" and s["path"] == "/v1/chat/completions"
    first, second = s["attempts"]
    assert first["outcome"] == "replica_failed" and first["replica"] == "k2x9q1" and first["node_ip"] == "10.0.0.7"
    assert second["outcome"] == "ok" and second["replica"] == "fake-replica" and second["node_id"] == "fake-node"
    assert s["retries"] == 1 and s["fallbacks"] == [] and s["model"] == "chat"
    assert s["admission"]["decision"] == "admitted" and s["usage"]["prompt_tokens"] > 0
    assert s["router"]["replica_id"] == "local" and s["earlier"] == []


def test_a_fallback_shows_the_chain_and_a_failure_shows_the_error():
    c, _ = client(FakeModel("chat", "llm", fail=Overloaded("full")))
    c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "req-fb"})
    s = story(c, "req-fb")
    assert [a["model"] for a in s["attempts"]] == ["chat", "backup"] and s["fallbacks"] == ["backup"]
    assert s["attempts"][0]["outcome"] == "model_overloaded" and s["model"] == "backup"

    c, _ = client(FakeModel("chat", "llm", fail=EngineFailure("boom")), backup=FakeModel("backup", "llm", fail=Overloaded("full")))
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "req-bad"})
    s = story(c, "req-bad")
    assert s["status"] == r.status_code >= 500 and s["outcome"] == "failed"
    assert s["error"]["status"] == r.status_code and s["error"]["message"] == r.json()["error"]["message"]


def test_a_stream_cut_mid_way_is_failed_mid_stream():
    class Dying(FakeModel):
        async def _do_create_stream(self, api, body, rid):
            gen = super()._do_create_stream(api, body, rid)
            yield await gen.__anext__()
            raise ReplicaFailed("died mid-stream")

    c, _ = client(Dying("chat", "llm"))
    with c.stream("POST", "/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT},
                  headers={"x-request-id": "req-cut"}) as r:
        body = b"".join(r.iter_bytes()).decode()
    assert "replica_failed" in body
    s = story(c, "req-cut")
    assert s["stream"] and s["status"] == 200 and s["outcome"] == "failed_mid_stream"
    assert s["error"]["code"] == "replica_failed" and s["first_token_ms"] is not None


def test_unknown_id_is_404_and_reads_are_not_stories():
    c, _ = client(FakeModel("chat", "llm"))
    assert_error(c.get("/v1/requests/nope"), 404, param="request_id", contains="no request with id 'nope'")
    c.get("/v1/models", headers={"x-request-id": "a-read"})
    assert c.get("/v1/requests/a-read").status_code == 404


def test_stories_are_admin_only_and_name_the_key():
    from serve_app.config import hash_key

    keys = [{"name": "team-a", "sha256": hash_key("sk-a")}, {"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}]
    c, _ = client(FakeModel("chat", "llm"), api_keys=keys)
    c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"authorization": "Bearer sk-a", "x-request-id": "r-key"})
    assert_error(c.get("/v1/requests/r-key", headers={"authorization": "Bearer sk-a"}), 403)
    assert_error(c.get("/v1/requests/r-key"), 401)
    s = story(c, "r-key", authorization="Bearer sk-ops")
    assert s["key"] == "team-a"


def test_a_refused_admission_is_in_the_story():
    c, _ = client(FakeModel("chat", "llm"), api_keys=[{"name": "tiny", "sha256": _hash("sk-t"), "admin": True,
                                                         "max_concurrent_requests": 1, "tokens_per_minute": 10}])
    r = c.post("/v1/chat/completions", json={"model": "chat", **CHAT, "max_tokens": 500},
               headers={"authorization": "Bearer sk-t", "x-request-id": "r-429"})
    assert r.status_code == 429
    s = story(c, "r-429", authorization="Bearer sk-t")
    assert s["admission"]["decision"] == "refused" and s["status"] == 429 and s["attempts"] == []


def _hash(k: str) -> str:
    from serve_app.config import hash_key

    return hash_key(k)


def test_stories_can_be_turned_off():
    c, router = client(FakeModel("chat", "llm"), stories={"enabled": False})
    c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "off"})
    r = c.get("/v1/requests/off")
    assert r.status_code == 404 and "enabled is false" in r.json()["error"]["message"] and router.stories is None


def test_a_reused_id_answers_the_newest_with_the_earlier_ones():
    c, _ = client(FakeModel("chat", "llm"))
    for _ in range(2):
        c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "same"})
    s = story(c, "same")
    assert len(s["earlier"]) == 1 and s["earlier"][0]["arrived_at"] <= s["arrived_at"]


def test_the_book_is_bounded_by_count_and_age_and_keeps_failures_apart():
    now = [1000.0]
    book = StoryBook(StoriesConfig(keep=3, keep_failed=2, max_age_s=60, failed_max_age_s=600), clock=lambda: now[0])

    def add(rid: str, failed: bool = False) -> None:
        book.add(encode({"id": rid, "arrived_at": now[0], "status": 500 if failed else 200}), failed)

    add("bad", failed=True)
    for i in range(10):  # a flood of successes cannot push the failure out
        add(f"ok{i}")
    assert len(book) == 4 and book.find("bad") and not book.find("ok6") and book.find("ok9")
    now[0] += 61  # the recent ones age out first
    assert not book.find("ok9") and book.find("bad")
    now[0] += 600
    assert not book.find("bad") and len(book) == 0 and book.by_id == {}


def test_merge_keeps_each_story_once_preferring_a_finished_copy():
    a = {"id": "x", "arrived_at": 1.0, "router": {"replica_id": "r1"}, "status": 200, "duration_ms": None}  # still streaming
    b = {**a, "duration_ms": 900.0}
    c = {"id": "x", "arrived_at": 2.0, "router": {"replica_id": "r2"}, "status": 200, "duration_ms": 5.0}
    assert merge([a], [b, c]) == [c, b]


def test_dead_replica_reads_rays_message():
    assert dead_replica(RAY_DEATH) == {"replica": "k2x9q1", "node_ip": "10.0.0.7"}
    assert dead_replica("connection lost") is None
    # Serve's gRPC path: "The actor 035d... is unavailable": only the id, resolved when the story is read
    assert dead_replica("The actor 035d is unavailable: Actor is unavailable.", "035d") == {"actor_id": "035d"}


def test_stories_config_is_strict():
    import pytest

    from serve_app.config import ConfigError

    with pytest.raises((ConfigError, ValueError)):
        parse_app_config({"gateway": {"stories": {"keep": -1}}, "models": []})
    json.dumps(StoriesConfig().model_dump())


def test_trace_renders_the_story_and_finds_log_lines_in_order(tmp_path, monkeypatch):
    from serve_app import trace

    dead = ReplicaFailed("died")
    dead.replica = dead_replica(RAY_DEATH)
    c, _ = client(FakeModel("chat", "llm", fail=dead, fail_times=1))
    c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "req-t"})
    s = story(c, "req-t")
    serve = tmp_path / "serve"
    serve.mkdir()
    (serve / "replica_default_chat_b.log").write_text(
        json.dumps({"asctime": "2026-12-03 10:00:02,500", "request_id": "req-t", "message": "CALL create OK"}) + "\n"
        + json.dumps({"asctime": "2026-12-03 10:00:01,000", "request_id": "other", "message": "req-t in a message"}) + "\n"
        + json.dumps({"asctime": "2026-12-03 10:00:03,000", "request_id": "req-t-2", "message": "a longer id"}) + "\n")
    (serve / "replica_default_router_a.log").write_text("INFO 2026-12-03 10:00:00,100 router a req-t -- POST /v1/chat 200\n")
    monkeypatch.setattr(trace, "LOCAL_SESSION", tmp_path)
    lines, where = trace.log_lines("req-t", local_only=True)
    assert "this machine" in where

    def no_dashboard(request_id, address):
        raise ConnectionError("no dashboard")

    monkeypatch.setattr(trace, "_from_log_api", no_dashboard)  # the log API failing falls back to the same files
    assert trace.log_lines("req-t", "auto")[0] == lines
    assert [line.file for line in lines] == ["serve/replica_default_router_a.log", "serve/replica_default_chat_b.log",
                                            "serve/replica_default_chat_b.log"]
    assert [line.at for line in lines] == sorted(line.at for line in lines)
    text = trace.render(s, lines, where)
    assert "attempt 1 chat replica k2x9q1 on 10.0.0.7" in text and "-> replica_failed" in text
    assert "attempt 2 chat replica fake-replica" in text and "-> 200 (ok)" in text and "log lines (3" in text


def test_trace_reads_every_node_through_rays_log_api(monkeypatch):
    """The log API path, with ray.util.state's three calls faked (the e2e cluster runs without a
    dashboard, which costs ~1 GB here; `make up` has one)."""
    import types

    import ray.util.state as state

    from serve_app import trace

    nodes = [types.SimpleNamespace(node_id="n1", node_ip="10.0.0.1"), types.SimpleNamespace(node_id="n2", node_ip="10.0.0.2")]
    files = {"n1": {"serve": ["replica_x.log"]}, "n2": {"serve": ["serve/proxy_y.log"]}}
    content = {("n1", "serve/replica_x.log"): ["INFO 2026-12-03 10:00:02,000 a r", "id-9 done\nnoise\n"],
               ("n2", "serve/proxy_y.log"): ["INFO 2026-12-03 10:00:01,000 proxy id-9 POST\n"]}
    monkeypatch.setattr(state, "list_nodes", lambda **kw: nodes)
    monkeypatch.setattr(state, "list_logs", lambda address, node_id, glob_filter: files[node_id])
    monkeypatch.setattr(state, "get_log", lambda address, node_id, filename, tail: iter(content[(node_id, filename)]))
    lines, where = trace.log_lines("id-9", "10.0.0.1:6379")
    assert "log API" in where
    assert [(line.node, line.file) for line in lines] == [("10.0.0.2", "serve/proxy_y.log"), ("10.0.0.1", "serve/replica_x.log")]
    assert lines[1].text == "INFO 2026-12-03 10:00:02,000 a rid-9 done"  # joined across get_log's chunks


@needs_chromium
def test_the_status_pages_search_box_finds_a_request_in_a_real_browser(tmp_path):
    """/status's request-id box on the real router: log in with an admin key, find a request that
    was retried (both attempts, the dead replica named), then an unknown id; no console error."""
    from tests.browser import artifact, browser_page
    from tests.local_servers import ThreadedServer

    dead = ReplicaFailed("died")
    dead.replica = dead_replica(RAY_DEATH)
    c, _ = client(FakeModel("chat", "llm", fail=dead, fail_times=1), api_keys=[{"name": "ops", "sha256": _hash("sk-ops"), "admin": True}])
    assert c.post("/v1/chat/completions", json={"model": "chat", **CHAT},
                  headers={"authorization": "Bearer sk-ops", "x-request-id": "page-rid/7"}).status_code == 200
    server = ThreadedServer(c.app)
    try:
        with browser_page() as (page, requested, errors):
            page.goto(f"{server.url}/status")
            page.fill("#key", "sk-ops")
            page.click("#login button")
            page.fill("#rid", "page-rid/7")
            page.click("#find button")
            page.wait_for_selector("#story table")
            story_text = page.inner_text("#story")
            assert "request page-rid/7" in story_text and "200 ok" in story_text, story_text
            assert "k2x9q1" in story_text and "10.0.0.7" in story_text and "replica_failed" in story_text, story_text
            assert "fake-replica" in story_text and "retries 1" in story_text, story_text
            assert page.url.endswith("#request=page-rid%2F7")  # a link to this story
            page.fill("#rid", "no-such-id")
            page.click("#find button")
            page.wait_for_selector("#story .bad")
            assert "no request with id 'no-such-id' is kept" in page.inner_text("#story")
            page.fill("#rid", "page-rid/7")
            page.click("#find button")
            page.wait_for_selector("#story table")
            page.screenshot(path=artifact("status-request-story.png"), full_page=True)
            # Chromium logs each non-2xx fetch (the 401 before logging in, the unknown id's 404); no script error
            assert [e for e in errors if not e.startswith("Failed to load resource")] == [], errors
            assert requested and all(url.startswith(server.url) for url in requested), requested
    finally:
        server.close()
