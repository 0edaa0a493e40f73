"""The Batch API's logic against fake model handles (the real stack runs in tests/e2e/test_batches.py):
the unchanged `openai` client drives files and batches; lines go through the router's own path
as their owner's key; bad lines become error lines; interactive requests preempt running lines;
429s and 5xx are retried as the docs say."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import openai
import orjson
import pytest

from serve_app.batches.lines import parse_input
from serve_app.batches.store import BatchStore
from serve_app.batches.traffic import Traffic
from serve_app.batches.worker import Answer, BatchWorker
from serve_app.config import AppConfig, BatchConfig, hash_key
from serve_app.router import Router
from tests.fakes import FakeModel

KEYS = [{"name": "team-a", "sha256": hash_key("sk-a")}, {"name": "team-b", "sha256": hash_key("sk-b"), "models": ["chat"]},
        {"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}]


def config(keys: list | None = None, **batch) -> AppConfig:
    return AppConfig.model_validate({
        "gateway": {"api_keys": keys if keys is not None else KEYS,
                    "batch": {"poll_s": 0.05, "quiet_s": 0.3, "lease_s": 5, **batch}},
        "models": [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat", "serving": {"aliases": ["c"]}},
                   {"name": "emb", "kind": "embed", "engine": "transformers", "source": "org/emb"}],
    })


def line(i: int, url: str = "/v1/embeddings", **body) -> bytes:
    body = body or {"model": "emb", "input": f"text number {i}"}
    return orjson.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


async def running(cfg: AppConfig, fakes: dict[str, FakeModel], monkeypatch, tmp_path):
    monkeypatch.setenv("SERVE_APP_DATA_DIR", str(tmp_path))
    router = Router(cfg.gateway, cfg.models, fakes)
    app = router.__serve_build_asgi_app__()
    router.start_batch_worker()
    return router, app


def client(app, key: str = "sk-a") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
    return openai.AsyncOpenAI(base_url="http://router/v1", api_key=key, http_client=http, max_retries=0)


async def until_done(c: openai.AsyncOpenAI, batch_id: str, timeout: float = 20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = await c.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {b.status}: {b.request_counts}")


async def lines_of(c: openai.AsyncOpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in (await c.files.content(file_id)).content.splitlines()]


def test_the_openai_client_runs_a_batch_with_bad_lines_to_completion(monkeypatch, tmp_path):
    async def main():
        fakes = {"chat": FakeModel("chat", "llm"), "emb": FakeModel("emb", "embed")}
        router, app = await running(config(), fakes, monkeypatch, tmp_path)
        c = client(app)
        rows = [line(i) for i in range(20)]
        rows[3] = b'{"custom_id": "req-3", "method": "POST"'  # cut short
        rows[5] = line(5, url="/v1/chat/completions", model="chat", messages=[{"role": "user", "content": "hi"}])
        rows[7] = line(7, model="nope", input="x")  # a model we do not serve: the router's own 404
        rows[9] = line(1)  # custom_id req-1 again
        f = await c.files.create(file=("in.jsonl", io.BytesIO(b"\n".join(rows))), purpose="batch")
        assert f.purpose == "batch" and f.bytes == len(b"\n".join(rows))
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h",
                                   metadata={"job": "nightly"})
        assert b.status == "validating" and b.request_counts.total == 20 and b.metadata == {"job": "nightly"}
        b = await until_done(c, b.id)
        assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (16, 4)
        out, err = await lines_of(c, b.output_file_id), await lines_of(c, b.error_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(20) if i not in (3, 5, 7, 9))
        assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["data"][0]["embedding"] for o in out)
        by_id = {(e["custom_id"], (e["error"] or {}).get("code") or e["response"]["body"]["error"]["code"]) for e in err}
        # a cut-short line has no readable custom_id: its error names its line number instead
        assert by_id == {(None, "invalid_line"), ("req-5", "invalid_line"), ("req-7", "model_not_found"),
                         ("req-1", "duplicate_custom_id")}
        assert next(e for e in err if e["custom_id"] is None)["error"]["message"].startswith("line 4: the line is not valid JSON")
        assert next(e for e in err if e["custom_id"] == "req-5")["error"]["message"].startswith("line 6:")
        # the lines ran as team-a: its usage, and its request ids in the answers
        assert len(fakes["emb"].calls) == 16 and all(o["response"]["request_id"] == o["id"] for o in out)
        # another key sees none of it; an admin sees it
        other = client(app, "sk-b")
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(b.id)
        with pytest.raises(openai.NotFoundError):
            await other.files.content(b.output_file_id)
        assert (await client(app, "sk-ops").batches.retrieve(b.id)).id == b.id
        assert [x.id for x in (await c.batches.list(limit=5)).data] == [b.id]
        assert (await c.files.delete(f.id)).deleted and (await c.batches.retrieve(b.id)).status == "completed"
        await router.batch_worker.stop()

    asyncio.run(main())


def test_an_upload_is_checked_and_stored_a_chunk_at_a_time_and_comes_back_byte_for_byte(monkeypatch, tmp_path):
    """Issue 20.10: the upload is spooled, scanned and stored in chunks (small ones here, so every
    boundary case is crossed): limits, UTF-8 split across chunks, blank lines."""
    from serve_app.batches import routes

    monkeypatch.setattr(routes, "SCAN_CHUNK", 7)
    monkeypatch.setattr(routes, "STORE_CHUNK", 64)

    async def main():
        router, app = await running(config(keys=[], max_file_bytes=4096, max_lines=30), {"emb": FakeModel("emb", "embed")},
                                    monkeypatch, tmp_path)
        await router.batch_worker.stop()
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")

        async def upload(raw: bytes):
            return await http.post("/v1/files", files={"file": ("x.jsonl", raw)}, data={"purpose": "batch"})

        raw = b"\n\n".join(line(i, input="caf\u00e9 " * 3) for i in range(20)) + b"\n"  # é's two bytes fall across chunks
        r = await upload(raw)
        assert r.status_code == 200 and r.json()["bytes"] == len(raw), r.text
        assert (await http.get(f"/v1/files/{r.json()['id']}/content")).content == raw
        with router.batch_store.engine.begin() as c:
            from sqlalchemy import text

            chunks = c.execute(text("SELECT COUNT(*) FROM batch_file_chunks WHERE file_id = :f"), {"f": r.json()["id"]}).scalar_one()
        assert chunks == -(-len(raw) // 64)
        one_long_line = await upload(b"{" + b" " * 3000 + b"}")  # no newline: one line, checked without holding it
        assert one_long_line.status_code == 200, one_long_line.text
        for bad, status, says in ((b"x" * 5000, 413, "4096"), (raw[:-5] + b"\xc3", 400, "UTF-8"), (b"\n \n", 400, "no lines"),
                                  (b"\n".join([b"{}"] * 31), 400, "31 lines"), ("é".encode() + b"\xff\n", 400, "UTF-8")):
            r = await upload(bad)
            assert r.status_code == status and says in r.json()["error"]["message"], (bad[:20], r.text)

    asyncio.run(main())


def test_files_list_pages_filters_and_orders_as_the_openai_client_expects(monkeypatch, tmp_path):
    async def main():
        fakes = {"chat": FakeModel("chat", "llm"), "emb": FakeModel("emb", "embed")}
        router, app = await running(config(retention_s=7200), fakes, monkeypatch, tmp_path)
        await router.batch_worker.stop()  # no batch runs here: the list is the subject
        a, b = client(app), client(app, "sk-b")
        mine = [(await a.files.create(file=(f"f{i}.jsonl", io.BytesIO(line(i))), purpose="batch")).id for i in range(5)]
        theirs = (await b.files.create(file=("b.jsonl", io.BytesIO(line(9))), purpose="batch")).id
        page = await a.files.list(limit=2)
        newest_first = [f async for f in await a.files.list(limit=2)]  # the client follows `after` page by page
        assert sorted(f.id for f in newest_first) == sorted(mine) and page.has_more  # each once
        assert [f.id for f in page.data] == [f.id for f in newest_first[:2]]
        assert [(f.created_at, f.id) for f in newest_first] == sorted(((f.created_at, f.id) for f in newest_first), reverse=True)
        assert [f.id async for f in await a.files.list(limit=3, order="asc")] == [f.id for f in newest_first][::-1]
        assert [f.id async for f in await a.files.list(purpose="batch_output")] == []
        one = (await a.files.list(limit=1)).data[0]
        assert one.expires_at == one.created_at + 7200  # retention, as the file object says
        assert {f.id async for f in await client(app, "sk-ops").files.list()} == {*mine, theirs}  # an admin sees all
        assert [f.id async for f in await b.files.list()] == [theirs]  # another key sees only its own
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
        auth = {"authorization": "Bearer sk-a"}
        await a.files.delete(mine[0])  # a cursor deleted meanwhile: no silent start from the top
        for query, param in (("limit=0", "limit"), ("limit=10001", "limit"), ("order=up", "order"), ("page=2", "page"),
                             ("limit=1&limit=2", "limit"), (f"after={mine[0]}", "after"), (f"after={theirs}", "after")):
            r = await http.get(f"/v1/files?{query}", headers=auth)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)

    asyncio.run(main())


def test_a_line_runs_as_its_owner_key_model_allow_list_included_and_a_removed_key_fails_its_lines(monkeypatch, tmp_path):
    async def main():
        fakes = {"chat": FakeModel("chat", "llm"), "emb": FakeModel("emb", "embed")}
        router, app = await running(config(), fakes, monkeypatch, tmp_path)
        b_client = client(app, "sk-b")  # team-b may use chat only
        f = await b_client.files.create(file=("x.jsonl", io.BytesIO(line(0) + b"\n" + line(1, url="/v1/embeddings"))),
                                        purpose="batch")
        b = await until_done(b_client, (await b_client.batches.create(
            input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")).id)
        assert b.request_counts.failed == 2 and not fakes["emb"].calls
        assert {e["response"]["status_code"] for e in await lines_of(b_client, b.error_file_id)} == {404}
        # team-a's key is removed while its batch waits: its lines are refused as its requests would be
        a_client = client(app)
        f = await a_client.files.create(file=("x.jsonl", io.BytesIO(line(0))), purpose="batch")
        await router.batch_worker.stop()
        b = await a_client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        router.reconfigure({"api_keys": [k for k in KEYS if k["name"] != "team-a"]})
        router.start_batch_worker()
        b = await until_done(client(app, "sk-ops"), b.id)
        (err,) = await lines_of(client(app, "sk-ops"), b.error_file_id)
        assert err["response"]["status_code"] == 401 and "team-a" in err["response"]["body"]["error"]["message"]
        await router.batch_worker.stop()

    asyncio.run(main())


def test_a_line_over_its_keys_whole_token_quota_fails_at_once_and_the_rest_runs(monkeypatch, tmp_path):
    """Such a line can never pass admission: it ends in the error file now, with its reason, rather
    than coming back as a 429 until the batch expires (24 h)."""
    async def main():
        keys = [{"name": "small", "sha256": hash_key("sk-s"), "tokens_per_minute": 300}]
        fakes = {"chat": FakeModel("chat", "llm"), "emb": FakeModel("emb", "embed")}
        router, app = await running(config(keys=keys), fakes, monkeypatch, tmp_path)
        c = client(app, "sk-s")
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        rows = [line(0, "/v1/chat/completions", **chat, max_tokens=8), line(1, "/v1/chat/completions", **chat, max_tokens=5000)]
        f = await c.files.create(file=("x.jsonl", io.BytesIO(b"\n".join(rows))), purpose="batch")
        b = await until_done(c, (await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                        completion_window="24h")).id, timeout=10)
        assert (b.status, b.request_counts.completed, b.request_counts.failed) == ("completed", 1, 1)
        (err,) = await lines_of(c, b.error_file_id)
        error = err["response"]["body"]["error"]
        assert err["custom_id"] == "req-1" and err["response"]["status_code"] == 429
        assert error["code"] == "request_too_large" and "whole quota of 300" in error["message"]
        await router.batch_worker.stop()

    asyncio.run(main())


def test_an_interactive_request_preempts_running_lines_which_finish_later_exactly_once(monkeypatch, tmp_path):
    async def main():
        slow = FakeModel("emb", "embed", delay=1.0)  # rounds: nothing ends between the 8th start and the request
        router, app = await running(config(keys=[]), {"chat": FakeModel("chat", "llm"), "emb": slow}, monkeypatch, tmp_path)
        c = client(app)
        f = await c.files.create(file=("x.jsonl", io.BytesIO(b"\n".join(line(i) for i in range(24)))), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        deadline = time.time() + 5
        deadline = time.time() + 10
        while len(router.batch_worker.running.get("emb", {})) < 8 and time.time() < deadline:  # slow start: 1, 2, 4, 8
            await asyncio.sleep(0.02)
        assert len(router.batch_worker.running["emb"]) == 8  # idle: up to half of 16 slots
        assert len(slow.calls) > 8  # the first rounds finished before the 8th line started
        r = await c.embeddings.create(model="emb", input="interactive")
        assert r.data[0].embedding
        assert any(resp._task.cancelled() for resp in slow.responses)  # the model's work for them was cancelled
        assert not router.batch_worker.running.get("emb")  # and none started while it ran
        b = await until_done(c, b.id)
        out = await lines_of(c, b.output_file_id)
        assert b.request_counts.completed == 24 and sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(24))
        with router.batch_store.engine.begin() as conn:
            from sqlalchemy import text

            pre = conn.execute(text("SELECT SUM(preemptions), MAX(attempts) FROM batch_lines")).one()
        assert pre[0] >= 8 and pre[1] == 1  # every running line was put back, and preemption is no try
        await router.batch_worker.stop()

    asyncio.run(main())


def test_worker_retries_429_and_503_without_counting_and_gives_up_on_other_5xx_after_max_attempts(tmp_path):
    async def main():
        store = BatchStore("sqlite", tmp_path, "w")
        cfg = config(keys=[])
        content = b"\n".join(line(i) for i in range(2))
        f = store.create_file("-", "x", "batch", content, time.time())
        bid = store.create_batch("-", "/v1/embeddings", f["id"], "1h", 3600, None,
                                 parse_input(content, "/v1/embeddings", lambda m: m), time.time())
        answers = {"req-0": [Answer(429, {"error": {}}, "x", retry_after=0.01)] * 3
                   + [Answer(503, {"error": {"code": "model_overloaded"}}, "x", retry_after=0.01)] * 4 + [Answer(200, {"ok": 1}, "x")],
                   "req-1": [Answer(504, {"error": {"code": "deadline_exceeded"}}, "x", retry_after=0.01)] * 10}
        seen: list[str] = []

        async def run_line(endpoint, body, owner, rid):
            cid = f"req-{orjson.loads(body)['input'].split()[-1]}"
            seen.append(cid)
            return answers[cid].pop(0)

        worker = BatchWorker(store, BatchConfig(poll_s=0.02, max_attempts=3), {m.name: m for m in cfg.models},
                             Traffic(), run_line)
        task = asyncio.create_task(worker.run())
        deadline = time.time() + 10
        while store.get_batch(bid, None)[0]["status"] != "completed" and time.time() < deadline:
            await asyncio.sleep(0.05)
        await worker.stop()
        task.cancel()
        row, counts = store.get_batch(bid, None)
        # 429s and 503s (come back later) are no tries; 504s are, up to max_attempts
        assert counts == {"done": 1, "failed": 1} and seen.count("req-0") == 8 and seen.count("req-1") == 3
        (err,) = [orjson.loads(x) for x in b"".join(store.content_pages(store.get_file(row["error_file_id"], None))).splitlines()]
        assert err["custom_id"] == "req-1" and err["response"]["status_code"] == 504

    asyncio.run(main())


def test_batch_slots_follow_capacity_workers_and_interactive_traffic():
    cfg = config(keys=[])
    clock = [1000.0]
    traffic = Traffic(clock=lambda: clock[0])
    worker = BatchWorker(None, BatchConfig(idle_share=0.5, busy_lines=2, quiet_s=2), {m.name: m for m in cfg.models},
                         traffic, None, clock=lambda: clock[0])
    assert worker.cap("emb") == 1  # quiet: slow start at one line...
    worker.window["emb"] += 20  # ...plus one per finished line, up to the share
    assert worker.cap("emb") == 8  # 1 replica x 16 ongoing x 0.5
    worker.workers = 3
    assert worker.cap("emb") == 2 and worker.cap("not-served") == 4
    traffic.begin("emb")
    assert worker.cap("emb") == 0  # busy_lines 2 shared by 3 workers
    worker.workers = 1
    assert worker.cap("emb") == 2
    traffic.end("emb")
    clock[0] += 1
    assert worker.cap("emb") == 2  # quiet for 1 s only
    clock[0] += 2
    assert worker.cap("emb") == 1  # quiet again: slow start again
    worker.window["emb"] = 3
    assert worker.cap("emb") == 3
    worker.remote_busy = {"emb"}  # another router replica serves it now
    assert worker.cap("emb") == 2


def test_input_lines_are_refused_by_line_number_with_the_reason():
    raw = b"\n".join([
        line(0), b"", b"  ", b'{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}}',
        b'{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"model": "c", "stream": true}}',
        b'{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": [], "extra": 1}',
        b'{"custom_id": 5, "method": "POST", "url": "/v1/embeddings", "body": {}}',
        b'{"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"input": NaN}}',
        b'\xff\xfe',
    ])
    lines = parse_input(raw, "/v1/embeddings", lambda m: {"c": "chat"}.get(m, m))
    assert [ln.idx for ln in lines] == list(range(7)) and lines[0].model == "emb" and orjson.loads(lines[0].body)["input"]
    assert all(ln.body is None and ln.result for ln in lines[1:])
    errors = [orjson.loads(ln.result)["error"] for ln in lines[1:]]
    assert [e["line"] for e in errors] == [4, 5, 6, 7, 8, 9]
    assert "method must be 'POST'" in errors[0]["message"] and "cannot stream" in errors[1]["message"]
    assert "unknown field(s) 'extra'" in errors[2]["message"] and "custom_id must be" in errors[3]["message"]
    assert "not valid JSON" in errors[4]["message"] and "not valid JSON" in errors[5]["message"]


def test_a_line_preempted_before_its_task_began_is_put_back_at_once(tmp_path):
    """A task cancelled before it first runs never executes a handler of its own: the line must
    still go back to pending now, not when its lease runs out (seen on the real stack)."""
    async def main():
        store = BatchStore("sqlite", tmp_path, "w")
        content = line(0)
        f = store.create_file("-", "x", "batch", content, time.time())
        bid = store.create_batch("-", "/v1/embeddings", f["id"], "1h", 3600, None,
                                 parse_input(content, "/v1/embeddings", lambda m: m), time.time())
        store.advance("w", time.time(), 60)
        cfg = config(keys=[])
        worker = BatchWorker(store, BatchConfig(), {m.name: m for m in cfg.models}, Traffic(), None, worker_id="w")
        (claimed,) = store.claim("w", ["emb"], 1, time.time(), 600)
        worker._start(claimed)
        worker.preempt("emb")  # at once: the task has not run a single step
        await asyncio.sleep(0.3)
        with store.engine.begin() as conn:
            from sqlalchemy import text

            state = conn.execute(text("SELECT state, preemptions, attempts FROM batch_lines")).one()
        assert tuple(state) == ("pending", 1, 0)

    asyncio.run(main())


def test_an_empty_id_is_a_404_in_openai_shape_not_a_redirect(monkeypatch, tmp_path):
    from starlette.testclient import TestClient

    monkeypatch.setenv("SERVE_APP_DATA_DIR", str(tmp_path))
    cfg = config(keys=[])
    c = TestClient(Router(cfg.gateway, cfg.models, {}).__serve_build_asgi_app__(), raise_server_exceptions=False)
    for method, path in (("GET", "/v1/files/"), ("GET", "/v1/batches/"), ("POST", "/v1/embeddings/")):
        r = c.request(method, path, follow_redirects=False)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.status_code, r.text)


def test_a_line_whose_task_failed_goes_back_and_only_running_lines_keep_their_lease(tmp_path):
    """A store error inside a line's task must not leave the line leased forever (renewed with
    the worker's other lines): it goes back to pending, and renewals cover running lines only."""
    class FlakyStore(BatchStore):
        def finish(self, worker, batch_id, idx, ok, result, now):
            if idx == 0:
                raise RuntimeError("the store went away")
            return super().finish(worker, batch_id, idx, ok, result, now)

    async def main():
        store = FlakyStore("sqlite", tmp_path, "w")
        content = line(0) + b"\n" + line(1)
        f = store.create_file("-", "x", "batch", content, time.time())
        store.create_batch("-", "/v1/embeddings", f["id"], "1h", 3600, None,
                           parse_input(content, "/v1/embeddings", lambda m: m), time.time())
        store.advance("w", time.time(), 60)
        release = asyncio.Event()

        async def run_line(endpoint, body, owner, rid):
            if orjson.loads(body)["input"].endswith(" 1"):
                await release.wait()  # line 1 keeps running
            return Answer(200, {}, rid)

        cfg = config(keys=[])
        worker = BatchWorker(store, BatchConfig(), {m.name: m for m in cfg.models}, Traffic(), run_line, worker_id="w")
        for claimed in store.claim("w", ["emb"], 2, time.time(), 600):
            worker._start(claimed)
        await asyncio.sleep(0.3)
        store.renew("w", time.time() + 999, [k for lines in worker.running.values() for k in lines])
        with store.engine.begin() as conn:
            from sqlalchemy import text

            rows = dict(conn.execute(text("SELECT idx, state FROM batch_lines")).all())
            renewed = conn.execute(text("SELECT idx FROM batch_lines WHERE lease_until > :t"), {"t": time.time() + 900}).all()
            preemptions = conn.execute(text("SELECT preemptions FROM batch_lines WHERE idx = 0")).scalar_one()
        assert rows == {0: "pending", 1: "leased"} and [r[0] for r in renewed] == [1]
        assert preemptions == 0  # a store error is no preemption: the line keeps its three preemptions
        release.set()
        await asyncio.sleep(0.3)

    asyncio.run(main())


