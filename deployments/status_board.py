"""Where replicas post their own health, for the router's status view.

A handle call reaches one replica at random, so the router cannot ask each replica in turn;
instead every replica posts a snapshot from each `check_health` (every health period) to one
small named actor per application, and the router reads them all. A replica that stops
posting is shown as silent after two periods; one that Serve no longer lists, as gone
(serve_app/status.py), and then forgotten.
"""

from __future__ import annotations

import time
from typing import Any

import ray

NAMESPACE = "serve_app"


@ray.remote(num_cpus=0, max_restarts=-1)
class StatusBoard:
    def __init__(self) -> None:
        self.reports: dict[str, dict[str, dict[str, Any]]] = {}

    def post(self, model: str, replica_id: str, snapshot: dict[str, Any]) -> None:
        self.reports.setdefault(model, {})[replica_id] = {**snapshot, "reported_at": time.time()}

    def mark_gone(self, model: str, replica_id: str, when: float) -> None:
        """Serve no longer lists this replica: remember since when, for the status view."""
        report = self.reports.get(model, {}).get(replica_id)
        if report is not None:
            report.setdefault("gone_at", when)

    def forget(self, model: str, replica_id: str) -> None:
        self.reports.get(model, {}).pop(replica_id, None)

    def read(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.reports


def board(app_name: str):
    """The app's board, created on first use; detached so it outlives any one replica."""
    return StatusBoard.options(
        name=f"status_board::{app_name}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
    ).remote()
