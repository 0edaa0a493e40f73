"""Where this code runs, as Serve sees it: the one place that asks `serve.get_replica_context()`.

Outside a Serve replica (unit tests, the CLI) there is no context; each helper says what it
answers then, so callers never wrap Serve's exception themselves.
"""

from __future__ import annotations

from typing import Any

LOCAL = "local"


def replica_context() -> Any | None:
    """Serve's ReplicaContext, or None outside a Serve replica."""
    try:
        from ray import serve

        return serve.get_replica_context()
    except Exception:  # noqa: BLE001 - Serve raises RayServeException outside a replica
        return None


def in_serve() -> bool:
    return replica_context() is not None


def app_name() -> str | None:
    """The Serve application's name, or None outside Serve."""
    ctx = replica_context()
    return ctx.app_name if ctx is not None else None


def app_name_or_local() -> str:
    """The app's name for per-app keys and files (quota keys, usage files): 'local' outside Serve."""
    return app_name() or LOCAL


def replica_id() -> str:
    """This replica's Serve id (names the batch worker and reports): 'local' outside Serve."""
    ctx = replica_context()
    return ctx.replica_id.unique_id if ctx is not None else LOCAL
