"""Where batches live, so no replica or node holds anything the batch cannot lose: files, batches
and one row per line, in SQLite (a file under data_dir; the router replicas of one node share
it) or PostgreSQL (every router replica on every node shares the work).

Exactly one result per line, whoever runs it:
- a worker claims lines with one conditional UPDATE (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
  two workers never take the same line; SQLite: writes are serialized) and holds a lease it
  renews while it lives;
- a line whose lease ran out (its router replica or node died) is claimed again by another;
- a result is written only by the lease's current holder and only while the line is leased,
  so a worker that lost its lease, or a batch finalized meanwhile, discards what it ran;
- a batch moves to finalizing/cancelled/expired in one conditional UPDATE: one worker wins.

Output and error files are not copied: their content is the batch's result lines, read in
order when downloaded. SQLAlchemy Core gives one set of queries for both databases.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import text

from serve_app.batches.lines import Line, error_line, new_id
from serve_app.sql import reading, sqlite_engine

ACTIVE = ("validating", "in_progress")  # lines of these batches may be claimed
RUNNING = ("pending", "leased")
TERMINAL = ("completed", "failed", "expired", "cancelled")
PAGE_LINES = 500  # result lines read per query when a file is downloaded

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes BIGINT NOT NULL, created_at BIGINT NOT NULL, content {blob},
    batch_id TEXT, line_state TEXT
);
CREATE TABLE IF NOT EXISTS batch_file_chunks (
    file_id TEXT NOT NULL, seq INTEGER NOT NULL, data {blob} NOT NULL, PRIMARY KEY (file_id, seq)
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at BIGINT NOT NULL,
    in_progress_at BIGINT, expires_at BIGINT NOT NULL, finalizing_at BIGINT, completed_at BIGINT,
    failed_at BIGINT, expired_at BIGINT, cancelling_at BIGINT, cancelled_at BIGINT,
    output_file_id TEXT, error_file_id TEXT, errors TEXT, metadata TEXT,
    lease_owner TEXT, lease_until DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status, created_at);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT, model TEXT NOT NULL,
    body TEXT, state TEXT NOT NULL, lease_owner TEXT, lease_until DOUBLE PRECISION,
    not_before DOUBLE PRECISION NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    preemptions INTEGER NOT NULL DEFAULT 0, result TEXT, finished_at DOUBLE PRECISION, finished_by TEXT,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS batch_lines_claim ON batch_lines (state, model, batch_id, idx);
CREATE TABLE IF NOT EXISTS batch_workers (
    worker TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_traffic (
    model TEXT NOT NULL, worker TEXT NOT NULL, interactive_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (model, worker)
);
"""


