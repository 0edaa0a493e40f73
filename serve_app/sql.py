"""SQLite files that the router replicas of one node share (usage, batches), opened one way."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event


READ_ONLY = "serve_app_read_only"  # execution option: this connection's transaction only reads


def sqlite_engine(path: pathlib.Path, busy_timeout_s: float) -> sa.Engine:
    """An engine over the file at `path` (its folder made if missing). A writing transaction takes
    the write lock at BEGIN (IMMEDIATE), waiting up to `busy_timeout_s`, so two processes never
    deadlock upgrading a read lock. A reading one (`reading()`) takes no lock at all: under WAL it
    reads the last committed state while a writer works, so status pages never queue behind writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver issues no BEGIN of its own
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


@contextlib.contextmanager
def reading(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that only reads (any engine; on SQLite it waits for no writer)."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn
