"""The batch store on both of its databases: SQLite (a file) and a real PostgreSQL server started
by the test suite. Exactly one result per line whoever runs it: claims never overlap, a lapsed
lease is claimed again, a worker that lost its lease writes nothing, and a batch ends once."""

from __future__ import annotations

import collections
import threading
import time

import orjson
import pytest

from serve_app.batches.lines import parse_input
from serve_app.batches.store import BatchStore

EMBED = "/v1/embeddings"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = BatchStore("sqlite", tmp_path, "test")
    else:
        pg = request.getfixturevalue("pg_server")
        pg.reset()
        s = BatchStore(pg.url, tmp_path, "test")
    yield s
    s.close()


def jsonl(n: int, model: str = "emb", bad: dict[int, bytes] | None = None) -> bytes:
    rows = [orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": EMBED, "body": {"model": model, "input": f"t{i}"}})
            for i in range(n)]
    for i, raw in (bad or {}).items():
        rows[i] = raw
    return b"\n".join(rows) + b"\n"


def batch(store: BatchStore, n: int, now: float, window_s: int = 3600, **kw) -> str:
    lines = parse_input(jsonl(n, **kw), EMBED, lambda m: m)
    f = store.create_file("team", "in.jsonl", "batch", jsonl(n, **kw), now)
    return store.create_batch("team", EMBED, f["id"], "1h", window_s, None, lines, now)


def content(store: BatchStore, file_id: str) -> list[dict]:
    row = store.get_file(file_id, None)
    return [orjson.loads(x) for x in b"".join(store.content_pages(row)).splitlines()]


def test_a_batch_completes_with_each_line_answered_once_in_order(store):
    now = time.time()
    bid = batch(store, 5, now, bad={2: b"{not json"})
    assert store.get_batch(bid, None)[0]["status"] == "validating"
    assert store.advance("w", now, 60) == [] and store.get_batch(bid, None)[0]["status"] == "in_progress"
    lines = store.claim("w", ["emb"], 10, now, 60)
    assert sorted(line["idx"] for line in lines) == [0, 1, 3, 4]  # line 2 is already an error line
    for line in lines:
        assert store.finish("w", bid, line["idx"], line["idx"] != 4, f'{{"custom_id": "{line["custom_id"]}"}}', now)
    assert store.advance("w", now + 1, 60) == [bid]
    row, counts = store.get_batch(bid, None)
    assert row["status"] == "completed" and counts == {"done": 3, "failed": 2}
    assert [x["custom_id"] for x in content(store, row["output_file_id"])] == ["r0", "r1", "r3"]
    errors = content(store, row["error_file_id"])
    assert [e["custom_id"] for e in errors] == [None, "r4"] and errors[0]["error"]["line"] == 3
    assert store.get_file(row["output_file_id"], None)["bytes"] == len(b"".join(store.content_pages(store.get_file(row["output_file_id"], None))))
    assert store.get_file(row["output_file_id"], "someone-else") is None


def test_a_lapsed_lease_is_claimed_again_and_the_old_holder_writes_nothing(store):
    now = time.time()
    bid = batch(store, 2, now)
    store.advance("a", now, 60)
    first = store.claim("a", ["emb"], 2, now, lease_s=5)
    assert len(first) == 2 and store.claim("b", ["emb"], 2, now + 1, 5) == []  # leased: nobody else
    store.renew("a", now + 8, [(bid, 0), (bid, 1)])  # a lives and runs them: their lease runs on
    assert store.claim("b", ["emb"], 2, now + 6, 5) == []
    again = store.claim("b", ["emb"], 2, now + 9, 5)  # a died: its lines are b's now
    assert [r["idx"] for r in again] == [0, 1] and all(r["attempts"] == 2 for r in again)
    assert not store.finish("a", bid, 0, True, '{"late": true}', now + 10)  # a's late answer is dropped
    assert store.finish("b", bid, 0, True, '{"by": "b"}', now + 10) and store.finish("b", bid, 1, True, '{"by": "b"}', now + 10)
    store.advance("b", now + 11, 5)
    row, counts = store.get_batch(bid, None)
    assert counts == {"done": 2} and [x["by"] for x in content(store, row["output_file_id"])] == ["b", "b"]


def test_a_released_line_runs_later_and_a_refunded_try_does_not_count(store):
    now = time.time()
    bid = batch(store, 1, now)
    store.advance("w", now, 60)
    (line,) = store.claim("w", ["emb"], 1, now, 60)
    store.release("w", bid, 0, now + 30, counted=False)
    assert store.claim("w", ["emb"], 1, now + 10, 60) == []  # not before its Retry-After
    (again,) = store.claim("w", ["emb"], 1, now + 31, 60)
    assert again["attempts"] == line["attempts"] == 1