class BatchStore:
    def __init__(self, url: str, data_dir: pathlib.Path, app: str) -> None:
        """url: 'sqlite' (a file `batches-<app>.sqlite3` under data_dir) or a PostgreSQL URL."""
        if url == "sqlite":
            self.engine = sqlite_engine(data_dir / f"batches-{app}.sqlite3", busy_timeout_s=30)
            self.postgres = False
        else:
            url = url.replace("postgres://", "postgresql://", 1)
            if url.startswith("postgresql://"):
                url = url.replace("postgresql://", "postgresql+psycopg://", 1)
            # One schema per app: two apps sharing a database never claim each other's lines.
            self.schema = "batches_" + re.sub(r"[^a-z0-9_]", "_", app.lower())[:50]
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                                           connect_args={"connect_timeout": 5, "options": f"-csearch_path={self.schema}"})
            self.postgres = True
        self.where = self.engine.url.render_as_string(hide_password=True)
        self._schema_ready = False

    @contextlib.contextmanager
    def _tx(self, read: bool = False) -> Iterator[sa.Connection]:
        """One transaction (`read`: it only reads, so on SQLite it waits for no writer). The schema
        is made on first use, not at start: a database that is down when the router starts fails
        batch calls (503) until it is back, never the router."""
        if not self._schema_ready:
            with self.engine.begin() as c:
                if self.postgres:  # several router replicas may start at once: create the schema once
                    c.execute(text("SELECT pg_advisory_xact_lock(4242013)"))
                    c.execute(text(f"CREATE SCHEMA IF NOT EXISTS {self.schema}"))
                for statement in filter(str.strip, _SCHEMA.format(blob="BYTEA" if self.postgres else "BLOB").split(";")):
                    c.execute(text(statement))
            self._schema_ready = True
        with (reading(self.engine) if read else self.engine.begin()) as c:
            yield c

    def close(self) -> None:
        self.engine.dispose()

    # --- files ---
    def create_file(self, owner: str, filename: str, purpose: str, content: bytes | Iterable[bytes], now: float) -> dict[str, Any]:
        """An uploaded file, stored a chunk at a time as `content` yields them (an upload spooled to
        disk is never whole in memory), in one transaction: it exists whole or not at all."""
        row = {"id": new_id("file-"), "owner": owner, "purpose": purpose, "filename": filename, "bytes": 0,
               "created_at": int(now)}
        with self._tx() as c:
            for seq, chunk in enumerate([content] if isinstance(content, bytes) else content):
                c.execute(text("INSERT INTO batch_file_chunks (file_id, seq, data) VALUES (:id, :seq, :data)"),
                          {"id": row["id"], "seq": seq, "data": chunk})
                row["bytes"] += len(chunk)
            c.execute(text("INSERT INTO batch_files (id, owner, purpose, filename, bytes, created_at) "
                           "VALUES (:id, :owner, :purpose, :filename, :bytes, :created_at)"), row)
        return row

    def get_file(self, file_id: str, owner: str | None) -> dict[str, Any] | None:
        """The file's row without its content; None when absent or another owner's (owner None: any)."""
        with self._tx(read=True) as c:
            row = c.execute(text("SELECT id, owner, purpose, filename, bytes, created_at, batch_id, line_state "
                                 "FROM batch_files WHERE id = :id"), {"id": file_id}).mappings().first()
        return dict(row) if row and (owner is None or row["owner"] == owner) else None

    def input_content(self, file_id: str) -> bytes:
        return b"".join(self._upload_chunks(file_id))

    def _upload_chunks(self, file_id: str) -> Iterator[bytes]:
        """An uploaded file's bytes, a stored chunk per read (a file stored whole before chunks, in
        `content`, comes as one)."""
        with self._tx(read=True) as c:
            whole = c.execute(text("SELECT content FROM batch_files WHERE id = :id"), {"id": file_id}).scalar_one()
        if whole is not None:
            yield bytes(whole)
            return
        seq = -1
        while True:
            with self._tx(read=True) as c:
                got = c.execute(text("SELECT seq, data FROM batch_file_chunks WHERE file_id = :id AND seq > :seq "
                                     "ORDER BY seq LIMIT 1"), {"id": file_id, "seq": seq}).first()
            if got is None:
                return
            seq = got[0]
            yield bytes(got[1])

    def content_pages(self, row: dict[str, Any]) -> Iterator[bytes]:
        """An uploaded file's bytes, or an output/error file's result lines in input order, a page at a time."""
        if row["batch_id"] is None:
            yield from self._upload_chunks(row["id"])
            return
        after = -1
        while True:
            with self._tx(read=True) as c:
                page = c.execute(text("SELECT idx, result FROM batch_lines WHERE batch_id = :b AND state = :s "
                                      "AND idx > :after ORDER BY idx LIMIT :n"),
                                 {"b": row["batch_id"], "s": row["line_state"], "after": after, "n": PAGE_LINES}).all()
            if not page:
                return
            after = page[-1][0]
            yield b"".join(r[1].encode() + b"\n" for r in page)

    def list_files(self, owner: str | None, purpose: str | None, after: str | None, limit: int,
                   newest_first: bool) -> tuple[list[dict[str, Any]], bool] | None:
        """Files without their content, by creation time (OpenAI's `order`), `limit` after the file
        `after` (its cursor pagination). None when `after` names no file of this owner (deleted or
        pruned meanwhile): starting again at the top would hand a paging client its files twice."""
        clauses, params = [], {"n": limit + 1}
        if owner is not None:
            clauses.append("owner = :owner")
            params["owner"] = owner
        if purpose is not None:
            clauses.append("purpose = :purpose")
            params["purpose"] = purpose
        before = "<" if newest_first else ">"
        with self._tx(read=True) as c:
            if after is not None:
                cursor = c.execute(text("SELECT created_at, id, owner FROM batch_files WHERE id = :id"), {"id": after}).first()
                if cursor is None or (owner is not None and cursor[2] != owner):
                    return None
                clauses.append(f"(created_at {before} :ca OR (created_at = :ca AND id {before} :cid))")
                params.update(ca=cursor[0], cid=cursor[1])
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            way = "DESC" if newest_first else "ASC"
            rows = c.execute(text("SELECT id, owner, purpose, filename, bytes, created_at, batch_id, line_state FROM batch_files "
                                  f"{where} ORDER BY created_at {way}, id {way} LIMIT :n"), params).mappings().all()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def prune(self, before: float, per_pass: int = 100, lines_per_tx: int = 5000) -> tuple[int, int]:
        """Forget what ended before `before` (the retention): batches ended then, with their lines
        and output/error files, and uploaded files created then that no unended batch reads.
        No transaction grows with the backlog: lines go `lines_per_tx` at a time (a writer on
        SQLite holds the file's lock), then each batch with its files. Returns (batches, files)."""
        ended_at = "COALESCE(completed_at, failed_at, expired_at, cancelled_at)"
        batches = files = 0
        while True:
            with self._tx(read=True) as c:
                ids = [r[0] for r in c.execute(text(
                    f"SELECT id FROM batches WHERE status IN ('completed', 'failed', 'expired', 'cancelled') AND {ended_at} < :t "
                    "LIMIT :n"), {"t": int(before), "n": per_pass}).all()]
            if not ids:
                break
            for batch_id in ids:
                while True:
                    with self._tx() as c:
                        upto = c.execute(text("SELECT MIN(idx) FROM batch_lines WHERE batch_id = :b"), {"b": batch_id}).scalar()
                        if upto is None:
                            break
                        c.execute(text("DELETE FROM batch_lines WHERE batch_id = :b AND idx < :upto"),
                                  {"b": batch_id, "upto": upto + lines_per_tx})
                with self._tx() as c:  # output/error files have no chunks: their content is the lines
                    files += c.execute(text("DELETE FROM batch_files WHERE batch_id = :b"), {"b": batch_id}).rowcount
                    batches += c.execute(text("DELETE FROM batches WHERE id = :b"), {"b": batch_id}).rowcount
        while True:
            with self._tx() as c:
                ids = [r[0] for r in c.execute(text(
                    "SELECT id FROM batch_files WHERE batch_id IS NULL AND created_at < :t AND id NOT IN (SELECT input_file_id "
                    "FROM batches WHERE status NOT IN ('completed', 'failed', 'expired', 'cancelled')) LIMIT :n"),
                    {"t": int(before), "n": per_pass}).all()]
                if not ids:
                    break
                files += _delete_uploads(c, ids)
        return batches, files

    def delete_file(self, file_id: str, owner: str | None) -> bool:
        if self.get_file(file_id, owner) is None:
            return False
        with self._tx() as c:
            _delete_uploads(c, [file_id])
        return True

    # --- batches, as the API sees them ---
    def create_batch(self, owner: str, endpoint: str, input_file_id: str, window: str, expires_in_s: int,
                     metadata: dict[str, str] | None, lines: list[Line], now: float) -> str:
        """The batch and every line, in one transaction: it exists whole or not at all."""
        batch_id = new_id("batch_")
        runnable = sum(1 for line in lines if line.result is None)
        errors = None
        if not runnable:  # nothing can run: OpenAI's "failed" at validation, every line in the error file
            errors = orjson.dumps({"object": "list", "data": [
                {"code": "no_runnable_lines", "message": f"none of the file's {len(lines)} line(s) is a valid request; "
                 "the error file names each", "param": "input_file_id", "line": None}]}).decode()
        with self._tx() as c:
            c.execute(text(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, created_at, "
                "expires_at, metadata, errors) VALUES (:id, :owner, :endpoint, :input, :window, 'validating', :now, "
                ":expires, :metadata, :errors)"),
                {"id": batch_id, "owner": owner, "endpoint": endpoint, "input": input_file_id, "window": window,
                 "now": int(now), "expires": int(now + expires_in_s), "errors": errors,
                 "metadata": orjson.dumps(metadata).decode() if metadata is not None else None})
            for start in range(0, len(lines), 1000):
                c.execute(text("INSERT INTO batch_lines (batch_id, idx, custom_id, model, body, state, result, finished_at) "
                               "VALUES (:b, :idx, :cid, :model, :body, :state, :result, :fin)"),
                          [{"b": batch_id, "idx": line.idx, "cid": line.custom_id, "model": line.model, "body": line.body,
                            "state": "pending" if line.result is None else "failed", "result": line.result,
                            "fin": None if line.result is None else now} for line in lines[start:start + 1000]])
            if not runnable:
                self._finalize(c, batch_id, "failed", now)
        return batch_id

    def get_batch(self, batch_id: str, owner: str | None) -> tuple[dict[str, Any], dict[str, int]] | None:
        with self._tx(read=True) as c:
            row = c.execute(text("SELECT * FROM batches WHERE id = :id"), {"id": batch_id}).mappings().first()
            if row is None or (owner is not None and row["owner"] != owner):
                return None
            return dict(row), self._counts(c, batch_id)

    def list_batches(self, owner: str | None, after: str | None, limit: int) -> tuple[list[tuple[dict, dict]], bool]:
        """Newest first, `limit` after the batch `after` (OpenAI's cursor pagination)."""
        where, params = "", {"n": limit + 1}
        if owner is not None:
            where, params["owner"] = "WHERE owner = :owner", owner
        with self._tx(read=True) as c:
            if after is not None:
                cursor = c.execute(text("SELECT created_at, id FROM batches WHERE id = :id"), {"id": after}).first()
                if cursor is not None:
                    where += (" AND" if where else "WHERE") + " (created_at < :ca OR (created_at = :ca AND id < :cid))"
                    params.update(ca=cursor[0], cid=cursor[1])
            rows = c.execute(text(f"SELECT * FROM batches {where} ORDER BY created_at DESC, id DESC LIMIT :n"),
                             params).mappings().all()
            out = [(dict(r), self._counts(c, r["id"])) for r in rows[:limit]]
        return out, len(rows) > limit

    def cancel(self, batch_id: str, owner: str | None, now: float) -> bool:
        """validating/in_progress -> cancelling; no new line starts, finished results stay. False when absent."""
        with self._tx() as c:
            found = c.execute(text("SELECT owner FROM batches WHERE id = :id"), {"id": batch_id}).first()
            if found is None or (owner is not None and found[0] != owner):
                return False
            c.execute(text("UPDATE batches SET status = 'cancelling', cancelling_at = :now "
                           "WHERE id = :id AND status IN ('validating', 'in_progress')"), {"id": batch_id, "now": int(now)})
        return True

    @staticmethod
    def _counts(c: sa.Connection, batch_id: str) -> dict[str, int]:
        return {s: n for s, n in c.execute(text("SELECT state, COUNT(*) FROM batch_lines WHERE batch_id = :b GROUP BY state"),
                                           {"b": batch_id}).all()}

    # --- the workers' side ---
    def heartbeat(self, worker: str, now: float, interactive: Iterable[tuple[str, float]] = ()) -> int:
        """Say this worker lives (and when it last saw interactive requests per model); returns
        how many workers live now, so each takes its share of a model's batch slots."""
        with self._tx() as c:
            c.execute(text("DELETE FROM batch_workers WHERE seen_at < :old"), {"old": now - 3600})
            c.execute(text("DELETE FROM batch_traffic WHERE interactive_at < :old"), {"old": now - 3600})
            c.execute(text("INSERT INTO batch_workers (worker, seen_at) VALUES (:w, :now) "
                           "ON CONFLICT (worker) DO UPDATE SET seen_at = excluded.seen_at"), {"w": worker, "now": now})
            for model, at in interactive:
                c.execute(text("INSERT INTO batch_traffic (model, worker, interactive_at) VALUES (:m, :w, :at) "
                               "ON CONFLICT (model, worker) DO UPDATE SET interactive_at = excluded.interactive_at"),
                          {"m": model, "w": worker, "at": at})
            return int(c.execute(text("SELECT COUNT(*) FROM batch_workers WHERE seen_at >= :since"),
                                 {"since": now - 10}).scalar_one())

    def busy_models(self, since: float) -> set[str]:
        """Models any router replica saw interactive requests for since then."""
        with self._tx(read=True) as c:
            return {r[0] for r in c.execute(text("SELECT DISTINCT model FROM batch_traffic WHERE interactive_at >= :s"),
                                            {"s": since}).all()}

    def models_with_work(self, now: float) -> set[str]:
        with self._tx(read=True) as c:
            return {r[0] for r in c.execute(text(
                "SELECT DISTINCT l.model FROM batch_lines l JOIN batches b ON b.id = l.batch_id "
                "WHERE b.status IN ('validating', 'in_progress') AND ((l.state = 'pending' AND l.not_before <= :now) "
                "OR (l.state = 'leased' AND l.lease_until < :now))"), {"now": now}).all()}

    def claim(self, worker: str, models: list[str], n: int, now: float, lease_s: float) -> list[dict[str, Any]]:
        """Up to n runnable lines of these models, oldest batch first, leased to `worker`."""
        if n <= 0 or not models:
            return []
        lock = " FOR UPDATE OF l SKIP LOCKED" if self.postgres else ""
        names = ", ".join(f":m{i}" for i in range(len(models)))
        with self._tx() as c:
            rows = c.execute(text(
                "UPDATE batch_lines SET state = 'leased', lease_owner = :w, lease_until = :until, attempts = attempts + 1 "
                "WHERE (batch_id, idx) IN (SELECT l.batch_id, l.idx FROM batch_lines l JOIN batches b ON b.id = l.batch_id "
                f"WHERE b.status IN ('validating', 'in_progress') AND l.model IN ({names}) AND ("
                "(l.state = 'pending' AND l.not_before <= :now) OR (l.state = 'leased' AND l.lease_until < :now)) "
                f"ORDER BY b.created_at, l.batch_id, l.idx LIMIT :n{lock}) "
                "RETURNING batch_id, idx, custom_id, model, body, attempts, preemptions"),
                {"w": worker, "until": now + lease_s, "now": now, "n": n, **{f"m{i}": m for i, m in enumerate(models)}},
            ).mappings().all()
        return sorted((dict(r) for r in rows), key=lambda r: (r["batch_id"], r["idx"]))  # RETURNING has no order

    def renew(self, worker: str, until: float, lines: list[tuple[str, int]]) -> None:
        """Extend the leases of the lines this worker is running (only those: a line it holds but
        no longer runs must lapse, so another worker takes it)."""
        if not lines:
            return
        with self._tx() as c:
            c.execute(text("UPDATE batch_lines SET lease_until = :until WHERE batch_id = :b AND idx = :i "
                           "AND lease_owner = :w AND state = 'leased'"),
                      [{"w": worker, "until": until, "b": b, "i": i} for b, i in lines])

    def finish(self, worker: str, batch_id: str, idx: int, ok: bool, result: str, now: float) -> bool:
        """Record a line's one result; False (nothing written) when this worker no longer holds it."""
        with self._tx() as c:
            n = c.execute(text(
                "UPDATE batch_lines SET state = :state, result = :result, finished_at = :now, finished_by = :w, "
                "lease_owner = NULL, lease_until = NULL, body = NULL WHERE batch_id = :b AND idx = :i AND state = 'leased' AND lease_owner = :w"),
                {"state": "done" if ok else "failed", "result": result, "now": now, "b": batch_id, "i": idx, "w": worker},
            ).rowcount
        return n == 1

    def release(self, worker: str, batch_id: str, idx: int, not_before: float, counted: bool, preempted: bool = False) -> None:
        """Give a line back to run later (overloaded, rate-limited, preempted); `counted`: the try counts."""
        with self._tx() as c:
            c.execute(text(
                "UPDATE batch_lines SET state = 'pending', lease_owner = NULL, lease_until = NULL, not_before = :nb, "
                "attempts = attempts - :refund, preemptions = preemptions + :pre "
                "WHERE batch_id = :b AND idx = :i AND state = 'leased' AND lease_owner = :w"),
                {"nb": not_before, "refund": 0 if counted else 1, "pre": int(preempted), "b": batch_id, "i": idx, "w": worker})

    def advance(self, worker: str, now: float, lease_s: float) -> list[str]:
        """Move batches on: expire those past their window, finalize those with no line left to
        run, end cancelling ones once their running lines are done. Returns the batches ended."""
        ended = []
        with self._tx() as c:  # accepted and stored whole: its lines may run
            c.execute(text("UPDATE batches SET status = 'in_progress', in_progress_at = :now WHERE status = 'validating'"),
                      {"now": int(now)})
            candidates = c.execute(text(
                "SELECT id, status, expires_at FROM batches WHERE status IN ('validating', 'in_progress', 'cancelling', "
                "'finalizing') AND (lease_until IS NULL OR lease_until < :now)"), {"now": now}).all()
        for batch_id, status, expires_at in candidates:
            with self._tx() as c:
                left = c.execute(text("SELECT COUNT(*) FROM batch_lines WHERE batch_id = :b AND state IN ('pending', 'leased')"),
                                 {"b": batch_id}).scalar_one()
                leased = c.execute(text("SELECT COUNT(*) FROM batch_lines WHERE batch_id = :b AND state = 'leased' "
                                        "AND lease_until >= :now"), {"b": batch_id, "now": now}).scalar_one()
                if status == "finalizing" or (status == "in_progress" and not left):
                    target, code = "completed", None
                elif status in ACTIVE and now >= expires_at:
                    target, code = "expired", "batch_expired"
                elif status == "cancelling" and not leased:
                    target, code = "cancelled", "batch_cancelled"
                else:
                    continue
                # Claim the move (one worker wins), show `finalizing`, then end the batch.
                moved = c.execute(text("UPDATE batches SET status = 'finalizing', finalizing_at = COALESCE(finalizing_at, :t), "
                                       "lease_owner = :w, lease_until = :until WHERE id = :b AND status = :s "
                                       "AND (lease_until IS NULL OR lease_until < :now)"),
                                  {"t": int(now), "w": worker, "until": now + lease_s, "b": batch_id, "s": status,
                                   "now": now}).rowcount
                if moved != 1:
                    continue
                if code is not None:
                    self._close_lines(c, batch_id, code, now)
                self._finalize(c, batch_id, target, now)
                ended.append(batch_id)
        return ended

    @staticmethod
    def _close_lines(c: sa.Connection, batch_id: str, code: str, now: float) -> None:
        """Lines that will not run (the batch expired or was cancelled) become error lines."""
        why = {"batch_expired": "the batch's completion window ended before this line ran",
               "batch_cancelled": "the batch was cancelled before this line ran"}[code]
        rows = c.execute(text("SELECT idx, custom_id FROM batch_lines WHERE batch_id = :b AND state IN ('pending', 'leased')"),
                         {"b": batch_id}).all()
        if rows:
            c.execute(text("UPDATE batch_lines SET state = 'failed', result = :result, finished_at = :now, body = NULL, "
                           "lease_owner = NULL, lease_until = NULL WHERE batch_id = :b AND idx = :i "
                           "AND state IN ('pending', 'leased')"),  # a finish committed meanwhile stays
                      [{"result": error_line(cid, code, why), "now": now, "b": batch_id, "i": idx} for idx, cid in rows])

    def _finalize(self, c: sa.Connection, batch_id: str, status: str, now: float) -> None:
        """Output and error files over the result lines, and the batch's final status."""
        owner = c.execute(text("SELECT owner FROM batches WHERE id = :b"), {"b": batch_id}).scalar_one()
        files: dict[str, str | None] = {"done": None, "failed": None}
        for state in files:
            octets = "OCTET_LENGTH(result)" if self.postgres else "LENGTH(CAST(result AS BLOB))"
            size, count = c.execute(text(f"SELECT COALESCE(SUM({octets} + 1), 0), COUNT(*) FROM batch_lines "
                                         "WHERE batch_id = :b AND state = :s"), {"b": batch_id, "s": state}).one()
            if count:
                files[state] = new_id("file-")
                c.execute(text("INSERT INTO batch_files (id, owner, purpose, filename, bytes, created_at, batch_id, line_state) "
                               "VALUES (:id, :owner, 'batch_output', :name, :bytes, :now, :b, :s)"),
                          {"id": files[state], "owner": owner, "name": f"{batch_id}_{'output' if state == 'done' else 'error'}.jsonl",
                           "bytes": int(size), "now": int(now), "b": batch_id, "s": state})
        stamp = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]
        c.execute(text(f"UPDATE batches SET status = :s, {stamp} = :t, output_file_id = :out, error_file_id = :err, "
                       "lease_owner = NULL, lease_until = NULL WHERE id = :b"),
                  {"s": status, "t": int(now), "out": files["done"], "err": files["failed"], "b": batch_id})

    # --- operators ---
    def progress(self, now: float, window_s: float = 60.0, recent_s: float = 3600.0) -> list[dict[str, Any]]:
        """Batches not ended, and those ended within `recent_s`: counts, rate over `window_s`, ETA."""
        with self._tx(read=True) as c:
            rows = c.execute(text(
                "SELECT id, owner, endpoint, status, created_at, expires_at, COALESCE(completed_at, failed_at, expired_at, "
                "cancelled_at) AS ended_at FROM batches WHERE status NOT IN ('completed', 'failed', 'expired', 'cancelled') "
                "OR COALESCE(completed_at, failed_at, expired_at, cancelled_at) >= :recent ORDER BY created_at DESC LIMIT 50"),
                {"recent": int(now - recent_s)}).mappings().all()
            out = []
            for r in rows:
                counts = self._counts(c, r["id"])
                recent = c.execute(text("SELECT COUNT(*) FROM batch_lines WHERE batch_id = :b AND finished_at >= :s"),
                                   {"b": r["id"], "s": now - window_s}).scalar_one()
                models = c.execute(text("SELECT model, COUNT(*) FROM batch_lines WHERE batch_id = :b AND state IN "
                                        "('pending', 'leased') GROUP BY model"), {"b": r["id"]}).all()
                rate = recent / window_s
                left = counts.get("pending", 0) + counts.get("leased", 0)
                out.append({**dict(r), "total": sum(counts.values()), "completed": counts.get("done", 0),
                            "failed": counts.get("failed", 0), "running": counts.get("leased", 0),
                            "pending": counts.get("pending", 0), "lines_per_s": round(rate, 2),
                            "eta_s": round(left / rate) if rate and left else None,
                            "pending_by_model": {m or "?": n for m, n in models}})
        return out

    def pending_by_model(self) -> dict[str, int]:
        with self._tx(read=True) as c:
            return {m: n for m, n in c.execute(text(
                "SELECT l.model, COUNT(*) FROM batch_lines l JOIN batches b ON b.id = l.batch_id WHERE b.status IN "
                "('validating', 'in_progress', 'cancelling') AND l.state IN ('pending', 'leased') GROUP BY l.model")).all()}


def _delete_uploads(c: sa.Connection, ids: list[str]) -> int:
    """File rows and their stored chunks (output/error files have none: their content is lines)."""
    c.execute(_in("DELETE FROM batch_file_chunks WHERE file_id IN :ids"), {"ids": ids})
    return c.execute(_in("DELETE FROM batch_files WHERE id IN :ids"), {"ids": ids}).rowcount


def _in(sql: str) -> sa.TextClause:
    """A statement whose `:ids` is a list (`IN :ids`), expanded by SQLAlchemy for either database."""
    return text(sql).bindparams(sa.bindparam("ids", expanding=True))
