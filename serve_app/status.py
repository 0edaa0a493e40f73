"""One status view: Serve's view of each deployment and its replicas, joined with what each
replica says about itself (status board) and what the router saw (circuits, retries, fallbacks).

Serve's replica list decides who exists: a replica that posted to the board but that Serve no
longer lists is shown as `gone` (with when it was first missed) and dropped after
`gateway.status_gone_retention_s`; a replica Serve lists that has not posted yet is `starting`.
When the controller cannot be asked, board entries are `unknown`, never live or silent.
Per model, `restarts` is how many replicas Serve lost outside a planned stop since the board
began watching (serve_app/alerts/tracker.py decides; None when the board cannot say).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from deployments import status_board
from deployments.serve_view import app_deployments, live_replicas, replica_of_actor, state_counts, state_name
from serve_app.autoscaling.queue import TokenQueue
from serve_app.config import GatewayConfig, ModelConfig, ModelKind
from serve_app.llm_routing.registry import routing_view
from serve_app.serve_context import app_name, replica_context
from serve_app.stories import Stories, merge
from serve_app.traffic import BUCKET_S, Window

logger = logging.getLogger("ray.serve")
CONFIG_RESEND_S = 30.0  # how often each router replica hands the status board its alert config again
STORIES_PERIOD_S = 1.0  # how often each router replica hands its finished request stories to the board
_DEAD_ACTORS: dict[str, dict[str, Any] | None] = {}  # actor id -> the replica it was (deployments/serve_view.py)


async def status_view(gateway: GatewayConfig, models: dict[str, ModelConfig], breakers: dict[str, Any],
                      events: dict[tuple[str, str], int], queue: TokenQueue | None = None,
                      cold_waits: dict[str, float] | None = None) -> dict[str, Any]:
    app = app_name()
    serve_state, reports, alerts, history, scaling = await asyncio.gather(
        _serve_state(app), _board_read(app, "read"), _board_alerts(app), _board_read(app, "traffic_history"),
        _board_read(app, "scaling_state"))
    now = time.time()
    restarts = alerts.pop("restarts", None)
    out: dict[str, Any] = {"app": app, "generated_at": now, "models": {}, "alerts": alerts}
    for name, m in models.items():
        dep = serve_state.get(m.deployment_name)
        auto = m.deployment.autoscaling_config
        out["models"][name] = {
            "kind": m.kind.value, "engine": m.engine.value, "deployment": m.deployment_name,
            "serve_status": (dep or {}).get("status", "UNKNOWN"), "serve_message": (dep or {}).get("message", ""),
            "replica_states": (dep or {}).get("replica_states", {}),
            "autoscaling": auto.model_dump() if auto else {"num_replicas": m.deployment.num_replicas},
            "circuit": breakers[name].snapshot() if name in breakers else None,
            "router_events": {e: n for (e, mdl), n in events.items() if mdl == name},
            "restarts": None if restarts is None else restarts.get(name, 0),
            "replicas": await _replicas(app, name, m, dep, reports.get(name, {}), gateway.status_gone_retention_s, now),
            # the last hour, one point per traffic.BUCKET_S, every router replica's answers together
            "history": history.get(name, []),
        }
        if m.routing_policy:
            out["models"][name]["routing_policy"] = m.routing_policy
            predicted = routing_view(m.deployment_name)  # this router replica's guesses
            for row in out["models"][name]["replicas"]:
                row["routing"] = predicted.get(row["replica_id"])
        if m.adapters:
            out["models"][name]["adapters"] = sorted(m.adapters)  # LoRA adapters its replicas serve
        out["models"][name]["scaling"] = scaling_view(m, scaling.get(name) or {}, out["models"][name]["replicas"],
                                                      queue, (cold_waits or {}).get(name))
    return out


def scaling_view(m: ModelConfig, board: dict[str, Any], replicas: list[dict[str, Any]], queue: TokenQueue | None,
                 cold_wait_s: float | None) -> dict[str, Any]:
    """How the model scales and what it scales on (serve_app/autoscaling/): the policy and its
    targets, the autoscaler's last decision and why (from the Serve controller, through the board),
    the replicas' KV use and waiting prompt tokens (their own reports), this router's token queue,
    and what a cold start takes (the replicas' load time, this router's last wait for one)."""
    auto = m.deployment.autoscaling_config
    llm = m.kind is ModelKind.llm
    policy = auto.resolved_policy(llm) if auto else "fixed"
    live = [r for r in replicas if r.get("state") in ("reporting", "unhealthy", "silent")]
    signals = [r["autoscaling"] for r in live if r.get("autoscaling")]
    out: dict[str, Any] = {
        "policy": policy, "targets": auto.token_targets() if auto and policy == "tokens" else None,
        "last_decision": board.get("last"), "recent_changes": board.get("changes", []),
        "load_s": board.get("load_s"), "last_cold_start_wait_s": cold_wait_s,
    }
    if llm:
        kv = [s["kv_usage"] for s in signals if s.get("kv_usage") is not None]
        out.update(
            kv_usage=round(sum(kv) / len(kv), 4) if kv else None,
            prompt_tokens_waiting=sum(int(s.get("prompt_tokens_waiting") or 0) for s in signals) if signals else None,
            waiting_requests=sum(int(s.get("waiting") or 0) for s in signals) if signals else None,
            prefill_tokens_per_s=[s.get("prefill_tokens_per_s") for s in signals],
            token_queue=queue.view(m.name) if queue is not None else None,
        )
    return out


async def _replicas(app: str | None, name: str, m: ModelConfig, dep: dict[str, Any] | None,
                    reported: dict[str, dict[str, Any]], retention_s: float, now: float) -> list[dict[str, Any]]:
    live: dict[str, dict[str, Any]] | None = dep["replicas"] if dep else None
    silent_after = silent_after_s(m)
    rows = []
    for rid, r in sorted(reported.items()):
        age = now - r.get("reported_at", 0)
        row = {**r, "report_age_s": round(age, 1)}
        if live is None:
            row["state"] = "unknown"  # Serve could not be asked: no claim either way
        elif rid not in live:
            gone_at = r.get("gone_at") or now
            if r.get("gone_at") is None:
                await _board_call(app, "mark_gone", name, rid, gone_at)
            if now - gone_at > retention_s:
                await _board_call(app, "forget", name, rid)
                continue
            row.update(state="gone", gone_at=gone_at, in_flight=0)
        else:
            row["serve_state"] = live[rid]["state"]
            row["state"] = "silent" if age > silent_after else ("unhealthy" if r.get("last_probe_ok") is False else "reporting")
        rows.append(row)
    for rid, info in sorted((live or {}).items()):
        if rid not in reported:
            rows.append({"replica_id": rid, "model": name, "state": "starting", "serve_state": info["state"],
                         "node_id": info.get("node_id"), "node_ip": info.get("node_ip")})
    return rows


def silent_after_s(m: ModelConfig) -> float:
    """A replica that has not posted for this long, while Serve lists it, is silent: two health
    periods missed, plus slack for a slow probe."""
    return 2 * m.deployment.health_check_period_s + 5


async def running_replicas(deployment: str) -> int:
    """How many replicas Serve runs for this deployment of this app now (0 when it cannot say)."""
    return (await _serve_state(app_name())).get(deployment, {}).get("replica_states", {}).get("RUNNING", 0)


async def _serve_state(app: str | None) -> dict[str, dict[str, Any]]:
    """Per deployment: status, message, replica state counts and the live replicas by id.
    The same controller call `serve.status()` makes, kept whole for the replica list."""
    if app is None:
        return {}
    try:
        deps = await asyncio.to_thread(app_deployments, app)
        return {
            n: {"status": state_name(d.get("status")), "message": d.get("message", ""),
                "replica_states": state_counts(d["replicas"]),
                "replicas": live_replicas(d["replicas"])}
            for n, d in deps.items()
        }
    except Exception:  # noqa: BLE001 - controller busy or app going away: show what we have
        return {}


async def _board_read(app: str | None, method: str, *args: Any) -> Any:
    """`method`'s answer from the app's status board (its reports, its history, a request's
    stories), or {} when there is none or it cannot answer: the view shows what it has rather
    than failing."""
    if app is None:
        return {}
    try:
        return await status_board.call(app, method, *args)
    except Exception:  # noqa: BLE001
        return {}


async def _board_call(app: str | None, method: str, *args: Any) -> None:
    if app is None:
        return
    try:
        await status_board.call(app, method, *args)
    except Exception:  # noqa: BLE001 - the view is still right; the board catches up next time
        pass


async def reported_load_s(model: str) -> float | None:
    """The load time the model's replicas last reported (the status board keeps it after they are
    gone), for a cold start's Retry-After; None when the board cannot say within a second."""
    try:
        scaling = await asyncio.wait_for(_board_read(app_name(), "scaling_state"), 1.0)
    except Exception:  # noqa: BLE001 - the answer is a guess either way
        return None
    return (scaling.get(model) or {}).get("load_s")


