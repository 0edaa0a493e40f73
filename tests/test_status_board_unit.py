"""The status board seen from its callers: the handle kept per app, and the circuit report, with
fakes in place of Ray's named-actor lookup and of the Serve replica context (no cluster)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
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
        return SimpleNamespace(remote=lambda app: self._lookup(name, app))

    def _lookup(self, name: str, app: str) -> SimpleNamespace:
        assert name == f"status_board::{app}"  # a board made anew knows whose saved state to read
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


def test_a_board_made_anew_alerts_with_its_saved_config_restart_counts_and_nodes(monkeypatch):
    """Issue 20.11: a restarted board used to forget its alert targets (no alert, the page said
    alerts were off) and the restart counts. It keeps them in the GCS key-value store."""
    from ray.experimental import internal_kv

    kv: dict[tuple, bytes] = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_put", lambda k, v, overwrite=True, namespace=None: kv.__setitem__((namespace, k), v))
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda k, namespace=None: kv.get((namespace, k)))
    Board = status_board.StatusBoard.__ray_actor_class__
    alerts = {"targets": [{"kind": "webhook", "url": "http://127.0.0.1:9/hook"}], "check_period_s": 60}
    models = {"ce": {"deployment": "rerank-ce", "silent_after_s": 25.0}}
    first = Board("app")
    assert first.alert_state() == {"enabled": False}
    first.configure_alerts("app", alerts, models)
    first._alerts.tracker.restarts["ce"] = 2  # what a period counted...
    first._alerts.tracker.nodes_alive["node-b"] = "10.0.0.2"  # ...and a node it saw
    first._alerts.saved.store(restarts=dict(first._alerts.tracker.restarts), nodes_alive=dict(first._alerts.tracker.nodes_alive))
    first._alerts.stop()
    again = Board("app")  # Ray's restart, or a new board after the old one was killed
    try:
        state = again.alert_state()
        assert state["enabled"] is True and state["restarts"] == {"ce": 2}
        assert again._alerts.tracker.nodes_alive == {"node-b": "10.0.0.2"}  # a node gone meanwhile is still seen leaving
        again.configure_alerts("app", alerts, models)  # a router re-sends the same config: nothing changes
        assert again.alert_state()["restarts"] == {"ce": 2}
    finally:
        again._alerts.stop()
    assert Board("other").alert_state() == {"enabled": False}  # per app


def test_the_periodic_resend_never_replaces_a_config_the_board_has(monkeypatch):
    """Old and new routers of a rolling update re-send different configs every 30 s: with
    `unless_set` they cannot take turns rebuilding the alert loop; a router's start still wins."""
    Board = status_board.StatusBoard.__ray_actor_class__
    board = Board()  # no app: nothing saved
    old, new = {"window_s": 60}, {"window_s": 90}
    board.configure_alerts("app", old, {}, unless_set=True)  # a board without one takes it
    loop = board._alerts
    board.configure_alerts("app", new, {}, unless_set=True)
    assert board._alerts is loop and loop.cfg.window_s == 60
    board.configure_alerts("app", new, {})  # a new router's start
    assert board._alerts is not loop and board._alerts.cfg.window_s == 90
    board._alerts.stop()
    loop.stop()


def _board_with_fake_ray(monkeypatch, listing):
    """A board configured for app "app", with the GCS store, Serve's listing and ray.kill faked."""
    from ray.experimental import internal_kv

    kv: dict[tuple, bytes] = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_put", lambda k, v, overwrite=True, namespace=None: kv.__setitem__((namespace, k), v))
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda k, namespace=None: kv.get((namespace, k)))
    monkeypatch.setattr(internal_kv, "_internal_kv_del", lambda k, namespace=None: kv.pop((namespace, k), None))
    killed: list[tuple] = []
    monkeypatch.setattr(status_board.ray, "kill", lambda handle, no_restart=False: killed.append((handle, no_restart)))
    monkeypatch.setattr(status_board.ray, "get_runtime_context", lambda: SimpleNamespace(current_actor="this board"))
    monkeypatch.setattr(status_board, "app_deployments", listing)
    monkeypatch.setattr(status_board, "_nodes", lambda: None)
    board = status_board.StatusBoard.__ray_actor_class__("app")
    return board, kv, killed


def test_a_board_ends_itself_and_its_saved_state_once_serve_has_not_listed_its_app_for_a_minute(monkeypatch):
    """A deleted app's board used to poll the controller every check period until the cluster
    stopped (seen in a full test run: every deleted test app's board). Only Serve's answer
    without the app counts toward the minute; a controller that cannot be asked is no verdict."""
    answer = {"now": "listed"}

    def listing(app):
        if answer["now"] == "listed":
            return {}
        if answer["now"] == "busy":
            raise TimeoutError("controller busy")
        raise KeyError(app)

    board, kv, killed = _board_with_fake_ray(monkeypatch, listing)
    board.configure_alerts("app", {"check_period_s": 60}, {})  # its own thread waits a minute: driven by hand here
    loop, now = board._alerts, [1000.0]
    loop.clock = lambda: now[0]
    try:
        assert kv  # the config was saved
        answer["now"] = "gone"
        loop._world()
        now[0] += 59
        answer["now"] = "busy"
        loop._world()
        assert not loop.app_gone()
        answer["now"] = "listed"  # re-added within the minute: the count starts over
        loop._world()
        answer["now"] = "gone"
        now[0] += 30
        loop._world()
        now[0] += 59
        assert not loop.app_gone()
        now[0] += 1
        assert loop.app_gone()
        answer["now"] = "busy"  # a minute without the app, but the latest period got no answer: no verdict
        loop._world()
        assert not loop.app_gone()
        answer["now"] = "gone"
        loop._world()
        assert loop.app_gone()
    finally:
        loop.stop()
    loop.on_app_gone()
    assert killed == [("this board", True)] and not kv  # for good (no restart), and nothing left for a namesake


def test_the_alert_thread_ends_the_board_when_its_app_is_gone_and_not_when_the_controller_is_busy(monkeypatch):
    monkeypatch.setattr(status_board, "APP_GONE_EXIT_S", 0.0)
    busy, _, killed_busy = _board_with_fake_ray(monkeypatch, lambda app: (_ for _ in ()).throw(TimeoutError("busy")))
    busy.configure_alerts("app", {"check_period_s": 0.01}, {})
    time.sleep(0.3)
    assert killed_busy == [] and not busy._alerts._stop.is_set()
    busy._alerts.stop()
    gone, kv, killed = _board_with_fake_ray(monkeypatch, lambda app: (_ for _ in ()).throw(KeyError(app)))
    gone.configure_alerts("app", {"check_period_s": 0.01}, {})
    deadline = time.time() + 5
    while not killed and time.time() < deadline:
        time.sleep(0.01)
    assert killed == [("this board", True)] and gone._alerts._stop.is_set() and not kv
