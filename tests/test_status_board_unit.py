"""The status board seen from its callers: the handle kept per app, and the circuit report, with
fakes in place of Ray's named-actor lookup and of the Serve replica context (no cluster)."""

from __future__ import annotations

import concurrent.futures
import threading
from types import SimpleNamespace

from ray.exceptions import ActorDiedError, ActorUnavailableError

from deployments import status_board
from serve_app import status


class FakeBoards:
    """Stands in for `StatusBoard.options(...).remote()`: each lookup hands out a new handle, whose
    calls fail with `error` while it is set."""

    def __init__(self) -> None:
        self.lookups: list[str] = []
        self.error: Exception | None = None

    def options(self, name: str, **_: object) -> SimpleNamespace:
        return SimpleNamespace(remote=lambda: self._lookup(name))

    def _lookup(self, name: str) -> SimpleNamespace:
        self.lookups.append(name)
        return SimpleNamespace(read=SimpleNamespace(remote=self._read))

    def _read(self) -> SimpleNamespace:
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self.error is None:
            done.set_result({})
        else:
            done.set_exception(self.error)
        return SimpleNamespace(future=lambda: done)


def test_the_board_is_looked_up_once_per_app_and_again_after_it_died(monkeypatch):
    boards = FakeBoards()
    monkeypatch.setattr(status_board, "StatusBoard", boards)
    monkeypatch.setattr(status_board, "_boards", {})
    for _ in range(3):
        status_board.call("app", "read")
    status_board.call("other", "read")
    assert boards.lookups == ["status_board::app", "status_board::other"]
    boards.error = ActorUnavailableError("restarting", None)  # max_restarts brings it back behind the same handle
    status_board.call("app", "read")
    boards.error = None
    status_board.call("app", "read")
    assert len(boards.lookups) == 2
    boards.error = ActorDiedError()  # killed for good: the next call must find (or make) a new board
    status_board.call("app", "read")
    boards.error = None
    status_board.call("app", "read")
    status_board.call("app", "read")
    assert boards.lookups == ["status_board::app", "status_board::other", "status_board::app"]


def test_a_circuit_change_reaches_the_board_with_this_router_replicas_id(monkeypatch):
    calls = []
    monkeypatch.setattr(status_board, "call", lambda app, method, *args: calls.append((app, method, *args)))
    status.report_circuit("m", {"state": "open", "last_error": "boom"})
    assert calls == []  # outside Serve: no board to tell
    ctx = SimpleNamespace(app_name="app", replica_id=SimpleNamespace(unique_id="router-1"))
    monkeypatch.setattr(status, "replica_context", lambda: ctx)
    status.report_circuit("m", {"state": "half_open", "last_error": "boom"})
    status.report_circuit("m", {"state": "closed", "consecutive_failures": 0})
    (app, method, model, replica, opened), (*_, closed) = calls
    assert (app, method, model, replica) == ("app", "circuit", "m", "router-1")
    assert opened["state"] == "open" and opened["last_error"] == "boom"  # half-open is still not closed
    assert closed["state"] == "closed" and closed["last_error"] is None and set(closed) == {"state", "since", "last_error"}


def test_reports_change_only_under_the_lock_and_never_under_a_reader(monkeypatch):
    """The alert thread reads copies of the reports while Ray calls mark_gone: every change holds
    the board's lock, and a report a reader already has is never edited (issue 20.12)."""
    board = status_board.StatusBoard.__ray_actor_class__()
    held = []

    class Watched:
        def __init__(self) -> None:
            self.lock, self.depth = threading.Lock(), 0

        def __enter__(self):
            self.lock.acquire()
            self.depth += 1

        def __exit__(self, *exc):
            self.depth -= 1
            self.lock.release()

    board._lock = Watched()
    board.post("ce", "r1", {"healthy": True})
    seen_by_reader = board.read()["ce"]["r1"]
    reports = board.reports["ce"]

    class Guarded(dict):
        def __setitem__(self, key, value):
            held.append(board._lock.depth > 0)
            super().__setitem__(key, value)

    board.reports["ce"] = Guarded(reports)
    board.mark_gone("ce", "r1", 123.0)
    board.mark_gone("ce", "r1", 456.0)  # the first time Serve stopped listing it is kept
    assert board.read()["ce"]["r1"]["gone_at"] == 123.0
    assert "gone_at" not in seen_by_reader  # the reader's copy is untouched
    assert held and all(held)