def test_hostile_batch_ids_cursors_and_limits_are_4xx(monkeypatch, tmp_path):
    from starlette.testclient import TestClient

    monkeypatch.setenv("SERVE_APP_DATA_DIR", str(tmp_path))
    cfg = config(keys=[])
    c = TestClient(Router(cfg.gateway, cfg.models, {}).__serve_build_asgi_app__(), raise_server_exceptions=False)
    assert c.get("/v1/batches", params={"limit": "\u00b2"}).status_code == 400  # a digit to str.isdigit, not to int()
    assert c.get("/v1/batches", params={"limit": "0"}).status_code == 400
    assert c.get("/v1/batches/batch_%00x").status_code == 404
    assert c.get("/v1/files/file-%00").status_code == 404
    r = c.post("/v1/files", files={"file": ("a\x00.jsonl", line(0))}, data={"purpose": "batch"})
    assert r.status_code == 200 and "\x00" not in r.json()["filename"]
    lines = parse_input(b'{"custom_id": "a\\u0000", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'
                        + line(1, model="e\x00", input="x"), "/v1/embeddings", lambda m: m)
    assert orjson.loads(lines[0].result)["error"]["code"] == "invalid_line" and lines[1].model == ""


def stored_batch(tmp_path, content: bytes, endpoint: str = "/v1/embeddings") -> BatchStore:
    """A store holding one batch of `content`, and a line runner that never finishes (a line runs
    until the worker puts it back)."""
    store = BatchStore("sqlite", tmp_path, "w")
    f = store.create_file("-", "x", "batch", content, time.time())
    store.create_batch("-", endpoint, f["id"], "1h", 3600, None, parse_input(content, endpoint, lambda m: m), time.time())
    return store


