"""Where replicas post their own health, for the router's status view.

A handle call reaches one replica at random, so the router cannot ask each replica in turn;
instead every replica posts a snapshot from each `check_health` (every health period) to one
small named actor per application, and the router reads them all. A replica that stops
posting is shown as silent after two periods; one that Serve no longer lists, as gone
(serve_app/status.py), and then forgotten.

The board is also the one component that pushes alerts (serve_app/alerts/tracker.py decides,
serve_app/alerts/delivery.py sends): it already hears from every replica every health period,
and it is one actor per app, so every router replica does not alert on its own. The router
hands it `gateway.alerts` when it starts; a thread then compares, each `check_period_s`,
Serve's replica list, the reports and the live nodes. That thread runs even with no alert
targets, sending nothing: the tracker's rules are what tell a replica Serve lost from one it
stopped on purpose, so the per-model restart count on /v1/status comes from the same place.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from deployments.serve_view import app_deployments, live_replicas, state_name
from serve_app.alerts import AlertDelivery, AlertTracker, ModelView, World
from serve_app.config import AlertsConfig
from serve_app.stories import Entry, StoriesConfig, StoryBook
from serve_app.traffic import History

logger = logging.getLogger("ray.serve")
RECENT_ALERTS = 50  # kept for /v1/status
MIGRATED_IDS_KEPT = 20  # request ids named per lost replica (its alert names them)
MIGRATED_REPLICAS_KEPT = 100  # lost replicas remembered, oldest forgotten first
SCALING_KEPT = 20  # per model, the autoscaler's last decisions that changed something
SAME_CHANGE_S = 60.0  # the same decision again within this long (re-sent while Serve's delay runs) is one change
# A board whose app Serve has not listed for this long ends itself and its saved state: a deleted
# app's board would otherwise ask the controller for every app's details each check period until
# the cluster stops. (Long enough for a `serve deploy` that removes and re-adds the app.)
APP_GONE_EXIT_S = 60.0

NAMESPACE = "serve_app"


@ray.remote(num_cpus=0, max_restarts=-1)
class StatusBoard:
    def __init__(self, app: str | None = None) -> None:
        """`app`: whose board this is. A board that Ray restarts (or that is made again after it was
        killed) takes its alert config, restart counts and the nodes it saw alive from the GCS
        (`Saved`), so it alerts at once, counts on, and still sees a node that left meanwhile."""
        self.reports: dict[str, dict[str, dict[str, Any]]] = {}
        self.circuits: dict[str, dict[str, dict[str, Any]]] = {}  # model -> router replica -> breaker state
        # lost replica id -> request ids of the streams continued elsewhere (serve_app/migration/)
        self.migrations: dict[str, list[str]] = {}
        # model -> the LLM token policy's last decision and its last changes (serve_app/autoscaling/)
        self.scaling: dict[str, dict[str, Any]] = {}
        self.load_s: dict[str, float] = {}  # model -> the load time its replicas last reported (cold starts)
        self._lock = threading.Lock()  # reports and circuits are read by the alert thread
        self.history = History()  # the last hour per model, for /status's charts (serve_app/traffic.py)
        self.book = StoryBook()  # every router replica's request stories (serve_app/stories.py)
        self._alerts: _AlertLoop | None = None
        self._saved = Saved(app) if app else None
        state = self._saved.load() if self._saved else None
        if state and state.get("config"):
            self.configure_alerts(*state["config"], restarts=state.get("restarts"), nodes_alive=state.get("nodes_alive"))

    def post(self, model: str, replica_id: str, snapshot: dict[str, Any]) -> None:
        now = time.time()
        with self._lock:
            self.reports.setdefault(model, {})[replica_id] = {**snapshot, "reported_at": now}
            if snapshot.get("load_s"):  # kept after the replica is gone: a model at zero still knows it
                self.load_s[model] = float(snapshot["load_s"])
            self.history.add_replica(model, replica_id, now, snapshot.get("kv_usage"), snapshot.get("in_flight"),
                                     (snapshot.get("autoscaling") or {}).get("prompt_tokens_waiting"))

    def traffic(self, window: dict[str, dict[str, Any]], ended_at: float | None = None) -> None:
        """A router replica's counts for the period that ended at `ended_at` (serve_app/status.py);
        a time far from this board's clock (a skewed node) is replaced by the board's."""
        now = time.time()
        with self._lock:
            self.history.add_window(ended_at if ended_at is not None and abs(now - ended_at) < 60 else now, window)

    def traffic_history(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return self.history.read(time.time())

    def add_stories(self, batch: list[tuple[Entry, bool]], limits: dict[str, Any]) -> None:
        """A router replica's finished request stories, (stories.encode(story), failed) pairs;
        `limits` is its gateway.stories (the newest router's wins)."""
        with self._lock:
            if limits != self.book.cfg.model_dump():
                self.book.resize(StoriesConfig.model_validate(limits))
            for story, failed in batch:
                self.book.add(story, failed)

    def story(self, request_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return self.book.find(request_id)

    def circuit(self, model: str, router_replica: str, snapshot: dict[str, Any]) -> None:
        """A router replica's circuit for `model` changed (opened, or closed again)."""
        with self._lock:
            self.circuits.setdefault(model, {})[router_replica] = dict(snapshot)

    def migrated(self, model: str, lost_replica: str, request_id: str) -> None:
        """A router continued a stream of `model` elsewhere after `lost_replica` was lost."""
        with self._lock:
            ids = self.migrations.setdefault(lost_replica, [])
            if request_id not in ids and len(ids) < MIGRATED_IDS_KEPT:
                ids.append(request_id)
            while len(self.migrations) > MIGRATED_REPLICAS_KEPT:
                self.migrations.pop(next(iter(self.migrations)))

    def autoscaled(self, model: str, decision: dict[str, Any]) -> None:
        """The LLM token policy's decision for `model` (from the Serve controller, each change and
        every few seconds): the last one, and the last SCALING_KEPT that were not a hold."""
        with self._lock:
            entry = self.scaling.setdefault(model, {"last": None, "changes": []})
            entry["last"] = dict(decision)
            last_change = entry["changes"][-1] if entry["changes"] else {}
            same = (last_change.get("replicas"), last_change.get("action")) == (decision.get("replicas"), decision.get("action"))
            if decision.get("action") != "hold" and not (same and decision.get("at", 0) - last_change.get("at", 0) < SAME_CHANGE_S):
                entry["changes"] = [*entry["changes"], dict(decision)][-SCALING_KEPT:]

    def scaling_state(self) -> dict[str, dict[str, Any]]:
        """Per model: the token policy's last decision, its last changes, the replicas' load time."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {m: {"last": e["last"], "changes": list(e["changes"])} for m, e in self.scaling.items()}
            for m, seconds in self.load_s.items():
                out.setdefault(m, {"last": None, "changes": []})["load_s"] = seconds
            return out

    def _migrations_copy(self) -> dict[str, list[str]]:
        with self._lock:
            return {r: list(ids) for r, ids in self.migrations.items()}

    def _circuits_copy(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self._lock:
            return {m: dict(rs) for m, rs in self.circuits.items()}

    def configure_alerts(self, app: str, alerts: dict[str, Any], models: dict[str, dict[str, Any]],
                         restarts: dict[str, int] | None = None, nodes_alive: dict[str, str] | None = None,
                         unless_set: bool = False) -> None:
        """alerts: GatewayConfig.alerts as a dict; models: name -> {deployment, silent_after_s}.
        Every router replica calls this at start (the newest config wins) and then every
        CONFIG_RESEND_S with `unless_set` (a board that has one keeps it: old and new routers of a
        rolling update do not take turns). The same config again changes nothing. (`restarts`,
        `nodes_alive`: what a restarted board saved.)"""
        wanted = (app, repr(alerts), repr(models))
        if self._alerts is not None and (unless_set or self._alerts.wanted == wanted):
            return
        if self._alerts is not None:
            self._alerts.stop()
            restarts, nodes_alive = self._alerts.restarts, dict(self._alerts.tracker.nodes_alive)  # a new config keeps them
        cfg = AlertsConfig.model_validate(alerts)
        self._alerts = _AlertLoop(wanted, app, cfg, models, self._read_copy, self._circuits_copy, restarts, nodes_alive,
                                  self._saved, on_app_gone=self._retire, migrations=self._migrations_copy)
        if self._saved is not None:
            self._saved.store(config=[app, alerts, models])

    def _retire(self) -> None:
        """The app is gone: forget what was saved for it and end this actor for good (a crash
        would be restarted). A later app of the same name makes a new board."""
        if self._saved is not None:
            self._saved.clear()
        logger.warning("status board: app %s not listed by Serve for %.0fs; ending", self._alerts.app if self._alerts else "?",
                       APP_GONE_EXIT_S)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def alert_state(self) -> dict[str, Any]:
        """Recent alerts, delivery counts and replicas lost per model (`restarts`), for /v1/status.
        `restarts` is absent until a router replica has configured the board (nothing counted yet)."""
        loop = self._alerts
        if loop is None:
            return {"enabled": False}
        if loop.delivery is None:
            return {"enabled": False, "restarts": dict(loop.restarts)}
        return {"enabled": True, "delivery": dict(loop.delivery.stats), "recent": list(loop.recent),
                "restarts": dict(loop.restarts)}

    def _read_copy(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self._lock:
            return {m: dict(rs) for m, rs in self.reports.items()}

    def mark_gone(self, model: str, replica_id: str, when: float) -> None:
        """Serve no longer lists this replica: remember since when, for the status view. Under the
        lock, and as a new report rather than an edit of the old one: the alert thread may hold it."""
        with self._lock:
            replicas = self.reports.get(model, {})
            report = replicas.get(replica_id)
            if report is not None and "gone_at" not in report:
                replicas[replica_id] = {**report, "gone_at": when}

    def forget(self, model: str, replica_id: str) -> None:
        with self._lock:
            self.reports.get(model, {}).pop(replica_id, None)

    def read(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self._read_copy()


class _AlertLoop:
    """The board's alert thread: gather one World per period, send what the tracker returns
    (with no targets, nothing: it then only keeps the restart count)."""

    def __init__(self, wanted: tuple, app: str, cfg, models: dict[str, dict[str, Any]], reports, circuits,
                 restarts: dict[str, int] | None = None, nodes_alive: dict[str, str] | None = None,
                 saved: "Saved | None" = None, on_app_gone=None, clock=time.monotonic, migrations=dict) -> None:
        self.wanted, self.app, self.cfg, self.models, self.reports = wanted, app, cfg, models, reports
        self.migrations = migrations
        self.circuits, self.saved, self.on_app_gone, self.clock = circuits, saved, on_app_gone, clock
        self.app_missing_since: float | None = None  # when the controller first answered without the app
        self.app_listed: bool | None = None  # the latest answer: listed, not listed, or none (unreachable)
        self.tracker = AlertTracker(cfg, app)
        self.tracker.restarts.update(restarts or {})
        self.tracker.nodes_alive.update(nodes_alive or {})
        self.restarts = dict(self.tracker.restarts)  # copied after each period: the actor thread reads it
        self.delivery = AlertDelivery(cfg.targets, cfg.timeout_s) if cfg.targets else None
        self.recent: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-board-alerts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.delivery is not None:
            self.delivery.close()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.check_period_s):
            try:
                world = self._world()
                if self.app_gone():
                    self.stop()
                    if self.on_app_gone is not None:
                        self.on_app_gone()
                    return
                messages = self.tracker.observe(world)
                self.restarts = dict(self.tracker.restarts)
                if self.saved is not None:
                    self.saved.store(restarts=self.restarts, nodes_alive=dict(self.tracker.nodes_alive))
                if self.delivery is None:
                    continue
                for message in messages:
                    logger.warning("alert: %s", message["text"])
                    self.recent = (self.recent + [message])[-RECENT_ALERTS:]
                    self.delivery.submit(message)
            except Exception:  # noqa: BLE001 - a bad period must not end alerting
                logger.exception("status board: alert check failed")

    def app_gone(self) -> bool:
        """The controller's latest answer left the app out, as have all its answers for APP_GONE_EXIT_S."""
        return (self.app_listed is False and self.app_missing_since is not None
                and self.clock() - self.app_missing_since >= APP_GONE_EXIT_S)

    def _world(self) -> World:
        try:
            deps = app_deployments(self.app)
            self.app_missing_since, self.app_listed = None, True
        except KeyError:  # the controller answered, without this app: deleted (or, briefly, being re-added)
            deps, self.app_listed = None, False
            if self.app_missing_since is None:
                self.app_missing_since = self.clock()
        except Exception:  # noqa: BLE001 - controller busy or restarting: no claim, and no verdict on the app
            deps, self.app_listed = None, None  # no claim about replicas or circuits this period
        return World(models=_models(deps, self.models), reports=self.reports(), nodes=_nodes(),
                     circuits=_live_router_circuits(deps, self.circuits()), migrated=self.migrations())


class Saved:
    """The board's state that must outlive the board, in the GCS's key-value store (Ray's
    internal_kv; it lives as long as the cluster): the alert config, restart counts per model, the
    nodes seen alive. Written only when it changed; a store that fails is logged, never fatal."""

    def __init__(self, app: str) -> None:
        self.key, self.state = f"status_board::{app}".encode(), {}
        self._lock = threading.Lock()  # the actor thread saves the config, the alert thread the counts

    def load(self) -> dict[str, Any]:
        from ray.experimental import internal_kv

        try:
            raw = internal_kv._internal_kv_get(self.key, namespace=NAMESPACE)
            self.state = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - start empty; the routers re-send the config
            logger.warning("status board: could not read its saved state", exc_info=True)
        return dict(self.state)

    def store(self, **changes: Any) -> None:
        from ray.experimental import internal_kv

        with self._lock:  # merged and written as one: no writer puts back what another just changed
            state = {**self.state, **changes}
            if state == self.state:
                return
            try:
                internal_kv._internal_kv_put(self.key, json.dumps(state).encode(), overwrite=True, namespace=NAMESPACE)
                self.state = state
            except Exception:  # noqa: BLE001 - tried again at the next change
                logger.warning("status board: could not save its state", exc_info=True)

    def clear(self) -> None:
        from ray.experimental import internal_kv

        with self._lock:
            try:
                internal_kv._internal_kv_del(self.key, namespace=NAMESPACE)
                self.state = {}
            except Exception:  # noqa: BLE001 - a stale entry is only read by a board of the same app name
                logger.warning("status board: could not clear its saved state", exc_info=True)


def _models(deps: dict[str, dict[str, Any]] | None, models: dict[str, dict[str, Any]]):
    """Serve's view per model, or None when the controller could not be asked (no claim then)."""
    if deps is None:
        return None
    out = {}
    for name, m in models.items():
        d = deps.get(m["deployment"])
        if d is None:
            return None
        config = d["deployment_config"]
        auto = config.get("autoscaling_config") or {}
        out[name] = ModelView(target=d["target_num_replicas"], replicas=live_replicas(d["replicas"]),
                              silent_after_s=m["silent_after_s"], status=state_name(d["status"]),
                              max_replicas=auto.get("max_replicas"), max_ongoing_requests=config.get("max_ongoing_requests"))
    return out


def _live_router_circuits(deps: dict[str, dict[str, Any]] | None,
                          circuits: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Only router replicas Serve still lists: a dead router's last word must not hold an alert open."""
    if not circuits or deps is None:
        return {}  # no circuit reported, or no claim about circuits this period
    try:
        # "router": serve_app.app.ROUTER_NAME (not imported here: it would load the router's stack)
        live = {r["replica_id"] for r in deps["router"]["replicas"]}
    except KeyError:  # the router deployment is not listed (yet): no claim
        return {}
    return {m: {r: c for r, c in rs.items() if r in live} for m, rs in circuits.items()}


def _nodes() -> dict[str, dict[str, Any]] | None:
    try:
        return {n["NodeID"]: {"alive": bool(n["Alive"]), "ip": n.get("NodeManagerAddress", "")} for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - GCS unreachable just now: no claim about nodes
        return None


_boards: dict[str, Any] = {}  # app name -> its board's handle, in this process


def board(app_name: str):
    """The app's board, created on first use; detached so it outlives any one replica. The handle
    is kept: finding the actor by name is a GCS round trip, and replicas post every health period."""
    handle = _boards.get(app_name)
    if handle is None:
        handle = _boards[app_name] = StatusBoard.options(
            name=f"status_board::{app_name}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        ).remote(app_name)
    return handle


def call(app_name: str, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
    """`method(*args)` on the app's board; await the ref or drop it. A crashed board is restarted
    behind the same handle (max_restarts), but one killed for good fails every call with
    ActorDiedError: then the kept handle is dropped, so the next call finds or creates a new board."""
    handle = board(app_name)
    ref = getattr(handle, method).remote(*args, **kwargs)
    ref.future().add_done_callback(lambda done: _drop_if_dead(app_name, handle, done))
    return ref


def _drop_if_dead(app_name: str, handle: Any, done: concurrent.futures.Future) -> None:
    if not done.cancelled() and isinstance(done.exception(), ActorDiedError) and _boards.get(app_name) is handle:
        _boards.pop(app_name, None)
