"""Pushed alerts: which changes become one alert and one recovery (fake clock), rate limits for a
flapping replica, and delivery to a real local HTTP receiver that never touches serving."""

from __future__ import annotations

import time

import pytest

from serve_app.alerts import AlertDelivery, AlertTracker, ModelView, World
from serve_app.config import AlertsConfig, AlertTarget, ConfigError, parse_app_config
from tests.webhook_receiver import Receiver

NODE_A, NODE_B = "a" * 40, "b" * 40


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def replica(node: str = NODE_A, state: str = "RUNNING") -> dict:
    return {"state": state, "node_id": node, "node_ip": "10.0.0.1" if node == NODE_A else "10.0.0.2"}


def ok_report(clock: Clock, **extra) -> dict:
    return {"check_ok": True, "reported_at": clock.t, "last_error": None, **extra}


def world(clock: Clock, replicas: dict, reports: dict | None = None, target: int = 2, nodes: dict | None = None) -> World:
    reports = reports if reports is not None else {rid: ok_report(clock) for rid in replicas}
    return World(models={"ce": ModelView(target=target, replicas=replicas, silent_after_s=7)},
                 reports={"ce": reports}, nodes=nodes)


def tracker(window_s: float = 60) -> tuple[AlertTracker, Clock]:
    clock = Clock()
    return AlertTracker(AlertsConfig(targets=[], window_s=window_s), "app", clock), clock


def step(t: AlertTracker, clock: Clock, w: World, seconds: float = 2) -> list[dict]:
    clock.t += seconds
    return t.observe(w)


def test_a_killed_replica_is_one_alert_naming_its_node_then_one_recovery_when_replaced():
    t, clock = tracker()
    both = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    assert step(t, clock, world(clock, both)) == []
    sent = [m for _ in range(5) for m in step(t, clock, world(clock, {"r2": replica(NODE_B)}))]
    assert [m["event"] for m in sent] == ["alert"]
    alert = sent[0]
    assert alert["model"] == "ce" and alert["replica"] == "r1" and alert["what"] == "gone"
    assert alert["node_id"] == NODE_A and alert["node_ip"] == "10.0.0.1" and NODE_A in alert["text"]
    assert step(t, clock, world(clock, {"r2": replica(NODE_B), "r3": replica(NODE_A, "STARTING")}, reports={})) == []
    back = [m for _ in range(3) for m in step(t, clock, world(clock, {"r2": replica(NODE_B), "r3": replica(NODE_A)}))]
    assert [m["event"] for m in back] == ["recovery"] and "r3" in back[0]["text"]


def test_a_flapping_replica_sends_one_alert_and_one_recovery_per_window():
    t, clock = tracker(window_s=60)
    sent: list[dict] = []
    for i in range(6):  # a replica dies and is replaced every 8 s for ~50 s
        gen = f"r{i}"
        sent += step(t, clock, world(clock, {"keep": replica(NODE_B), gen: replica(NODE_A)}))
        sent += step(t, clock, world(clock, {"keep": replica(NODE_B)}), seconds=4)
        sent += step(t, clock, world(clock, {"keep": replica(NODE_B), f"r{i + 1}": replica(NODE_A)}), seconds=4)
    assert [m["event"] for m in sent] == ["alert", "recovery"]
    clock.t += 60  # after the window the next incident is told, with what was held back
    sent = step(t, clock, world(clock, {"keep": replica(NODE_B)}))
    assert [m["event"] for m in sent] == ["alert"] and sent[0]["folded"] >= 4 and "rate limit" in sent[0]["text"]


def test_stall_and_failed_health_name_the_replica_its_error_and_since_when():
    t, clock = tracker()
    both = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    step(t, clock, world(clock, both))
    stalled = {"r1": ok_report(clock, check_ok=False, last_error="stalled: 3 request(s) in flight, no progress for 2s",
                               failing_since=clock.t - 3, failed_request_ids=["rid-9"]), "r2": ok_report(clock)}
    [alert] = step(t, clock, world(clock, both, reports=stalled))
    assert alert["what"] == "stalled" and alert["since"] == clock.t - 5 and alert["request_ids"] == ["rid-9"]
    assert "stalled: 3 request(s)" in alert["text"] and alert["node_ip"] == "10.0.0.1"
    [back] = step(t, clock, world(clock, both))
    assert back["event"] == "recovery"


