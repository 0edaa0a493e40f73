"""Pushed alerts on the real stack: a webhook receiver on loopback hears exactly one alert, naming
the node, when a replica is killed, and one recovery when Serve has replaced it; a stall alerts
within two health periods; replicas killed again and again inside the window stay one alert; a
status board killed and made anew still alerts, with its restart counts; the status page in
headless Chromium shows a killed replica as gone within one refresh.

Each test has a model of its own in the app: alerts are rate-limited per model, so no test waits
out an earlier test's window. Only the flapping test, whose property is the window itself, waits
for its end: it opens the window first, the other models' tests run inside it, and its second half
checks how the window ended."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from ray import serve

from deployments.serve_view import app_deployments, state_name
from tests.browser import chromium_dom, console_errors, needs_chromium
from tests.e2e.conftest import chaos_app, deploy, kept_apps, wait_for
from tests.e2e.test_chaos import Load, replica_ids
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e
APP = "alerts"
# 75 s: room for the first kill's replacement and alert with 10 s to spare even at CI's slowest (30-45+ s
# when its suite took 72 min, before vLLM's idle spin was capped; 5-15 s here since); the flapping
# test holds either ending of the second to the rule. Its second half waits the window out: 90 s
# cost the suite ~15 s more.
WINDOW_S, CHECK_PERIOD_S = 75, 1
# The status page test kills a replica of KILL after KILL's own test: it checks no alert.
KILL, FLAP, STALL = "ce-kill", "ce-flap", "ce-stall"


@pytest.fixture(scope="module")
def alerting(stack):
    receiver = Receiver()
    args = chaos_app(stack.tiny_models.ce, {}, names=(KILL, FLAP, STALL))
    args["gateway"]["alerts"] = {"targets": [{"url": receiver.url}], "window_s": WINDOW_S, "check_period_s": CHECK_PERIOD_S}
    deploy({**kept_apps(stack), APP: args})
    try:
        yield receiver
    finally:
        deploy(kept_apps(stack))
        receiver.close()


def _deployment(model: str) -> str:
    return f"rerank-{model}"


def _replicas(model: str) -> set[str]:
    return replica_ids(APP, deployment=_deployment(model))


def _actor(model: str, replica_id: str):
    return ray.get_actor(f"SERVE_REPLICA::{APP}#{_deployment(model)}#{replica_id}", namespace="serve")


def _node_of(model: str, replica_id: str) -> str:
    from ray._private.state import actors

    return actors(actor_id=_actor(model, replica_id)._actor_id.hex())["Address"]["NodeID"]


def _kill(model: str, replica_id: str) -> None:
    ray.kill(_actor(model, replica_id), no_restart=True)


def _listed(model: str) -> set[str]:
    """The replicas Serve lists (the status view's source of who exists)."""
    return {r["replica_id"] for r in app_deployments(APP)[_deployment(model)]["replicas"]}


def _restarts(stack, model: str) -> int:
    with httpx.Client(base_url=f"{stack.base}/{APP}", timeout=30) as c:
        return c.get("/v1/status").json()["models"][model]["restarts"]


def _about(receiver: Receiver, model: str) -> list[dict]:
    return [b for b in receiver.bodies if b.get("key") == f"model:{model}"]


def _events(receiver: Receiver, model: str) -> list[str]:
    return [b["event"] for b in _about(receiver, model)]


def _both_up(model: str) -> None:
    wait_for(lambda: len(_replicas(model)) == 2, 90, f"two replicas of {model}")


def _fresh(receiver: Receiver, model: str) -> None:
    """Both replicas up and no earlier alert of this model within reach: none in the usual case; on
    a machine slow enough that start-up itself alerted (a late health report), that alert's
    recovery and the end of its window are awaited, then it is forgotten."""
    _both_up(model)
    events = lambda: _events(receiver, model)  # noqa: E731
    wait_for(lambda: events().count("alert") == events().count("recovery"), WINDOW_S, "earlier alerts to recover")
    alerts = [b["at"] for b in _about(receiver, model) if b["event"] == "alert"]
    if alerts:
        time.sleep(max(0.0, alerts[-1] + WINDOW_S + 2 * CHECK_PERIOD_S - time.time()))
    receiver.bodies[:] = [b for b in receiver.bodies if b.get("key") != f"model:{model}"]


def _running(model: str) -> set[str]:
    """The replicas Serve lists as RUNNING: one controller call. (Polling through the handle, 30
    calls a time, loads the one replica left while its replacement starts on the same 2 cores.)"""
    return {r["replica_id"] for r in app_deployments(APP)[_deployment(model)]["replicas"] if state_name(r.get("state")) == "RUNNING"}


def _kill_and_replace(model: str, timeout: float) -> float:
    """Kill one replica and wait until Serve runs two again without it; returns when that was seen."""
    victim = sorted(_running(model))[0]
    _kill(model, victim)
    wait_for(lambda: (lambda running: len(running) == 2 and victim not in running)(_running(model)), timeout,
             f"a replacement of {victim}")
    return time.time()


FLAPPED: dict = {}  # what the flapping test's first half saw, for its second half


def test_replicas_killed_again_within_the_window_alert_once_inside_it(stack, alerting):
    """Kill a replica: one alert, and a recovery once Serve replaced it. Kill again inside the window:
    the second incident is folded into the window, never alerted inside it. The window's end is held
    to the rule by `test_the_window_of_replicas_killed_again_ends_by_the_rule`, after the killed-
    replica, stall and status page tests (other models: their minutes are spent inside this window,
    which the suite used to wait out idle)."""
    FLAPPED.clear()
    _fresh(alerting, FLAP)
    first_killed = time.time()
    _kill_and_replace(FLAP, 150)
    first = wait_for(lambda: next((b for b in _about(alerting, FLAP) if b["event"] == "alert"), None), 30, "the alert")
    assert first["at"] >= first_killed - 1, first  # how soon is the killed-replica test's property, not this one's
    wait_for(lambda: _events(alerting, FLAP)[-1:] == ["recovery"], 30, "the first incident's recovery")
    end = first["at"] + WINDOW_S
    assert time.time() < end - 10, f"one replacement took {time.time() - first_killed:.0f}s: no second kill fits the {WINDOW_S}s window"
    replaced = _kill_and_replace(FLAP, 150)
    if time.time() < end - 1:  # still inside the window: the second incident is not alerted
        assert [b for b in _about(alerting, FLAP) if b["event"] == "alert"] == [first], [b["text"] for b in _about(alerting, FLAP)]
    FLAPPED.update(first=first, end=end, replaced=replaced)


def test_a_killed_replica_is_one_alert_naming_its_node_and_one_recovery(stack, alerting):
    _fresh(alerting, KILL)
    victim = sorted(_replicas(KILL))[0]
    node = _node_of(KILL, victim)
    t0 = time.time()
    _kill(KILL, victim)
    alert = wait_for(lambda: next((b for b in _about(alerting, KILL) if b["event"] == "alert"), None), 30, "the alert")
    assert alert["model"] == KILL and alert["replica"] == victim and alert["node_id"] == node, alert
    assert alert["what"] in ("gone", "silent") and alert["at"] - t0 < 15 and node in alert["text"]
    recovery = wait_for(lambda: next((b for b in _about(alerting, KILL) if b["event"] == "recovery"), None), 90, "the recovery")
    assert recovery["model"] == KILL and recovery["key"] == alert["key"]
    time.sleep(5)
    assert _events(alerting, KILL) == ["alert", "recovery"], [b["text"] for b in _about(alerting, KILL)]


def test_a_stalled_replica_alerts_within_two_health_periods_with_its_request_ids(stack, alerting):
    _fresh(alerting, STALL)
    handle = serve.get_deployment_handle(_deployment(STALL), app_name=APP)
    stalled = handle.inject_fault.remote("stall").result()
    t0 = time.time()
    load = Load(f"{stack.base}/{APP}", threads=4, model=STALL)
    try:
        alert = wait_for(lambda: next((b for b in _about(alerting, STALL) if b["event"] == "alert"), None), 30, "the stall alert")
        # stall_after_s 1 + two health periods of 1 s + one board check period + slack
        assert alert["replica"] == stalled and alert["what"] == "stalled" and alert["at"] - t0 <= 1 + 2 + 1 + 2, alert
        assert alert["request_ids"], alert  # the requests stuck in it
        wait_for(lambda: "recovery" in _events(alerting, STALL), 90, "the recovery after replacement")
    finally:
        load.stop()


@needs_chromium
def test_the_status_page_shows_a_killed_replica_gone_within_one_refresh(stack, alerting, tmp_path):
    _both_up(KILL)
    page = f"{stack.base}/{APP}/status"
    victim, restarts = sorted(_replicas(KILL))[0], _restarts(stack, KILL)
    before, log = chromium_dom(page, 1000, tmp_path)
    assert victim in before and console_errors(log) == [], console_errors(log)
    _kill(KILL, victim)
    wait_for(lambda: victim not in _listed(KILL), 30, "Serve to stop listing the killed replica")
    later, log = chromium_dom(page, 4000, tmp_path)  # the first fetch and one refresh (every 3 s)
    row = later[later.index(victim):].split("</tr>")[0]
    assert ">gone<" in row and "gone since" in row, row
    assert console_errors(log) == [], console_errors(log)
    wait_for(lambda: _restarts(stack, KILL) == restarts + 1, 10, "the killed replica counted in the model's restarts")


def test_the_window_of_replicas_killed_again_ends_by_the_rule(stack, alerting):
    """The end of the window that test_replicas_killed_again_within_the_window_... opened. How it
    ends depends on how fast this machine replaces a replica (CI's took 30 s, then over 45 s), so
    both endings are held to the rule, and the test waits for whichever came:
    - replaced well before the window ends: nothing more, once the window is over;
    - still open when the window ends: exactly one more alert, not before the window's end,
      counting the folded incident, and its recovery."""
    if not FLAPPED:
        pytest.fail("test_replicas_killed_again_within_the_window_alert_once_inside_it did not finish: no window to check")
    first, end, replaced = FLAPPED["first"], FLAPPED["end"], FLAPPED["replaced"]
    time.sleep(max(0.0, end + 2 * CHECK_PERIOD_S + 5 - time.time()))
    wait_for(lambda: _events(alerting, FLAP)[-1:] == ["recovery"], 60, "every incident's recovery")
    about = _about(alerting, FLAP)
    alerts = [b for b in about if b["event"] == "alert"]
    assert [b["event"] for b in about] == ["alert", "recovery"] * len(alerts), [b["text"] for b in about]
    assert alerts[0] == first and all(a["at"] >= end and a["folded"] >= 1 for a in alerts[1:]), [b["text"] for b in about]
    # The board closes an incident at its next check after Serve lists the replacement RUNNING.
    if replaced < end - 2 * CHECK_PERIOD_S - 1:
        assert len(alerts) == 1, [b["text"] for b in about]
    elif replaced > end + 2 * CHECK_PERIOD_S:
        assert len(alerts) == 2, [b["text"] for b in about]
    if len(alerts) == 2:  # the next test needs FLAP out of any window
        time.sleep(max(0.0, alerts[1]["at"] + WINDOW_S + 2 * CHECK_PERIOD_S - time.time()))


def test_a_board_made_anew_still_alerts_once_and_keeps_the_restart_count(stack, alerting):
    """The status board killed for good (issue 20.11): the next one, made when a replica posts,
    takes the alert config and restart counts it saved, so the replica killed next is one alert.
    Runs on FLAP after its test, which waited FLAP's window out."""
    _both_up(FLAP)
    receiver_before = len(_about(alerting, FLAP))
    restarts = wait_for(lambda: _restarts(stack, FLAP) or None, 30, "the flapping test's restarts on /v1/status")
    old = ray.get_actor(f"status_board::{APP}", namespace="serve_app")
    ray.kill(old, no_restart=True)

    def new_board():
        try:
            board = ray.get_actor(f"status_board::{APP}", namespace="serve_app")
            return board if board._actor_id != old._actor_id and ray.get(board.alert_state.remote(), timeout=10)["enabled"] else None
        except (ValueError, ray.exceptions.RayError):
            return None

    board = wait_for(new_board, 60, "a new status board, configured")
    # A board can say a replica is gone once it has seen it: both of FLAP's replicas report to it
    # (each health period), and it has compared them with Serve's list for a few periods.
    wait_for(lambda: len(ray.get(board.read.remote(), timeout=10).get(FLAP, {})) >= 2, 60, f"{FLAP}'s replicas on the new board")
    time.sleep(5 * CHECK_PERIOD_S)
    # The router finds the new board at its next call (its kept handle names the dead one first).
    wait_for(lambda: _restarts(stack, FLAP) == restarts, 30, f"{restarts} restarts of {FLAP} on the new board")
    _kill(FLAP, sorted(_replicas(FLAP))[0])
    alert = wait_for(lambda: next((b for b in _about(alerting, FLAP)[receiver_before:] if b["event"] == "alert"), None), 30,
                     "the alert from the new board")
    assert alert["model"] == FLAP and alert["what"] in ("gone", "silent"), alert
    time.sleep(10)
    assert _events(alerting, FLAP)[receiver_before:].count("alert") == 1, [b["text"] for b in _about(alerting, FLAP)]
