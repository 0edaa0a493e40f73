"""Serve's own view of an application, as its controller tells it: deployments, their status and
the replicas Serve lists. The status board's alert loop and the router's status view
(serve_app/status.py) both hold replica reports against it, so both read it here, in one shape.

Read as the controller's plain dict, one app's part: validating the whole answer (every app of
the cluster) into Serve's pydantic schema cost 0.1-0.2 s of CPU per call here, and every app's
board asks each check period, idle or not.
"""

from __future__ import annotations

from typing import Any

from ray.serve.context import _get_global_client

from serve_app.errors import replica_of_actor_name


def app_deployments(app: str) -> dict[str, dict[str, Any]]:
    """The app's deployments by name, each as the controller's dict of DeploymentDetails (what
    `serve status` shows); raises while the controller cannot be asked or the app is not there."""
    return _get_global_client().get_serve_details()["applications"][app]["deployments"]


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