def test_cancel_keeps_finished_results_lets_running_lines_finish_and_starts_nothing_new(store):
    now = time.time()
    bid = batch(store, 4, now)
    store.advance("w", now, 60)
    a, b = store.claim("w", ["emb"], 2, now, 60)
    assert store.finish("w", bid, a["idx"], True, '{"ok": 1}', now)
    assert store.cancel(bid, "team", now) and store.get_batch(bid, None)[0]["status"] == "cancelling"
    assert store.claim("w", ["emb"], 4, now, 60) == []
    assert store.advance("w", now + 1, 60) == []  # b still runs
    assert store.finish("w", bid, b["idx"], True, '{"ok": 2}', now + 2)
    assert store.advance("w", now + 3, 60) == [bid]
    row, counts = store.get_batch(bid, None)
    assert row["status"] == "cancelled" and row["cancelled_at"] and counts == {"done": 2, "failed": 2}
    assert {e["error"]["code"] for e in content(store, row["error_file_id"])} == {"batch_cancelled"}
    assert not store.cancel(bid, "another-team", now)  # not theirs: as if absent


def test_a_batch_past_its_window_expires_and_its_unrun_lines_say_so(store):
    now = time.time()
    bid = batch(store, 3, now, window_s=60)
    store.advance("w", now, 60)
    (a,) = store.claim("w", ["emb"], 1, now, 600)
    store.finish("w", bid, a["idx"], True, "{}", now)
    assert store.advance("w", now + 61, 60) == [bid]
    row, counts = store.get_batch(bid, None)
    assert row["status"] == "expired" and counts == {"done": 1, "failed": 2}
    assert {e["error"]["code"] for e in content(store, row["error_file_id"])} == {"batch_expired"}


def test_a_file_of_only_bad_lines_fails_at_validation_with_an_error_file(store):
    now = time.time()
    bid = batch(store, 2, now, bad={0: b"[]", 1: b"null"})
    row, counts = store.get_batch(bid, None)
    assert row["status"] == "failed" and counts == {"failed": 2} and row["error_file_id"] and row["output_file_id"] is None
    assert orjson.loads(row["errors"])["data"][0]["code"] == "no_runnable_lines"


def test_concurrent_workers_answer_every_line_exactly_once(store):
    now = time.time()
    bid = batch(store, 300, now)
    store.advance("w0", now, 60)
    written: list[tuple[str, int]] = []
    claimed: list[tuple[str, int]] = []  # every claim, kept or not: a double claim shows here even if one finish loses
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            got = store.claim(name, ["emb"], 7, time.time(), 60)
            if not got:
                return
            with lock:
                claimed.extend((name, line["idx"]) for line in got)
            for line in got:
                if store.finish(name, bid, line["idx"], True, f'{{"w": "{name}"}}', time.time()):
                    with lock:
                        written.append((name, line["idx"]))
            time.sleep(0.002)  # as a worker awaits its lines: the others get the store meanwhile

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Leases of 60 s never lapse here, so no line may be claimed twice, by two workers or one.
    assert sorted(i for _, i in claimed) == list(range(300)), [i for i, n in collections.Counter(i for _, i in claimed).items() if n > 1]
    assert sorted(i for _, i in written) == list(range(300))
    assert len({w for w, _ in written}) > 1  # the work was really shared
    store.advance("w0", time.time(), 60)
    assert store.get_batch(bid, None)[1] == {"done": 300}


def test_heartbeats_count_live_workers_and_share_interactive_traffic(store):
    now = time.time()
    assert store.heartbeat("a", now, [("chat", now)]) == 1
    assert store.heartbeat("b", now) == 2
    assert store.busy_models(now - 2) == {"chat"} and store.busy_models(now + 1) == set()
    assert store.heartbeat("a", now + 30) == 1  # b stopped beating


def test_batches_list_newest_first_with_a_cursor(store):
    now = time.time()
    ids = [batch(store, 1, now + i) for i in range(5)]
    page, more = store.list_batches("team", None, 2)
    assert [r["id"] for r, _ in page] == ids[::-1][:2] and more
    page, more = store.list_batches("team", page[-1][0]["id"], 10)
    assert [r["id"] for r, _ in page] == ids[::-1][2:] and not more
    assert store.list_batches("nobody", None, 10) == ([], False)


def test_a_batch_whose_lines_all_finished_completes_even_if_first_looked_at_after_its_window(store):
    now = time.time()
    bid = batch(store, 1, now, window_s=60)
    store.advance("w", now, 60)
    (a,) = store.claim("w", ["emb"], 1, now, 600)
    assert store.finish("w", bid, a["idx"], True, "{}", now + 59)
    assert store.advance("w", now + 120, 60) == [bid]
    assert store.get_batch(bid, None)[0]["status"] == "completed"