def test_no_ready_replica_and_a_silent_replica_are_incidents():
    t, clock = tracker()
    deploying = world(clock, {"r1": replica(state="STARTING")}, reports={}, target=1)
    deploying.models["ce"].status = "UPDATING"
    assert step(t, clock, deploying) == []  # a deploy starts with no ready replica
    one = {"r1": replica(NODE_A)}
    step(t, clock, world(clock, one, target=1))
    [alert] = step(t, clock, world(clock, one, reports={"r1": {"check_ok": True, "reported_at": clock.t - 30}}, target=1))
    assert {i["what"] for i in alert["incidents"]} == {"silent", "no_ready_replica"}


def test_planned_stops_are_not_alerts_and_an_unknown_controller_makes_no_claim():
    t, clock = tracker()
    step(t, clock, world(clock, {"r1": replica(), "r2": replica(NODE_B)}))
    assert step(t, clock, world(clock, {"r1": replica(), "r2": replica(NODE_B, "STOPPING")}, target=1)) == []
    assert step(t, clock, world(clock, {"r1": replica()}, target=1)) == []  # downscaled on purpose
    assert step(t, clock, World(models=None, reports={}, nodes=None)) == []
    updating = world(clock, {"r1": replica(), "r3": replica(NODE_B, "STARTING")}, reports={}, target=2)
    updating.models["ce"].status = "UPDATING"  # a rolling update stops r2 before r3 runs
    step(t, clock, world(clock, {"r1": replica(), "r2": replica(NODE_B)}))
    assert step(t, clock, updating) == []


def test_a_dead_replica_stopped_by_serve_is_gone_even_if_its_replacement_runs_first():
    t, clock = tracker()
    step(t, clock, world(clock, {"r1": replica(), "r2": replica(NODE_B)}))
    [alert] = step(t, clock, world(clock, {"r1": replica(), "r2": replica(NODE_B, "STOPPING")}))
    assert alert["replica"] == "r2" and alert["node_id"] == NODE_B
    assert step(t, clock, world(clock, {"r1": replica(), "r2": replica(NODE_B, "STOPPING"), "r3": replica(NODE_B)})) == []
    [back] = step(t, clock, world(clock, {"r1": replica(), "r3": replica(NODE_B)}))
    assert back["event"] == "recovery" and "r3" in back["text"]


def test_a_node_leaving_is_one_alert_naming_it_and_its_replicas():
    t, clock = tracker()
    both = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    nodes = {NODE_A: {"alive": True, "ip": "10.0.0.1"}, NODE_B: {"alive": True, "ip": "10.0.0.2"}}
    step(t, clock, world(clock, both, nodes=nodes))
    gone = {NODE_A: {"alive": True, "ip": "10.0.0.1"}, NODE_B: {"alive": False, "ip": "10.0.0.2"}}
    sent = step(t, clock, world(clock, {"r1": replica(NODE_A)}, nodes=gone))
    node_alert = next(m for m in sent if m["key"] == f"node:{NODE_B}")
    assert node_alert["node_ip"] == "10.0.0.2" and "ce/r2" in node_alert["text"]
    back = step(t, clock, world(clock, {"r1": replica(NODE_A), "r3": replica(NODE_A)}, nodes=gone))
    assert sorted(m["key"] for m in back if m["event"] == "recovery") == ["model:ce", f"node:{NODE_B}"]


def at_max(clock: Clock, in_flight: int, target: int = 2, max_replicas: int | None = 2) -> World:
    """Two running replicas, 4 requests each at once at most, each reporting `in_flight`."""
    replicas = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    view = ModelView(target=target, replicas=replicas, silent_after_s=7, max_replicas=max_replicas, max_ongoing_requests=4)
    return World(models={"ce": view}, reports={"ce": {r: ok_report(clock, in_flight=in_flight) for r in replicas}}, nodes=None)


