"""Pushed alerts on the real stack: a webhook receiver on loopback hears exactly one alert, naming
the node, when a replica is killed, and one recovery when Serve has replaced it; a stall alerts
within two health periods; replicas killed again and again inside the window stay one alert; the
status page in headless Chromium shows a killed replica as gone within one refresh."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from ray import serve

from serve_app.status import serve_details
from tests.browser import chromium_dom, console_errors, needs_chromium
from tests.e2e.conftest import all_apps, deploy, wait_for
from tests.e2e.test_chaos import DEPLOYMENT, Load, chaos_app, replica_ids
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e
APP = "alerts"
WINDOW_S = 45


@pytest.fixture(scope="module")
def alerting(stack):
    receiver = Receiver()
    args = chaos_app(stack.tiny_models.ce, {})
    args["gateway"]["alerts"] = {"targets": [{"url": receiver.url}], "window_s": WINDOW_S, "check_period_s": 1}
    deploy({**all_apps(stack.tiny_models), APP: args})
    try:
        yield receiver
    finally:
        deploy(all_apps(stack.tiny_models))
        receiver.close()


def _node_of(replica_id: str) -> str:
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{replica_id}", namespace="serve")
    from ray._private.state import actors

    return actors(actor_id=actor._actor_id.hex())["Address"]["NodeID"]


def _kill(replica_id: str) -> None:
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{replica_id}", namespace="serve"), no_restart=True)


def _listed() -> set[str]:
    """The replicas Serve lists (the status view's source of who exists)."""
    return {r.replica_id for r in serve_details().applications[APP].deployments[DEPLOYMENT].replicas}


def _restarts(stack) -> int:
    with httpx.Client(base_url=f"{stack.base}/{APP}", timeout=30) as c:
        return c.get("/v1/status").json()["models"]["ce"]["restarts"]


def _settled(receiver: Receiver) -> None:
    """Both replicas up and every earlier incident recovered (or none yet)."""
    wait_for(lambda: len(replica_ids(APP)) == 2, 90, "two replicas")
    wait_for(lambda: sum(b["event"] == "alert" for b in receiver.bodies) == sum(b["event"] == "recovery" for b in receiver.bodies),
             90, "earlier alerts to recover")


def test_a_killed_replica_is_one_alert_naming_its_node_and_one_recovery(stack, alerting):
    _settled(alerting)
    time.sleep(WINDOW_S)  # outside any earlier alert's window
    alerting.bodies.clear()
    victim = sorted(replica_ids(APP))[0]
    node = _node_of(victim)
    t0 = time.time()
    _kill(victim)
    alert = wait_for(lambda: next((b for b in alerting.bodies if b["event"] == "alert"), None), 30, "the alert")
    assert alert["model"] == "ce" and alert["replica"] == victim and alert["node_id"] == node, alert
    assert alert["what"] in ("gone", "silent") and alert["at"] - t0 < 15 and node in alert["text"]
    recovery = wait_for(lambda: next((b for b in alerting.bodies if b["event"] == "recovery"), None), 90, "the recovery")
    assert recovery["model"] == "ce" and recovery["key"] == alert["key"]
    time.sleep(5)
    assert [b["event"] for b in alerting.bodies] == ["alert", "recovery"], [b["text"] for b in alerting.bodies]


def test_replicas_killed_again_within_the_window_stay_one_alert_and_one_recovery(stack, alerting):
    _settled(alerting)
    time.sleep(WINDOW_S)
    alerting.bodies.clear()
    for _ in range(3):  # flapping: kill, wait for the replacement, kill again
        _kill(sorted(replica_ids(APP))[0])
        wait_for(lambda: len(replica_ids(APP)) == 2, 60, "a replacement")
        time.sleep(3)
    time.sleep(WINDOW_S / 4)
    assert [b["event"] for b in alerting.bodies] == ["alert", "recovery"], [b["text"] for b in alerting.bodies]


def test_a_stalled_replica_alerts_within_two_health_periods_with_its_request_ids(stack, alerting):
    _settled(alerting)
    time.sleep(WINDOW_S)
    alerting.bodies.clear()
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    stalled = handle.inject_fault.remote("stall").result()
    t0 = time.time()
    load = Load(f"{stack.base}/{APP}", threads=4)
    try:
        alert = wait_for(lambda: next((b for b in alerting.bodies if b["event"] == "alert"), None), 30, "the stall alert")
        # stall_after_s 1 + two health periods of 1 s + one board check period + slack
        assert alert["replica"] == stalled and alert["what"] == "stalled" and alert["at"] - t0 <= 1 + 2 + 1 + 2, alert
        assert alert["request_ids"], alert  # the requests stuck in it
        wait_for(lambda: any(b["event"] == "recovery" for b in alerting.bodies), 90, "the recovery after replacement")
    finally:
        load.stop()


@needs_chromium
def test_the_status_page_shows_a_killed_replica_gone_within_one_refresh(stack, alerting, tmp_path):
    _settled(alerting)
    page = f"{stack.base}/{APP}/status"
    victim, restarts = sorted(replica_ids(APP))[0], _restarts(stack)
    before, log = chromium_dom(page, 1000, tmp_path)
    assert victim in before and console_errors(log) == [], console_errors(log)
    _kill(victim)
    wait_for(lambda: victim not in _listed(), 30, "Serve to stop listing the killed replica")
    later, log = chromium_dom(page, 4000, tmp_path)  # the first fetch and one refresh (every 3 s)
    row = later[later.index(victim):].split("</tr>")[0]
    assert ">gone<" in row and "gone since" in row, row
    assert console_errors(log) == [], console_errors(log)
    wait_for(lambda: _restarts(stack) == restarts + 1, 10, "the killed replica counted in the model's restarts")