def test_two_apps_on_one_postgres_database_never_see_each_others_lines(request, tmp_path):
    pg = request.getfixturevalue("pg_server")
    pg.reset()
    a, b = BatchStore(pg.url, tmp_path, "app-a"), BatchStore(pg.url, tmp_path, "app-b")
    try:
        now = time.time()
        bid = batch(a, 3, now)
        a.advance("wa", now, 60)
        b.advance("wb", now, 60)
        assert b.claim("wb", ["emb"], 10, now, 60) == [] and b.get_batch(bid, None) is None
        assert len(a.claim("wa", ["emb"], 10, now, 60)) == 3
    finally:
        a.close()
        b.close()


def test_renew_extends_only_the_lines_named(store):
    """A worker renews the lines it runs; one it holds but no longer runs must lapse."""
    now = time.time()
    bid = batch(store, 2, now)
    store.advance("a", now, 60)
    assert len(store.claim("a", ["emb"], 2, now, lease_s=5)) == 2
    store.renew("a", now + 100, [(bid, 0)])
    assert [r["idx"] for r in store.claim("b", ["emb"], 2, now + 6, 5)] == [1]


def test_sqlite_reads_wait_for_no_writer(tmp_path):
    """Status and progress read while a writer holds SQLite's write lock (another router replica
    mid-claim), instead of queueing behind it for the busy timeout and answering 503 (issue 20.7)."""
    import sqlite3

    store = BatchStore("sqlite", tmp_path, "test")
    now = time.time()
    bid = batch(store, 3, now)
    writer = sqlite3.connect(tmp_path / "batches-test.sqlite3", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # held for the whole read below
    try:
        t0 = time.monotonic()
        assert store.get_batch(bid, None)[0]["id"] == bid
        assert [b["id"] for b in store.progress(now)] == [bid]
        assert store.pending_by_model() == {"emb": 3} and store.models_with_work(now) == {"emb"}
        assert time.monotonic() - t0 < 1.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        store.close()


def test_retention_deletes_ended_batches_with_their_files_and_keeps_what_a_running_batch_reads(store):
    t0 = 1_000_000.0
    ended, running = batch(store, 2, t0), batch(store, 2, t0)
    (ended_in, running_in) = (store.get_batch(b, None)[0]["input_file_id"] for b in (ended, running))
    fresh = store.create_file("team", "fresh.jsonl", "batch", jsonl(1), t0 + 5000)
    store.cancel(ended, None, t0)  # it ends with its lines in an error file
    store.advance("w", t0 + 1, 60)
    row, _ = store.get_batch(ended, None)
    assert row["status"] == "cancelled" and row["error_file_id"]
    assert store.prune(t0) == (0, 0)  # nothing ended before t0
    assert store.prune(t0 + 3600, per_pass=1, lines_per_tx=1) == (1, 2)  # the batch, its error file, its input file
    assert store.get_batch(ended, None) is None and store.get_file(row["error_file_id"], None) is None
    assert store.get_file(ended_in, None) is None
    assert store.get_batch(running, None) is not None and store.get_file(running_in, None) is not None  # still read
    assert store.get_file(fresh["id"], None) is not None  # uploaded after the cut
    with store.engine.begin() as c:
        from sqlalchemy import text

        assert c.execute(text("SELECT COUNT(*) FROM batch_lines WHERE batch_id = :b"), {"b": ended}).scalar_one() == 0
        assert c.execute(text("SELECT COUNT(*) FROM batch_lines WHERE batch_id = :b"), {"b": running}).scalar_one() == 2


def test_files_list_filters_by_owner_and_purpose_and_pages_both_ways(store):
    ids = [store.create_file("team", f"{i}.jsonl", "batch", jsonl(1), 1000 + i)["id"] for i in range(3)]
    store.create_file("other", "x.jsonl", "batch", jsonl(1), 1000)
    rows, more = store.list_files("team", None, None, 2, True)
    assert [r["id"] for r in rows] == ids[::-1][:2] and more and "content" not in rows[0]
    rows, more = store.list_files("team", None, ids[1], 2, True)
    assert [r["id"] for r in rows] == [ids[0]] and not more
    assert [r["id"] for r in store.list_files("team", "batch", ids[0], 5, False)[0]] == ids[1:]
    assert store.list_files("team", "batch_output", None, 5, True) == ([], False)
    assert len(store.list_files(None, None, None, 10, True)[0]) == 4
