"""Pushed alerts: what to alert on (`tracker`, pure rules), how it is sent (`delivery`, off every
serving path) and the `gateway.alerts` section that configures both (`config`). The status board
(deployments/status_board.py) runs them, one per app."""

from serve_app.alerts.config import AlertsConfig, AlertTarget
from serve_app.alerts.delivery import AlertDelivery
from serve_app.alerts.tracker import (
    AT_MAX,
    CIRCUIT_OPEN,
    GONE,
    NO_READY,
    NODE_LEFT,
    PLANNED_STOP_STATUSES,
    SILENT,
    STALLED,
    STARTING_STATUSES,
    UNHEALTHY,
    AlertTracker,
    Incident,
    ModelView,
    World,
)

__all__ = [
    "AT_MAX", "CIRCUIT_OPEN", "GONE", "NO_READY", "NODE_LEFT", "PLANNED_STOP_STATUSES", "SILENT", "STALLED",
    "STARTING_STATUSES", "UNHEALTHY", "AlertDelivery", "AlertTarget", "AlertTracker", "AlertsConfig", "Incident",
    "ModelView", "World",
]
