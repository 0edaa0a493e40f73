"""One status view: Serve's view of each deployment, joined with what each replica says about
itself (status board) and what the router saw (circuits, retries, fallbacks)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from serve_app.config import ModelConfig


async def status_view(models: dict[str, ModelConfig], breakers: dict[str, Any], events: dict[tuple[str, str], int]) -> dict[str, Any]:
    app = _app_name()
    serve_state, reports = await asyncio.gather(_serve_state(app), _board_reports(app))
    out: dict[str, Any] = {"app": app, "generated_at": time.time(), "models": {}}
    for name, m in models.items():
        dep = serve_state.get(m.deployment_name, {})
        period = m.deployment.health_check_period_s
        replicas = []
        for rid, r in sorted(reports.get(name, {}).items()):
            age = time.time() - r.get("reported_at", 0)
            state = "silent" if age > 2 * period + 5 else ("unhealthy" if r.get("last_probe_ok") is False else "reporting")
            replicas.append({**r, "state": state, "report_age_s": round(age, 1)})
        auto = m.deployment.autoscaling_config
        out["models"][name] = {
            "kind": m.kind.value, "engine": m.engine.value, "deployment": m.deployment_name,
            "serve_status": dep.get("status", "UNKNOWN"), "serve_message": dep.get("message", ""),
            "replica_states": dep.get("replica_states", {}),
            "autoscaling": auto.model_dump() if auto else {"num_replicas": m.deployment.num_replicas},
            "circuit": breakers[name].snapshot() if name in breakers else None,
            "router_events": {e: n for (e, mdl), n in events.items() if mdl == name},
            "replicas": replicas,
        }
    return out


def _app_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside Serve (unit tests): the view shows what the router knows
        return None


async def _serve_state(app: str | None) -> dict[str, dict[str, Any]]:
    if app is None:
        return {}
    try:
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        deps = status.applications[app].deployments
        return {
            n: {"status": str(getattr(d.status, "value", d.status)), "message": d.message,
                "replica_states": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
            for n, d in deps.items()
        }
    except Exception:  # noqa: BLE001 - controller busy or app going away: show what we have
        return {}


async def _board_reports(app: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    if app is None:
        return {}
    try:
        from deployments.status_board import board

        return await board(app).read.remote()
    except Exception:  # noqa: BLE001
        return {}
