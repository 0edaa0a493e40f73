"""Teams sharing one router (issue 14), on the memory store: live keys, per-key allow-lists,
expiry, in-flight limits, real token accounting and durable usage. Redis: test_tenancy_redis.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.testclient import TestClient

from deployments.protocol import EmbedResult
from serve_app.app import check_router, router_deployment
from serve_app.config import AppConfig, ConfigError, hash_key
from serve_app.metrics import RouterMetrics
from serve_app.router import Router
from tests.fakes import FakeModel
from tests.local_servers import ThreadedServer
from tests.test_router_unit import assert_error

MODELS = [
    {"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"},
    {"name": "emb", "kind": "embed", "engine": "transformers", "source": "org/emb"},
]
ADMIN = {"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
EMBED = {"model": "emb", "input": ["hi"]}


def key(name: str, secret: str, **extra) -> dict:
    return {"name": name, "sha256": hash_key(secret), **extra}


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def make_router(keys: list[dict], metrics: RouterMetrics | None = None, **fakes: FakeModel) -> Router:
    cfg = AppConfig.model_validate({"gateway": {"api_keys": keys}, "models": MODELS})
    handles = {"chat": FakeModel("chat", "llm"), "emb": FakeModel("emb", "embed"), **fakes}
    return Router(cfg.gateway, cfg.models, handles, metrics)


def client(router: Router) -> TestClient:
    return TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False)


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_APP_DATA_DIR", str(tmp_path))


# --- keys are live settings ---
def test_reconfigure_rotates_keys_in_place_and_the_name_keeps_its_budget():
    router = make_router([key("team-a", "sk-old", requests_per_minute=3), ADMIN])
    c = client(router)
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-old")).status_code == 200
    router.reconfigure({"api_keys": [key("team-a", "sk-new", requests_per_minute=3), ADMIN]})
    assert_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-old")), 401)
    codes = [c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-new")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # one of team-a's 3 was spent by the old secret


def test_bad_live_keys_are_refused_naming_the_field_and_the_old_keys_stay():
    router = make_router([ADMIN])
    with pytest.raises(ConfigError, match=r"api_keys\.0\.models: \['nope'\]"):
        router.reconfigure({"api_keys": [key("a", "sk-a", models=["nope"])]})
    with pytest.raises(ConfigError, match=r"api_keys\.0\.requests_per_minute"):
        router.reconfigure({"api_keys": [key("a", "sk-a", requests_per_minute=0)]})
    assert client(router).get("/v1/models", headers=bearer("sk-ops")).status_code == 200


def test_the_router_deployment_carries_the_keys_as_user_config():
    cfg = AppConfig.model_validate({"gateway": {"api_keys": [key("a", "sk-a", expires_at="2030-01-01T00:00:00")]}, "models": MODELS})
    user_config = router_deployment(cfg.gateway).user_config
    assert user_config == {"api_keys": [{"name": "a", "sha256": hash_key("sk-a"), "admin": False, "expires_at": "2030-01-01T00:00:00Z"}]}
    assert json.loads(json.dumps(user_config)) == user_config  # Serve ships it as JSON


# --- per key: allow-list, expiry, in-flight limit ---
def test_models_outside_the_allow_list_are_404_as_if_absent_and_not_listed():
    c = client(make_router([key("narrow", "sk-narrow", models=["chat"]), ADMIN]))
    hidden = c.post("/v1/embeddings", json=EMBED, headers=bearer("sk-narrow"))
    absent = c.post("/v1/embeddings", json={**EMBED, "model": "never-served"}, headers=bearer("sk-narrow"))
    assert_error(hidden, 404)
    assert hidden.json()["error"] | {"message": "", "request_id": ""} == absent.json()["error"] | {"message": "", "request_id": ""}
    assert hidden.json()["error"]["message"] == absent.json()["error"]["message"].replace("never-served", "emb")
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-narrow")).status_code == 200
    assert [m["id"] for m in c.get("/v1/models", headers=bearer("sk-narrow")).json()["data"]] == ["chat"]
    assert [m["id"] for m in c.get("/v1/models", headers=bearer("sk-ops")).json()["data"]] == ["chat", "emb"]


@pytest.mark.parametrize("expires_at", ["2001-01-01T00:00:00Z", 978307200])
def test_expired_keys_are_401(expires_at):
    c = client(make_router([key("old", "sk-old", expires_at=expires_at), key("later", "sk-later", expires_at=time.time() + 3600)]))
    err = assert_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-old")), 401, contains="key expired")
    assert err["code"] == "invalid_api_key"
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-later")).status_code == 200


def _scope(body: bytes, secret: str) -> dict:
    return {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"", "server": ("test", 80),
            "client": ("test", 1), "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {secret}".encode())]}


async def _call(app, body: dict, secret: str, hold: asyncio.Event | None = None) -> tuple[int, dict]:
    """One request straight through the ASGI app; with `hold`, the client stops reading after
    the first body chunk until it is set (a slow client in the middle of a stream)."""
    raw, sent, status = json.dumps(body).encode(), [], {}

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects

    async def send(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]
            status["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body" and hold is not None and message.get("more_body"):
            status["streaming"] = True
            await hold.wait()

    await app(_scope(raw, secret), receive, send)
    return status["code"], status["headers"]


def test_a_stream_the_client_leaves_is_charged_and_recorded_with_what_was_forwarded():
    """Leaving early is no way around quotas or /v1/usage: a client that reads the first tokens
    and disconnects is charged for the prompt and every token it was sent."""
    keys = [key("leaver", "sk-leave", tokens_per_minute=10_000), ADMIN]
    router = make_router(keys)
    app = router.__serve_build_asgi_app__()
    words = " ".join(f"w{i}" for i in range(40))
    body = {"model": "chat", "messages": [{"role": "user", "content": words}], "max_tokens": 64, "stream": True}
    raw, received, left = json.dumps(body).encode(), [], asyncio.Event()

    async def scenario():
        async def receive():
            if not received:
                received.append(b"")
                return {"type": "http.request", "body": raw, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                received.append(message["body"])
                if len(received) == 4:  # three blocks read, then the client is gone
                    left.set()
                    await asyncio.sleep(3600)  # its socket no longer drains

        await asyncio.wait_for(app(_scope(raw, "sk-leave"), receive, send), 10)
        # Settled when the response ended, not whenever the garbage collector finalizes the stream.
        return router.tenancy.usage.query(0, time.time() + 60, "leaver")

    rows = asyncio.run(scenario())
    events = b"".join(received).count(b"data: ")
    assert b"[DONE]" not in b"".join(received) and 3 <= events < 40  # it left mid-stream
    (row,) = rows
    assert row["requests"] == 1 and row["prompt_tokens"] >= 40 // 2  # the prompt's estimate
    assert events - 1 <= row["completion_tokens"] <= 40  # every token it was sent (role event aside), at most all


def test_forwarded_tokens_leave_out_one_role_event_per_chat_choice():
    from serve_app.handlers.llm import forwarded_tokens

    assert forwarded_tokens(10, "chat") == 9 and forwarded_tokens(10, "chat", 2) == 8 and forwarded_tokens(10, "completion", 2) == 10


def test_max_concurrent_requests_holds_a_slot_until_the_stream_ends():
    router = make_router([key("one", "sk-one", max_concurrent_requests=1)])
    app = router.__serve_build_asgi_app__()

    async def scenario():
        hold = asyncio.Event()
        streaming = asyncio.create_task(_call(app, {**CHAT, "stream": True}, "sk-one", hold))
        while router.tenancy.admission.store.run("t", lambda lim: lim.slots.in_flight("one")) == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the handler has long returned; the stream is still open
        refused = await _call(app, CHAT, "sk-one")
        hold.set()
        assert (await streaming)[0] == 200
        after = await _call(app, CHAT, "sk-one")
        return refused, after

    (code, headers), (after, _) = asyncio.run(scenario())
    assert code == 429 and int(headers["retry-after"]) >= 1
    assert after == 200


def test_a_refused_or_failed_request_gives_its_slot_back():
    router = make_router([key("one", "sk-one", max_concurrent_requests=1, tokens_per_minute=50)],
                         chat=FakeModel("chat", "llm", fail=RuntimeError("engine died")))
    c = client(router)
    assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-one")).status_code >= 500
    assert_error(c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500}, headers=bearer("sk-one")), 429, contains="whole quota")
    assert router.tenancy.admission.store.run("t", lambda lim: lim.slots.in_flight("one")) == 0


# --- real token accounting ---
class CountsMore(FakeModel):
    """The replica counts 60 prompt tokens where the router estimates one ("hi")."""

    async def _do_embed(self, req) -> EmbedResult:
        return EmbedResult([[1.0, 0.0] for _ in req.inputs], 60, 0, self.replica)


def test_real_tokens_above_the_estimate_are_charged_after_the_response():
    c = client(make_router([key("t", "sk-t", tokens_per_minute=100)], emb=CountsMore("emb", "embed")))
    codes = [c.post("/v1/embeddings", json=EMBED, headers=bearer("sk-t")).status_code for _ in range(3)]
    # estimates alone (1 token each) would admit 100; the real 60 + 40 (what was left) fill the window
    assert codes == [200, 200, 429]


def test_estimates_above_the_real_tokens_are_not_refunded():
    c = client(make_router([key("t", "sk-t", tokens_per_minute=40)]))
    body = {**CHAT, "max_tokens": 15}  # estimate ~3 + 15; the fake uses ~3 + 2
    codes = [c.post("/v1/chat/completions", json=body, headers=bearer("sk-t")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


# --- usage per key ---
def test_usage_per_key_and_model_matches_the_responses_and_survives_a_restart():
    keys = [key("team-a", "sk-a"), key("team-b", "sk-b"), ADMIN]
    c = client(make_router(keys))
    seen = {"team-a": [0, 0, 0], "team-b": [0, 0, 0]}
    for name, secret, path, body in [("team-a", "sk-a", "/v1/chat/completions", CHAT)] * 3 + [
            ("team-b", "sk-b", "/v1/embeddings", EMBED), ("team-b", "sk-b", "/v1/chat/completions", {**CHAT, "stream": True,
                                                                                                  "stream_options": {"include_usage": True}})]:
        r = c.post(path, json=body, headers=bearer(secret))
        assert r.status_code == 200
        use = r.json()["usage"] if not body.get("stream") else json.loads(r.text.split("data: ")[-2])["usage"]
        seen[name][0] += 1
        seen[name][1] += use["prompt_tokens"]
        seen[name][2] += use.get("completion_tokens", 0)
    r = c.get("/v1/usage", headers=bearer("sk-ops"))
    assert r.status_code == 200 and r.json()["object"] == "usage"
    got: dict[str, list[int]] = {}
    for row in r.json()["data"]:
        acc = got.setdefault(row["key"], [0, 0, 0])
        for i, f in enumerate(("requests", "prompt_tokens", "completion_tokens")):
            acc[i] += row[f]
    assert got == seen
    only_b = client(make_router(keys)).get("/v1/usage", params={"key": "team-b"}, headers=bearer("sk-ops")).json()["data"]
    assert {(row["key"], row["model"]) for row in only_b} == {("team-b", "emb"), ("team-b", "chat")}  # a new router reads it back


def test_usage_is_admin_only_and_its_query_is_strict():
    c = client(make_router([key("a", "sk-a"), ADMIN]))
    assert_error(c.get("/v1/usage", headers=bearer("sk-a")), 403)
    assert_error(c.get("/v1/usage"), 401)
    ops = bearer("sk-ops")
    assert_error(c.get("/v1/usage", params={"since": "yesterday"}, headers=ops), 400, param="since")
    assert_error(c.get("/v1/usage", params={"until": "9" * 30}, headers=ops), 400, param="until")
    assert_error(c.get("/v1/usage", params={"since": "2026-02-01", "until": "2026-01-01"}, headers=ops), 400, param="since")
    assert_error(c.get("/v1/usage", params={"since": "0", "until": "2000000000"}, headers=ops), 400, param="since")
    assert_error(c.get("/v1/usage", params={"team": "a"}, headers=ops), 400, param="team")
    assert_error(c.get("/v1/usage?key=a&key=b", headers=ops), 400, param="key")
    r = c.get("/v1/usage", params={"since": "2026-01-01T00:00:00+02:00", "until": "1767225600.5"}, headers=ops)
    assert r.status_code == 200 and r.json()["since"] == "2025-12-31T22:00:00Z" and r.json()["data"] == []


def test_usage_metrics_carry_the_key_name_never_the_key():
    recorded: dict = {}

    def factory(kind, name, desc, tag_keys):
        class M:
            def inc(self, value=1.0, tags=None):
                if value <= 0:
                    raise ValueError(f"value must be >0, got {value}")  # as ray.util.metrics.Counter
                labels = tuple(sorted((tags or {}).items()))
                recorded[(name, labels)] = recorded.get((name, labels), 0) + value

            def observe(self, value, tags=None): ...
        return M()

    class CountsNothing(FakeModel):
        async def _do_embed(self, req) -> EmbedResult:
            return EmbedResult([[1.0, 0.0] for _ in req.inputs], 0, 0, self.replica)

    c = client(make_router([key("team-a", "sk-a")], metrics=RouterMetrics(factory), emb=CountsNothing("emb", "embed")))
    assert c.post("/v1/embeddings", json=EMBED, headers=bearer("sk-a")).status_code == 200  # 0 tokens: no counter call
    r = c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a"))
    use = r.json()["usage"]
    assert recorded[("serve_app_key_requests", (("key", "team-a"), ("model", "chat")))] == 1
    assert recorded[("serve_app_key_tokens", (("key", "team-a"), ("model", "chat"), ("type", "prompt")))] == use["prompt_tokens"]
    assert recorded[("serve_app_key_tokens", (("key", "team-a"), ("model", "chat"), ("type", "completion")))] == use["completion_tokens"]
    assert not any("sk-a" in str(labels) or hash_key("sk-a") in str(labels) for _, labels in recorded)


# --- check ---
def _cfg(**gateway) -> AppConfig:
    return AppConfig.model_validate({"gateway": gateway, "models": MODELS})


def test_check_warns_when_router_replicas_split_a_memory_store():
    assert check_router(_cfg(), []) == ([], [])
    _, warned = check_router(_cfg(deployment={"num_replicas": 2}), [])
    assert "2x its quotas" in warned[0] and "limits_store" in warned[0]
    _, warned = check_router(_cfg(deployment={"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}), [])
    assert "4x" in warned[0]
    assert check_router(_cfg(), [{"name": "router", "num_replicas": 3}])[1]
    assert check_router(_cfg(deployment={"num_replicas": 2}, limits_store="redis://10.0.0.5:6379/0"), []) == ([], [])


def test_check_validates_the_router_user_config_override():
    problems, _ = check_router(_cfg(), [{"name": "router", "user_config": {"api_keys": [key("a", "sk-a", models=["chatt"])]}}])
    assert "deployments[router].user_config" in problems[0] and "api_keys.0.models" in problems[0]
    assert check_router(_cfg(), [{"name": "router", "user_config": {"api_keys": [key("a", "sk-a", models=["chat"])]}}]) == ([], [])


def test_store_and_key_fields_are_validated_naming_the_field():
    from serve_app.config import parse_app_config

    with pytest.raises(ConfigError, match="gateway.limits_store"):
        parse_app_config({"gateway": {"limits_store": "memcached://x:1"}, "models": MODELS})
    with pytest.raises(ConfigError, match=r"gateway\.api_keys\.1\.sha256: same secret as api_keys\.0"):
        parse_app_config({"gateway": {"api_keys": [key("a", "sk-a"), key("b", "sk-a")]}, "models": MODELS})
    with pytest.raises(ConfigError, match=r"gateway\.api_keys\.0\.max_concurrent_requests"):
        parse_app_config({"gateway": {"api_keys": [key("a", "sk-a", max_concurrent_requests=0)]}, "models": MODELS})


def test_cli_usage_verb_reads_the_router_over_http(monkeypatch, capsys):
    from serve_app.cli import main

    router = make_router([key("team-a", "sk-a"), ADMIN])
    assert client(router).post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a")).status_code == 200
    server = ThreadedServer(router.__serve_build_asgi_app__(), log_level="error")
    try:
        url = server.url
        monkeypatch.setenv("TEST_ADMIN_KEY", "sk-ops")
        assert main(["usage", "--url", url, "--key-env", "TEST_ADMIN_KEY", "--since", "1h", "--key", "team-a"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[2].split()[:3] == ["team-a", "chat", "1"]
        monkeypatch.setenv("TEST_ADMIN_KEY", "sk-a")  # not an admin key
        assert main(["usage", "--url", url, "--key-env", "TEST_ADMIN_KEY"]) == 1
        assert "403" in capsys.readouterr().err
    finally:
        server.close()


# --- one counter per key name (issue 20.3) ---
def test_a_changed_quota_keeps_the_keys_window_instead_of_resetting_it():
    router = make_router([key("team-a", "sk-a", requests_per_minute=3), ADMIN])
    c = client(router)
    assert [c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a")).status_code for _ in range(2)] == [200, 200]
    router.reconfigure({"api_keys": [key("team-a", "sk-a", requests_per_minute=4), ADMIN]})
    codes = [c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # 2 of the 4 were spent before the change: the window went on


def test_one_name_with_two_limits_is_refused_and_env_keys_get_the_same_checks(monkeypatch):
    with pytest.raises(ValueError, match=r"api_keys\.1\.requests_per_minute: key name 'team' is also api_keys\.0"):
        AppConfig.model_validate({"gateway": {"api_keys": [key("team", "sk-1", requests_per_minute=5),
                                                           key("team", "sk-2", requests_per_minute=9)]}, "models": MODELS})
    router = make_router([key("team", "sk-1", requests_per_minute=5), key("team", "sk-2", requests_per_minute=5), ADMIN])
    with pytest.raises(ConfigError, match="tokens_per_minute"):
        router.reconfigure({"api_keys": [key("team", "sk-1", tokens_per_minute=5), key("team", "sk-2"), ADMIN]})
    codes = [client(router).post("/v1/chat/completions", json=CHAT, headers=bearer(s)).status_code
             for s in ("sk-1", "sk-2", "sk-1", "sk-2", "sk-1", "sk-2")]
    assert codes == [200] * 5 + [429]  # the old keys stay; two secrets of one name share its 5 a minute

    def gateway(env: str, keys: list[dict]):
        monkeypatch.setenv("E2E_KEYS", env)
        return AppConfig.model_validate({"gateway": {"api_keys_env": "E2E_KEYS", "api_keys": keys}, "models": MODELS}).gateway

    keys = gateway("ops=sk:with:colons:admin,svc=sk:plain", []).env_api_keys()
    assert [(k.name, k.sha256 == hash_key(s), k.admin) for k, s in zip(keys, ("sk:with:colons", "sk:plain"))] == [
        ("ops", True, True), ("svc", True, False)]
    with pytest.raises(ConfigError, match="E2E_KEYS.*same secret"):
        gateway("ops=sk-1", [key("team", "sk-1")]).env_api_keys()
    with pytest.raises(ConfigError, match="E2E_KEYS.*key name 'team'"):
        gateway("team=sk-3", [key("team", "sk-1", requests_per_minute=5)]).env_api_keys()


def test_a_retried_answer_and_a_continued_stream_are_each_counted_once():
    """A replica lost mid-generation: the non-streaming request is retried whole and the stream
    continues elsewhere (serve_app/migration/); usage holds each request once, with the tokens the
    client got, not the lost attempt's as well."""
    from serve_app.errors import ReplicaFailed

    keys = [key("team", "sk-t"), ADMIN]
    body = {"model": "chat", "messages": [{"role": "user", "content": "a b c d e f"}], "max_tokens": 8}
    chat = FakeModel("chat", "llm", fail=ReplicaFailed("died"), fail_times=1, die_after=2)
    c = client(make_router(keys, chat=chat))
    whole = c.post("/v1/chat/completions", json=body, headers=bearer("sk-t"))
    streamed = c.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      headers=bearer("sk-t"))
    assert whole.status_code == 200 and streamed.status_code == 200 and '"error"' not in streamed.text
    assert [m for m, _ in chat.calls].count("resume_stream") == 1  # the stream was continued
    (row,) = c.get("/v1/usage", headers=bearer("sk-ops")).json()["data"]
    stream_usage = json.loads(streamed.text.split("data: ")[-2])["usage"]
    assert row["requests"] == 2
    assert row["completion_tokens"] == whole.json()["usage"]["completion_tokens"] + stream_usage["completion_tokens"] == 12