async def _board_alerts(app: str | None) -> dict[str, Any]:
    """Recent pushed alerts, delivery counts and restarts per model (see configure_alerts)."""
    if app is None:
        return {"enabled": False}
    try:
        return await status_board.call(app, "alert_state")
    except Exception:  # noqa: BLE001
        return {"enabled": False, "error": "status board unreachable"}


async def hand_over_traffic(window: Window, period_s: float = BUCKET_S) -> None:
    """Just after each `period_s` boundary of the wall clock, this router replica's counts to the
    status board, stamped with the window's last instant, so every router's window of one period
    lands in the same bucket (serve_app/traffic.py). Best effort: a lost window is a gap in a
    chart, never a failed request."""
    app = app_name()
    while app is not None:
        now = time.time()
        boundary = (now // period_s + 1) * period_s
        await asyncio.sleep(boundary - now + min(0.2, period_s / 10))
        counts = window.drain()
        if not counts:
            continue
        try:
            status_board.call(app, "traffic", counts, boundary - 1e-3)
        except Exception:  # noqa: BLE001
            logger.warning("could not hand this router's traffic counts to the status board", exc_info=True)


async def hand_over_stories(stories: Stories, period_s: float = STORIES_PERIOD_S) -> None:
    """Every `period_s`, the stories this router replica finished to the app's status board, which
    keeps every router replica's (serve_app/stories.py). Best effort: a lost hand-over leaves those
    stories on this router replica only."""
    app = app_name()
    while app is not None:
        await asyncio.sleep(period_s)
        try:
            _send_stories(app, stories)
        except Exception:  # noqa: BLE001
            logger.warning("could not hand this router's request stories to the status board", exc_info=True)


def _send_stories(app: str, stories: Stories) -> ray.ObjectRef | None:
    """The stories finished since the last hand-over to the board (None: there were none)."""
    batch = stories.take_outbox()
    return status_board.call(app, "add_stories", batch, stories.cfg.model_dump()) if batch else None


def hand_over_last_stories(stories: Stories, timeout_s: float = 2.0) -> None:
    """The router replica is stopping (a redeploy, a scale-down): its last stories to the board now,
    and waited for, so the streams it drained last (those a replica change continued) can still be
    read from the replicas that stay."""
    app = app_name()
    if app is None:
        return
    try:
        sent = _send_stories(app, stories)
        if sent is not None:
            ray.get(sent, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - best effort at shutdown
        logger.warning("could not hand this router's last request stories to the status board", exc_info=True)


async def find_story(stories: Stories | None, rid: str) -> list[dict[str, Any]]:
    """Every kept story of `rid`: this router replica's own, and every router replica's from the
    app's status board (stories.merge keeps each once)."""
    own = stories.find(rid) if stories is not None else []
    app = app_name()
    found = merge(own, await _board_read(app, "story", rid) or [])  # the board down: this router's own still answer
    if app is not None:
        await _name_dead_replicas(found)
    return found


async def _name_dead_replicas(stories: list[dict[str, Any]]) -> None:
    """Attempts on a replica that died with only its actor id known get its replica id and node
    from the GCS (kept in `_DEAD_ACTORS`: a dead actor's answer does not change). Best effort:
    unknown stays unknown."""
    for attempt in (a for s in stories for a in s.get("attempts", ()) if a.get("actor_id") and not a.get("replica")):
        actor = attempt["actor_id"]
        if actor not in _DEAD_ACTORS:
            try:
                _DEAD_ACTORS[actor] = await asyncio.to_thread(replica_of_actor, actor)
            except Exception:  # noqa: BLE001
                logger.warning("could not look up actor %s", actor, exc_info=True)
                continue
            while len(_DEAD_ACTORS) > 1000:
                _DEAD_ACTORS.pop(next(iter(_DEAD_ACTORS)))
        attempt.update(_DEAD_ACTORS[actor] or {})


async def keep_alerts_configured(gateway: GatewayConfig, models: dict[str, ModelConfig]) -> None:
    """Every CONFIG_RESEND_S, the config again: a board made anew whose saved state is gone (or
    that could not read it) alerts again within that. The same config changes nothing."""
    while True:
        await asyncio.sleep(CONFIG_RESEND_S)
        await asyncio.to_thread(configure_alerts, gateway, models, True)


def configure_alerts(gateway: GatewayConfig, models: dict[str, ModelConfig], unless_set: bool = False) -> None:
    """Hand `gateway.alerts` to the app's status board, the one component that pushes alerts (and
    counts restarts, targets or not); each router replica calls this at start and then every
    CONFIG_RESEND_S with `unless_set` (the same config twice changes nothing)."""
    app = app_name()
    if app is None:
        return
    try:
        status_board.call(app, "configure_alerts", app, gateway.alerts.model_dump(mode="json"), {
            name: {"deployment": m.deployment_name, "silent_after_s": silent_after_s(m)}
            for name, m in models.items()}, unless_set=unless_set)
    except Exception:  # noqa: BLE001 - alerts are best effort; serving must not depend on them
        logger.warning("could not configure alerts on the status board", exc_info=True)


def report_migration(model: str, lost_replica: str, request_id: str) -> None:
    """Tell the status board a stream left `lost_replica` for another (its replica-gone alert
    names the requests moved off it); best effort, at once, and nothing outside Serve."""
    ctx = replica_context()
    if ctx is None:
        return
    try:
        status_board.call(ctx.app_name, "migrated", model, lost_replica, request_id)
    except Exception:  # noqa: BLE001 - alerting never fails a request
        logger.warning("could not report a continued stream of %s to the status board", model, exc_info=True)


def report_circuit(model: str, snapshot: dict[str, Any]) -> None:
    """Tell the status board a circuit opened or closed (it pushes the alert, one for all router
    replicas); best effort, and nothing outside Serve (unit tests: no board)."""
    ctx = replica_context()
    if ctx is None:
        return
    try:
        state = "closed" if snapshot["state"] == "closed" else "open"
        status_board.call(ctx.app_name, "circuit", model, ctx.replica_id.unique_id, {
            "state": state, "since": time.time(), "last_error": snapshot.get("last_error")})
    except Exception:  # noqa: BLE001 - alerting never fails a request
        logger.warning("could not report the circuit of %s to the status board", model, exc_info=True)
