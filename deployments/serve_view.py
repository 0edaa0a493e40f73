"""Serve's own view of an application, as its controller tells it: deployments, their status and
the replicas Serve lists. The status board's alert loop and the router's status view
(serve_app/status.py) both hold replica reports against it, so both read it here, in one shape.

Read as the controller's plain dict, one app's part: validating the whole answer (every app of
the cluster) into Serve's pydantic schema, as `serve.status()` does, cost 0.1-0.2 s of CPU per call
on one machine and 0.7 s on another (2026-12-04, a 2-core AMD EPYC with the e2e suite's apps up,
against 4 ms for the plain dict and 18 ms of the controller's), and every app's board asks each
check period, idle or not. Scripts and tests that poll Serve use `app_status` and
`replica_states` here for the same reason.
"""

from __future__ import annotations

import collections
from typing import Any

from ray.serve.context import _get_global_client

from serve_app.errors import replica_of_actor_name


def app_deployments(app: str) -> dict[str, dict[str, Any]]:
    """The app's deployments by name, each as the controller's dict of DeploymentDetails (what
    `serve status` shows); raises while the controller cannot be asked or the app is not there."""
    return _get_global_client().get_serve_details()["applications"][app]["deployments"]


def app_status(app: str) -> tuple[str, dict[str, str]]:
    """The app's status as Serve names it ("RUNNING", "DEPLOY_FAILED", "NOT_STARTED" when it is
    not there, ...) and each deployment's message: one small controller call, this app only."""
    overview = _get_global_client().get_serve_status(app)
    return state_name(overview.app_status.status), {d.name: d.message for d in overview.deployment_statuses}


def state_counts(replicas: list[dict[str, Any]]) -> dict[str, int]:
    """Replicas per state ({"RUNNING": 2, "STARTING": 1}), as `serve.status()` counts them."""
    return dict(collections.Counter(state_name(r.get("state")) for r in replicas))


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """One deployment's replicas per state ({} when it has none, or is not listed); raises, as
    `app_deployments` does, while the controller cannot be asked or the app is not there."""
    d = app_deployments(app).get(deployment)
    return state_counts(d["replicas"]) if d else {}


def replica_of_actor(actor_id: str) -> dict[str, Any] | None:
    """Which Serve replica an actor was, and where, from the GCS actor table (which keeps dead
    actors too): Ray's errors for a replica that died mid-request name only its actor id (Serve's
    gRPC path says "actor ... is unavailable"). None when the GCS does not know it."""
    from ray._private.state import actors  # the GCS actor table; ray.util.state needs the dashboard

    info = actors(actor_id=actor_id) or {}
    replica = replica_of_actor_name(str(info.get("Name") or ""))
    if replica is None:
        return None
    address = info.get("Address") or {}
    return {"replica": replica, "node_id": address.get("NodeID"), "node_ip": address.get("IPAddress")}


def state_name(state: Any) -> str:
    """A status or replica state as Serve names it ("RUNNING"): the details hold enums or strings."""
    return str(getattr(state, "value", state))


def live_replicas(replicas: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One deployment's replicas as Serve lists them, by replica id. A replica still starting has
    no node yet: the controller's dict then leaves those keys out (the schema's defaults are None)."""
    return {r["replica_id"]: {"state": state_name(r.get("state")), "node_id": r.get("node_id"), "node_ip": r.get("node_ip")}
            for r in replicas}