def test_an_autoscaler_at_max_with_every_replica_full_alerts_only_after_the_sustain_then_recovers_once():
    t, clock = tracker()  # at_max_sustain_s: 30 s by default; a period is 2 s
    assert [m for _ in range(10) for m in step(t, clock, at_max(clock, 4))] == []  # a 20 s burst...
    assert step(t, clock, at_max(clock, 3)) == []  # ...that fits again restarts the clock
    assert [m for _ in range(15) for m in step(t, clock, at_max(clock, 4))] == []  # full for 28 s
    [alert] = step(t, clock, at_max(clock, 4))  # 30 s
    assert alert["event"] == "alert" and alert["what"] == "at_max_replicas" and alert["model"] == "ce"
    assert "8 request(s) in flight on 2 of max_replicas 2" in alert["text"] and alert["since"] == clock.t - 30
    assert [m for _ in range(5) for m in step(t, clock, at_max(clock, 4))] == []
    [back] = step(t, clock, at_max(clock, 3))
    assert back["event"] == "recovery" and "demand fits: 6 request(s) in flight, room for 8" in back["text"]
    assert [m for _ in range(5) for m in step(t, clock, at_max(clock, 3))] == []


def test_full_replicas_are_no_incident_without_autoscaling_or_while_the_target_is_below_max():
    for world_at in (lambda c: at_max(c, 4, max_replicas=None), lambda c: at_max(c, 4, target=2, max_replicas=3)):
        t, clock = tracker()
        assert [m for _ in range(60) for m in step(t, clock, world_at(clock))] == []
    t, clock = tracker()  # a replica that stopped reporting: its last in-flight count is no evidence
    stale = at_max(clock, 4)
    stale.reports["ce"]["r2"]["reported_at"] = clock.t - 60
    [silent] = [m for _ in range(20) for m in step(t, clock, stale)]
    assert silent["what"] == "silent" and "at_max" not in t.keys["model:ce"].open
    t, clock = tracker()
    assert [m for _ in range(20) for m in step(t, clock, at_max(clock, 4))][0]["what"] == "at_max_replicas"
    [back] = step(t, clock, at_max(clock, 4, target=2, max_replicas=3))  # max raised: the autoscaler can add one
    assert back["event"] == "recovery" and "below max_replicas 3" in back["text"]


def test_the_board_reads_max_replicas_and_max_ongoing_requests_from_serves_deployment_details():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentDetails, DeploymentSchema

    from deployments import status_board

    def details(name: str, **config) -> dict:
        schema = DeploymentSchema(name=name, max_ongoing_requests=5, **config)
        built = DeploymentDetails(name=name, status="HEALTHY", status_trigger="CONFIG_UPDATE_COMPLETED", message="",
                                  deployment_config=schema, target_num_replicas=3, required_resources={}, replicas=[])
        return built.model_dump(exclude_unset=True)  # the controller's dict: no autoscaling_config unless set

    auto = AutoscalingConfig(min_replicas=1, max_replicas=3).model_dump()
    deps = {"rerank-ce": details("rerank-ce", autoscaling_config=auto), "embed-em": details("embed-em", num_replicas=3)}
    views = status_board._models(deps, {"ce": {"deployment": "rerank-ce", "silent_after_s": 7},
                                         "em": {"deployment": "embed-em", "silent_after_s": 7}})
    assert (views["ce"].target, views["ce"].max_replicas, views["ce"].max_ongoing_requests) == (3, 3, 5)
    assert (views["em"].max_replicas, views["em"].max_ongoing_requests) == (None, 5)


def test_restarts_count_each_replica_serve_lost_once_and_never_a_planned_stop():
    t, clock = tracker()
    both = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    step(t, clock, world(clock, both))
    for _ in range(5):  # r1 killed: gone for five periods is one restart
        step(t, clock, world(clock, {"r2": replica(NODE_B)}))
    step(t, clock, world(clock, {"r2": replica(NODE_B), "r3": replica(NODE_A)}))
    assert t.restarts == {"ce": 1}
    for _ in range(3):  # dead, Serve stops it
        step(t, clock, world(clock, {"r2": replica(NODE_B, "STOPPING"), "r3": replica(NODE_A)}))
    step(t, clock, world(clock, {"r3": replica(NODE_A)}))
    step(t, clock, world(clock, {"r3": replica(NODE_A), "r4": replica(NODE_B)}))
    assert t.restarts == {"ce": 2}
    step(t, clock, world(clock, {"r3": replica(NODE_A), "r4": replica(NODE_B, "STOPPING")}, target=1))  # downscale
    step(t, clock, world(clock, {"r3": replica(NODE_A)}, target=1))
    assert t.restarts == {"ce": 2}


