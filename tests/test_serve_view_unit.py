"""deployments/serve_view.py: the cheap readers of Serve's view that scripts and tests poll with,
against a fake controller client (the e2e suite reads a real one)."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import pytest

from deployments import serve_view


class _State(str, enum.Enum):  # Serve's details hold enums or strings (serve_view.state_name)
    RUNNING = "RUNNING"
    STARTING = "STARTING"


class _Client:
    def __init__(self, apps: dict) -> None:
        self.apps, self.calls = apps, []

    def get_serve_details(self) -> dict:
        self.calls.append("details")
        return {"applications": self.apps}

    def get_serve_status(self, name: str):
        self.calls.append(("status", name))
        app = self.apps.get(name)
        return SimpleNamespace(
            app_status=SimpleNamespace(status=_State.RUNNING if app else "NOT_STARTED"),
            deployment_statuses=[SimpleNamespace(name=n, message=d.get("message", "")) for n, d in (app or {}).get("deployments", {}).items()])


@pytest.fixture
def client(monkeypatch) -> _Client:
    c = _Client({"a": {"deployments": {
        "llm": {"message": "", "replicas": [{"state": _State.RUNNING}, {"state": "RUNNING"}, {"state": _State.STARTING}]},
        "router": {"message": "waiting", "replicas": []},
    }}})
    monkeypatch.setattr(serve_view, "_get_global_client", lambda: c)
    return c


def test_replica_states_count_one_deployments_replicas_by_state_names(client):
    assert serve_view.replica_states("a", "llm") == {"RUNNING": 2, "STARTING": 1}
    assert serve_view.replica_states("a", "router") == {}  # listed, no replica in any state
    assert serve_view.replica_states("a", "gone") == {}
    with pytest.raises(KeyError):
        serve_view.replica_states("missing", "llm")  # the app is not there: as app_deployments says
    assert client.calls == ["details"] * 4  # one plain-dict call each, nothing validated


def test_app_status_names_the_status_and_each_deployments_message_from_one_apps_call(client):
    assert serve_view.app_status("a") == ("RUNNING", {"llm": "", "router": "waiting"})
    assert serve_view.app_status("nope") == ("NOT_STARTED", {})
    assert client.calls == [("status", "a"), ("status", "nope")]
