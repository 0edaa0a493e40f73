"""What to alert on, decided in one place: each check period the status board hands over what
Serve lists, what the replicas reported and which nodes are alive; this turns changes into
incidents and incidents into at most one alert and one recovery per window.

Pure (no Ray, no I/O, an injectable clock) so the rules are unit-tested; the status board
(deployments/status_board.py) owns the one tracker per app, and serve_app/alerts/delivery.py
sends what it returns. Incidents of one model (or one node) share a rate-limit key: a flapping
replica, replaced again and again, yields one alert and one recovery per `window_s`, and the
next alert says how many incidents were folded meanwhile.

It also counts, per model, the replicas Serve lost outside a planned stop (`restarts`, for the
status page): the same rules that decide `gone` decide what counts, so the count and the
alerts never disagree.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from serve_app.alerts.config import AlertsConfig

# What a problem is called in an alert, worst first (one incident shows its worst state).
GONE, STALLED, UNHEALTHY, SILENT, NO_READY, NODE_LEFT, CIRCUIT_OPEN, AT_MAX = (
    "gone", "stalled", "unhealthy", "silent", "no_ready_replica", "node_left", "circuit_open", "at_max_replicas")
PLANNED_STOP_STATUSES = frozenset({"UPDATING", "DOWNSCALING"})
STARTING_STATUSES = frozenset({"UPDATING", "UPSCALING"})
_WHAT = {
    GONE: "replica gone (killed, crashed, replaced, or its node left); Serve no longer lists it",
    STALLED: "replica stalled: requests in flight, no progress",
    UNHEALTHY: "replica failed its deep health check",
    SILENT: "replica stopped reporting its health (wedged, or its node is unreachable)",
    NO_READY: "no ready replica: requests to this model fail or wait",
    NODE_LEFT: "node left the cluster",
    CIRCUIT_OPEN: "circuit open: routers refuse this model after its own repeated failures "
                  "(engine errors its probe confirmed, missed deadlines)",
    AT_MAX: "autoscaler at max_replicas and every replica full: further requests queue at the router "
            "(raise max_replicas or add GPUs)",
}


@dataclasses.dataclass
class ModelView:
    """Serve's view of one model's deployment (replicas, target, bounds), plus how often its
    replicas report."""

    target: int
    replicas: dict[str, dict[str, Any]]  # replica id -> {"state", "node_id", "node_ip"}
    silent_after_s: float
    status: str = "HEALTHY"  # Serve's deployment status (UPDATING, DOWNSCALING, ...)
    max_replicas: int | None = None  # the autoscaler's upper bound; None: a fixed replica count
    max_ongoing_requests: int = 0  # what Serve sends one replica at once; more waits at the handle


@dataclasses.dataclass
class World:
    """One check period's inputs. `models` is None when the controller could not be asked:
    then no claim is made about replicas either way."""

    models: dict[str, ModelView] | None
    reports: dict[str, dict[str, dict[str, Any]]]  # model -> replica id -> the replica's snapshot
    nodes: dict[str, dict[str, Any]] | None  # node id -> {"alive": bool, "ip": str}
    # model -> router replica id -> {"state", "since", "last_error"}, live router replicas only
    circuits: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    # lost replica id -> request ids of its streams that routers continued elsewhere
    migrated: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Incident:
    key: str  # rate-limit key: "model:NAME" or "node:ID"
    model: str | None
    replica: str | None
    node_id: str | None
    node_ip: str | None
    what: str
    since: float
    last_error: str | None = None
    last_error_at: float | None = None
    request_ids: list[str] = dataclasses.field(default_factory=list)
    detail: str = ""
    migrated: list[str] = dataclasses.field(default_factory=list)  # streams continued on another replica

    def public(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "description": _WHAT[self.what]}


@dataclasses.dataclass
class _Key:
    open: dict[str, Incident] = dataclasses.field(default_factory=dict)  # incident id -> incident
    alerted: bool = False
    last_alert_at: float = float("-inf")
    folded: int = 0  # incidents held back by the window since the last alert
    resolution: str = ""  # how the last incident closed, for the recovery message


class AlertTracker:
    def __init__(self, cfg: AlertsConfig, app: str, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.app, self.clock = cfg, app, clock
        self.keys: dict[str, _Key] = {}
        self.seen: dict[str, dict[str, dict[str, Any]]] = {}  # model -> replica id -> where it ran
        self.nodes_alive: dict[str, str] = {}  # node id -> ip, nodes seen alive
        self.restarts: dict[str, int] = {}  # model -> replicas gone outside a planned stop
        self.full_since: dict[str, float] = {}  # model -> first period seen at max_replicas and full

    def observe(self, world: World) -> list[dict[str, Any]]:
        """Update incidents from one period's view; return the messages to send now."""
        now = self.clock()
        if world.models is not None:
            for model, view in world.models.items():
                self._replicas(model, view, world.reports.get(model, {}), now, world.migrated)
                self._at_max(model, view, world.reports.get(model, {}), now)
        if world.nodes is not None:
            self._nodes(world, now)
        self._circuits(world, now)
        return self._messages(now)

    # --- incidents ---
    def _replicas(self, model: str, view: ModelView, reports: dict[str, dict[str, Any]], now: float,
                  migrated: dict[str, list[str]] | None = None) -> None:
        seen = self.seen.setdefault(model, {})
        running = sum(1 for r in view.replicas.values() if r.get("state") == "RUNNING")
        # Serve stops a dead replica as it stops one on purpose (STOPPING, then unlisted); a stop is
        # planned when Serve is updating or downscaling, or the others already cover the target.
        planned_now = view.status in PLANNED_STOP_STATUSES or running >= view.target
        for rid in [r for r, w in seen.items() if r not in view.replicas and (w["planned_stop"] or (
                w["state"] != "STOPPING" and view.status in PLANNED_STOP_STATUSES))]:
            del seen[rid]
            self._close(f"model:{model}", f"replica:{rid}", f"replica {rid} stopped; {running} running")
        for rid, info in view.replicas.items():
            before = seen.get(rid, {})
            stopping = info.get("state") == "STOPPING"
            planned = before.get("planned_stop") if before.get("state") == "STOPPING" else (stopping and planned_now)
            seen[rid] = {"node_id": info.get("node_id"), "node_ip": info.get("node_ip"), "state": info.get("state"),
                         "planned_stop": bool(planned), "counted": before.get("counted", False)}
        healthy = []
        for rid, where in list(seen.items()):
            report = reports.get(rid, {})
            problem = self._problem(rid, view, report, now, where["planned_stop"])
            iid = f"replica:{rid}"
            if problem == GONE and not where["counted"]:
                where["counted"] = True
                self.restarts[model] = self.restarts.get(model, 0) + 1
            if problem is None:
                if rid in view.replicas and view.replicas[rid].get("state") == "RUNNING":
                    healthy.append(rid)
                self._close(f"model:{model}", iid, f"replica {rid} healthy again")
                continue
            self._open(Incident(
                key=f"model:{model}", model=model, replica=rid, node_id=where["node_id"] or report.get("node_id"),
                node_ip=where["node_ip"] or report.get("node_ip"), what=problem,
                since=report.get("failing_since") or now, last_error=report.get("last_error"),
                last_error_at=report.get("last_error_at"), request_ids=_request_ids(problem, report),
                migrated=list((migrated or {}).get(rid, ())),
            ), iid)
        if len(healthy) >= view.target:  # every gone replica replaced: those incidents are over
            for rid in [r for r in seen if r not in view.replicas]:
                self._close(f"model:{model}", f"replica:{rid}", f"replaced; serving: {', '.join(sorted(healthy))}")
                del seen[rid]
        no_ready = f"model:{model}:no_ready"
        # A deploy, an update or a scale-up from zero starts with no ready replica: not an incident
        # (a deploy that never finishes is Prometheus' ServeDeploymentUnhealthy / ReplicasBelowTarget).
        if view.target > 0 and not healthy and view.status not in STARTING_STATUSES:
            self._open(Incident(key=f"model:{model}", model=model, replica=None, node_id=None, node_ip=None,
                                what=NO_READY, since=now, detail=f"target {view.target} replica(s), 0 ready"), no_ready)
        else:
            self._close(f"model:{model}", no_ready, f"{len(healthy)} ready replica(s)")

    def _at_max(self, model: str, view: ModelView, reports: dict[str, dict[str, Any]], now: float) -> None:
        """At max_replicas with every replica full, held for `at_max_sustain_s` (a burst is not an
        alert); over when demand fits again or the target drops below max.

        Full: the in-flight counts the replicas post with their health (deployments/health.py),
        summed over running replicas with a fresh report, reach target x max_ongoing_requests.
        Serve's handle sends no replica more than that, so the next request waits in the router's
        queue. Ray 2.60's controller knows the queued count (handles report it for autoscaling)
        but gives it out only through a `_..._for_testing` method, and the deployment details'
        `autoscaling_detail` is never filled; Prometheus has it directly
        (`ray_serve_deployment_queued_queries`, rule ServeAutoscalerAtMaxWithQueue). Replicas
        post once per health period, so the sustain spans several reports.
        """
        iid, key = "at_max", f"model:{model}"
        capacity = view.target * view.max_ongoing_requests
        demand = sum(int(r.get("in_flight") or 0) for rid, r in reports.items()
                     if view.replicas.get(rid, {}).get("state") == "RUNNING"
                     and now - r.get("reported_at", now) <= view.silent_after_s)
        if view.max_replicas is None or view.target < view.max_replicas:
            self.full_since.pop(model, None)
            self._close(key, iid, f"target {view.target} replica(s), below max_replicas {view.max_replicas}")
            return
        if capacity <= 0 or demand < capacity:
            self.full_since.pop(model, None)
            self._close(key, iid, f"demand fits: {demand} request(s) in flight, room for {capacity}")
            return
        since = self.full_since.setdefault(model, now)
        if now - since >= self.cfg.at_max_sustain_s:
            self._open(Incident(key=key, model=model, replica=None, node_id=None, node_ip=None, what=AT_MAX,
                                since=since, detail=f"{demand} request(s) in flight on {view.target} of max_replicas "
                                       f"{view.max_replicas}, each takes {view.max_ongoing_requests} at once"), iid)

    @staticmethod
    def _problem(rid: str, view: ModelView, report: dict[str, Any], now: float, planned_stop: bool) -> str | None:
        if rid not in view.replicas:
            return GONE
        if view.replicas[rid].get("state") == "STOPPING":
            return None if planned_stop else GONE  # Serve is stopping a dead or failed replica
        if not report:
            return None  # starting: Serve lists it, no report yet
        if report.get("check_ok") is False:
            return STALLED if str(report.get("last_error") or "").startswith("stalled") else UNHEALTHY
        if now - report.get("reported_at", now) > view.silent_after_s:
            return SILENT
        return None

    def _nodes(self, world: World, now: float) -> None:
        assert world.nodes is not None
        for node_id, node in world.nodes.items():
            if node.get("alive"):
                self.nodes_alive[node_id] = node.get("ip", "")
                self._close(f"node:{node_id}", "node", "node alive again")
        for node_id, ip in list(self.nodes_alive.items()):
            if world.nodes.get(node_id, {}).get("alive"):
                continue
            on_it = sorted(f"{m}/{r}" for m, rs in self.seen.items() for r, w in rs.items() if w["node_id"] == node_id)
            self._open(Incident(key=f"node:{node_id}", model=None, replica=None, node_id=node_id, node_ip=ip,
                                what=NODE_LEFT, since=now, detail=f"replicas on it: {', '.join(on_it) or 'none'}"), "node")
            del self.nodes_alive[node_id]  # a node id never comes back; its incident stays open until...
        if world.models is not None:  # ...every model is at its target again (capacity restored elsewhere)
            if all(self._model_ok(m) for m in world.models):
                for key in [k for k in self.keys if k.startswith("node:")]:
                    self._close(key, "node", "every model back at its target replica count")

    def _circuits(self, world: World, now: float) -> None:
        """A model's circuit open on any router replica is one incident; closed on all, it is over."""
        for model, routers in world.circuits.items():
            refusing = [c for c in routers.values() if c.get("state") != "closed"]
            if not refusing:
                self._close(f"model:{model}", "circuit", "circuit closed again: the model answers")
                continue
            first = min(refusing, key=lambda c: c.get("since") or now)
            self._open(Incident(key=f"model:{model}", model=model, replica=None, node_id=None, node_ip=None,
                                what=CIRCUIT_OPEN, since=first.get("since") or now, last_error=first.get("last_error"),
                                detail=f"open on {len(refusing)} of {len(routers)} router replica(s)"), "circuit")

    def _model_ok(self, model: str) -> bool:
        return not self.keys.get(f"model:{model}", _Key()).open

    def _open(self, incident: Incident, iid: str) -> None:
        key = self.keys.setdefault(incident.key, _Key())
        current = key.open.get(iid)
        if current is None:
            key.open[iid] = incident
            if not key.alerted and self.clock() - key.last_alert_at < self.cfg.window_s:
                key.folded += 1  # held back: counted in the next alert (while alerted it joins the open one)
        else:  # same incident, newer facts: keep when it began
            incident.since = min(current.since, incident.since)
            incident.request_ids = incident.request_ids or current.request_ids
            key.open[iid] = incident

    def _close(self, key_name: str, iid: str, how: str) -> None:
        key = self.keys.get(key_name)
        if key is not None and iid in key.open:
            key.open.pop(iid)
            key.resolution = how

    # --- messages, rate-limited per key ---
    def _messages(self, now: float) -> list[dict[str, Any]]:
        out = []
        for name, key in self.keys.items():
            if key.open and not key.alerted and now - key.last_alert_at >= self.cfg.window_s:
                incidents = sorted(key.open.values(), key=lambda i: i.since)
                folded, key.folded = key.folded, 0
                key.alerted, key.last_alert_at = True, now
                out.append(self._message("alert", name, incidents, now, folded=folded))
            elif not key.open and key.alerted:
                key.alerted = False
                out.append(self._message("recovery", name, [], now, resolution=key.resolution))
        return out

    def _message(self, event: str, key: str, incidents: list[Incident], now: float, folded: int = 0,
                 resolution: str = "") -> dict[str, Any]:
        first = incidents[0] if incidents else None
        subject = key.split(":", 1)[1]
        if event == "alert":
            assert first is not None
            where = f" replica {first.replica}" if first.replica else ""
            node = f" on node {first.node_id} ({first.node_ip})" if first.node_id else ""
            text = (f"[{self.app}] ALERT {subject}:{where}{node}: {_WHAT[first.what]} since "
                    f"{time.strftime('%H:%M:%S', time.gmtime(first.since))} UTC")
            if first.last_error:
                text += f"; last error: {first.last_error}"
            if first.detail:
                text += f"; {first.detail}"
            if first.migrated:
                text += f"; streams continued on another replica: {', '.join(first.migrated)}"
            if len(incidents) > 1:
                text += f" (+{len(incidents) - 1} more open)"
        else:
            text = f"[{self.app}] RECOVERED {subject}: {resolution}"
        if folded:
            text += f"; {folded} incident(s) folded by the {self.cfg.window_s:g}s rate limit"
        return {
            "event": event, "app": self.app, "key": key, "at": now, "text": text, "folded": folded,
            "model": first.model if first else (subject if key.startswith("model:") else None),
            "replica": first.replica if first else None, "node_id": first.node_id if first else None,
            "node_ip": first.node_ip if first else None, "what": first.what if first else None,
            "since": first.since if first else None, "last_error": first.last_error if first else None,
            "request_ids": first.request_ids if first else [],
            "migrated_request_ids": first.migrated if first else [], "incidents": [i.public() for i in incidents],
            "resolution": resolution or None,
        }


def _request_ids(problem: str, report: dict[str, Any]) -> list[str]:
    """The last failed requests; for a stall, also the ones stuck in it."""
    ids = list(report.get("failed_request_ids") or [])
    if problem == STALLED:
        ids += [r for r in report.get("in_flight_request_ids") or [] if r not in ids]
    return ids