def test_the_board_counts_restarts_without_alert_targets_sends_nothing_and_keeps_the_count_on_reconfigure(monkeypatch):
    from deployments import status_board

    live = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    monkeypatch.setattr(status_board, "app_deployments", lambda app: {})
    monkeypatch.setattr(status_board, "_models", lambda deps, models: {"ce": ModelView(2, dict(live), 7)})
    monkeypatch.setattr(status_board, "_nodes", lambda: None)
    board = status_board.StatusBoard.__ray_actor_class__()  # the actor's class, in-process
    assert board.alert_state() == {"enabled": False}  # not configured yet: no count to claim
    models = {"ce": {"deployment": "rerank-ce", "silent_after_s": 7}}
    board.configure_alerts("app", {"check_period_s": 0.05}, models)
    try:
        time.sleep(0.2)
        live.pop("r1")
        wait_until(lambda: board.alert_state() == {"enabled": False, "restarts": {"ce": 1}})
        board.configure_alerts("app", {"check_period_s": 0.05, "window_s": 10}, models)
        assert board.alert_state()["restarts"] == {"ce": 1}
    finally:
        board._alerts.stop()


def test_the_status_view_shows_the_boards_restart_count_per_model(monkeypatch):
    import asyncio

    from serve_app import status

    async def board_alerts(app):
        return {"enabled": False, "restarts": {"ce": 2}}

    async def empty(app, method=None):
        return {}

    cfg = parse_app_config({"models": [{"name": "ce", "kind": "rerank", "engine": "transformers", "source": "o/ce"},
                                       {"name": "em", "kind": "embed", "engine": "transformers", "source": "o/em"}]})
    monkeypatch.setattr(status, "app_name", lambda: "app")
    monkeypatch.setattr(status, "_board_alerts", board_alerts)
    monkeypatch.setattr(status, "_board_read", empty)  # reports, history (unpatched, it would start Ray in this process)
    monkeypatch.setattr(status, "_serve_state", empty)
    view = asyncio.run(status.status_view(cfg.gateway, {m.name: m for m in cfg.models}, {}, {}))
    assert view["models"]["ce"]["restarts"] == 2 and view["models"]["em"]["restarts"] == 0
    assert "restarts" not in view["alerts"]
    monkeypatch.setattr(status, "_board_alerts", lambda app: empty(app))  # board unreachable: no claim
    assert asyncio.run(status.status_view(cfg.gateway, {m.name: m for m in cfg.models}, {}, {}))["models"]["ce"]["restarts"] is None


# --- delivery ---
def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.02)
    assert predicate()


def test_webhook_gets_the_alert_and_broken_or_slow_targets_are_counted_never_raised():
    good, slow = Receiver(), Receiver(delay_s=2)
    targets = [AlertTarget(url="http://127.0.0.1:9/nothing-listens"), AlertTarget(url=slow.url), AlertTarget(url=good.url)]
    delivery = AlertDelivery(targets, timeout_s=0.3)
    try:
        t0 = time.perf_counter()
        delivery.submit({"event": "alert", "text": "[app] ALERT ce: replica r1 gone", "model": "ce"})
        assert time.perf_counter() - t0 < 0.05  # the caller never waits for delivery
        wait_until(lambda: good.bodies)
        assert good.bodies[0]["model"] == "ce" and good.bodies[0]["event"] == "alert"
        wait_until(lambda: delivery.stats == {"sent": 1, "failed": 2, "dropped": 0})
    finally:
        delivery.close()
        good.close()
        slow.close()


def test_a_full_delivery_queue_drops_and_counts():
    slow = Receiver(delay_s=0.5)
    delivery = AlertDelivery([AlertTarget(url=slow.url)], timeout_s=2)
    try:
        for i in range(150):
            delivery.submit({"event": "alert", "text": f"m{i}"})
        assert delivery.stats["dropped"] >= 49
    finally:
        slow.close()


