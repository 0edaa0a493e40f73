"""Serve's own view of an application, as its controller tells it: deployments, their status and
the replicas Serve lists. The status board's alert loop and the router's status view
(serve_app/status.py) both hold replica reports against it, so both read it here, in one shape.
"""

from __future__ import annotations

from typing import Any

from ray.serve.context import _get_global_client
from ray.serve.schema import ServeInstanceDetails


def serve_details() -> ServeInstanceDetails:
    """The controller's full view (what `serve status` shows); raises while it cannot be asked."""
    return ServeInstanceDetails(**_get_global_client().get_serve_details())


def state_name(state: Any) -> str:
    """A status or replica state as Serve names it ("RUNNING"): the details hold enums or strings."""
    return str(getattr(state, "value", state))


def live_replicas(replicas: list[Any]) -> dict[str, dict[str, Any]]:
    """One deployment's replicas as Serve lists them, by replica id."""
    return {r.replica_id: {"state": state_name(r.state), "node_id": r.node_id, "node_ip": r.node_ip} for r in replicas}