async def never_done(endpoint, body, owner, rid):
    await asyncio.Event().wait()


def test_traffic_seen_by_another_router_replica_preempts_this_ones_lines(tmp_path):
    async def main():
        store = stored_batch(tmp_path, line(0))
        cfg = config(keys=[])
        worker = BatchWorker(store, BatchConfig(), {m.name: m for m in cfg.models}, Traffic(), never_done, worker_id="w")
        await worker._tick()  # the batch starts; its line runs here
        await worker._tick()
        assert len(worker.running.get("emb", {})) == 1
        store.heartbeat("other-router", time.time(), [("emb", time.time())])  # an interactive request there
        worker._beat_at = 0  # the next heartbeat is due
        await worker._tick()
        await asyncio.sleep(0.3)
        assert not worker.running.get("emb")
        with store.engine.begin() as conn:
            from sqlalchemy import text

            assert tuple(conn.execute(text("SELECT state, preemptions FROM batch_lines")).one()) == ("pending", 1)

    asyncio.run(main())


def test_requests_refused_before_a_model_never_pause_batches(monkeypatch, tmp_path):
    """Only an admitted request is interactive traffic that batch lines yield to: a key with no
    quota left, a wrong endpoint, an unknown model or too big a list pauses nothing (issue 20.4)."""
    from starlette.testclient import TestClient

    from serve_app.config import AppConfig, hash_key
    from serve_app.router import Router
    from tests.fakes import FakeModel

    monkeypatch.setenv("SERVE_APP_DATA_DIR", str(tmp_path))
    cfg = AppConfig.model_validate({
        "gateway": {"max_documents": 4, "api_keys": [{"name": "t", "sha256": hash_key("sk-t"), "requests_per_minute": 1}]},
        "models": [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"},
                   {"name": "emb", "kind": "embed", "engine": "transformers", "source": "org/emb"}]})
    router = Router(cfg.gateway, cfg.models, {"chat": FakeModel("chat", "llm"), "emb": FakeModel("emb", "embed")})
    c = TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False)
    auth = {"authorization": "Bearer sk-t"}
    refused = [
        c.post("/v1/embeddings", json={"model": "chat", "input": "x"}, headers=auth),  # 400: an LLM
        c.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=auth),  # 404
        c.post("/v1/embeddings", json={"model": "emb", "input": ["x"] * 5}, headers=auth),  # 413
        c.post("/v1/embeddings", json={"model": "emb", "input": "x"}),  # 401
    ]
    assert [r.status_code for r in refused] == [400, 404, 413, 401]
    assert router.traffic.last_seen == {}
    assert c.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers=auth).status_code == 200
    assert set(router.traffic.last_seen) == {"emb"} and router.traffic.in_flight == {"emb": 0}
    router.traffic.last_seen.clear()
    assert c.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers=auth).status_code == 429  # quota spent
    assert c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                  headers=auth).status_code == 429
    assert router.traffic.last_seen == {}