def test_the_board_loop_sends_what_the_tracker_decides(monkeypatch):
    from deployments import status_board

    receiver, clock = Receiver(), Clock()
    live = {"r1": replica(NODE_A), "r2": replica(NODE_B)}
    monkeypatch.setattr(status_board, "app_deployments", lambda app: {})
    monkeypatch.setattr(status_board, "_models", lambda deps, models: {"ce": ModelView(2, dict(live), 7)})
    monkeypatch.setattr(status_board, "_nodes", lambda: None)
    cfg = AlertsConfig(targets=[AlertTarget(url=receiver.url)], check_period_s=0.05)
    loop = status_board._AlertLoop(("k",), "app", cfg, {}, lambda: {"ce": {}}, lambda: {})
    try:
        time.sleep(0.2)
        live.pop("r1")
        wait_until(lambda: receiver.bodies)
        time.sleep(0.3)
        assert [b["replica"] for b in receiver.bodies] == ["r1"] and receiver.bodies[0]["node_id"] == NODE_A
        assert loop.recent[0]["what"] == "gone"
    finally:
        loop.stop()
        receiver.close()


def test_alert_targets_are_typed_config():
    cfg = parse_app_config({"gateway": {"alerts": {"targets": [
        {"url": "http://127.0.0.1:9000/hook"}, {"kind": "apprise", "url": "slack://T000/B000/XXXX"}]}},
        "models": [{"name": "m", "kind": "rerank", "engine": "transformers", "source": "o/m"}]})
    assert [t.kind for t in cfg.gateway.alerts.targets] == ["webhook", "apprise"]
    with pytest.raises(ConfigError, match="alerts"):
        parse_app_config({"gateway": {"alerts": {"targets": [{"url": "slack://x"}]}},
                          "models": [{"name": "m", "kind": "rerank", "engine": "transformers", "source": "o/m"}]})


def test_replica_snapshots_carry_the_request_ids_an_alert_names():
    from deployments.health import HealthMonitor
    from serve_app.config import HealthSettings

    class Boom(RuntimeError):
        status = 500

    h = HealthMonitor(HealthSettings())
    try:
        with _tracked(h, "rid-bad"):
            raise Boom("engine died")
    except Boom:
        pass
    h.started("rid-stuck")
    snap = h.snapshot()
    assert snap["failed_request_ids"] == ["rid-bad"] and snap["in_flight_request_ids"] == ["rid-stuck"]
    t, clock = tracker()
    report = {**snap, "check_ok": False, "last_error": "stalled: 1 request(s) in flight", "reported_at": clock.t + 2}
    step(t, clock, world(clock, {"r1": replica()}, target=1))
    [alert] = step(t, clock, world(clock, {"r1": replica()}, reports={"r1": report}, target=1))
    assert alert["request_ids"] == ["rid-bad", "rid-stuck"]


def _tracked(monitor, rid):
    from deployments.health import _Tracked

    return _Tracked(monitor, rid)


def test_an_open_circuit_alerts_once_and_recovers_when_every_router_closes_it():
    from serve_app.alerts import CIRCUIT_OPEN, AlertTracker, World
    from serve_app.config import AlertsConfig

    now = [1000.0]
    tracker = AlertTracker(AlertsConfig(targets=[{"kind": "webhook", "url": "http://127.0.0.1:9/x"}], window_s=60),
                           "app", clock=lambda: now[0])

    def period(circuits):
        now[0] += 2
        return tracker.observe(World(models=None, reports={}, nodes=None, circuits=circuits))

    assert period({"chat": {"r1": {"state": "closed"}}}) == []
    opened = {"state": "open", "since": 1001.0, "last_error": "the engine failed: CUDA error"}
    (alert,) = period({"chat": {"r1": opened, "r2": {"state": "closed"}}})
    assert alert["event"] == "alert" and alert["what"] == CIRCUIT_OPEN and alert["model"] == "chat"
    assert "CUDA error" in alert["text"] and "1 of 2 router" in alert["text"]
    assert period({"chat": {"r1": opened, "r2": opened}}) == []  # still the same incident
    (recovery,) = period({"chat": {"r1": {"state": "closed"}, "r2": {"state": "closed"}}})
    assert recovery["event"] == "recovery" and recovery["model"] == "chat"


def test_the_breaker_reports_opening_and_closing_once_each():
    from serve_app.resilience import CircuitBreaker

    now, seen = [0.0], []
    b = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0], on_change=lambda br: seen.append(br.state))
    b.failure("x")
    assert seen == []
    b.failure("y")
    b.success()
    b.success()
    assert seen == ["open", "closed"]
