"""The cap on vLLM's idle spin (deployments/engines/vllm_spin.py), on vLLM's real SpinCondition."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import pytest

from deployments.engines import vllm_spin

pytest.importorskip("vllm")  # the router-only install has no vLLM; with vLLM, the module must be where the plugin looks
from vllm.distributed.device_communicators import shm_broadcast  # noqa: E402
import zmq  # noqa: E402


@pytest.fixture
def spin_condition(monkeypatch):
    """vLLM's class, restored after the test (the plugin patches it for the whole process)."""
    cls = shm_broadcast.SpinCondition
    monkeypatch.setattr(cls, "__init__", cls.__init__)
    return cls


def reader_spin(cls, tmp_path, **kwargs) -> float:
    """A real reader/writer pair on an ipc socket: the reader's busy loop in seconds."""
    ctx = zmq.Context()
    address = f"ipc://{tmp_path}/notify"
    writer = cls(is_reader=False, context=ctx, notify_address=address)
    reader = cls(is_reader=True, context=ctx, notify_address=address, **kwargs)
    try:
        return reader.busy_loop_s
    finally:
        for s in (reader.local_notify_socket, reader.read_cancel_socket, reader.write_cancel_socket, writer.local_notify_socket):
            s.close(linger=0)
        ctx.term()


def test_the_plugin_caps_vllms_reader_spin_only_when_the_replica_names_a_value(spin_condition, monkeypatch, tmp_path):
    assert reader_spin(spin_condition, tmp_path) == 1  # vLLM 0.32's own: if this changes, so must the docs
    monkeypatch.delenv(vllm_spin.ENV, raising=False)
    vllm_spin.register()
    assert reader_spin(spin_condition, tmp_path) == 1
    monkeypatch.setenv(vllm_spin.ENV, "0.02")
    vllm_spin.register()
    assert reader_spin(spin_condition, tmp_path) == 0.02
    assert reader_spin(spin_condition, tmp_path, busy_loop_s=0.005) == 0.005  # never more than vLLM asks
    monkeypatch.setenv(vllm_spin.ENV, "0.1")
    vllm_spin.register()  # loaded again (another engine in the process): replaces, does not stack
    assert reader_spin(spin_condition, tmp_path) == 0.1


def test_a_bad_value_or_a_vllm_without_the_knob_changes_nothing(spin_condition, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(vllm_spin.ENV, "fast")
    vllm_spin.register()
    assert reader_spin(spin_condition, tmp_path) == 1
    monkeypatch.setenv(vllm_spin.ENV, "0.02")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "vllm.distributed.device_communicators.shm_broadcast", None)  # a vLLM that moved it
        vllm_spin.register()  # vLLM calls it unguarded in every engine process: it must not raise

    class Other:
        def __init__(self, is_reader: bool) -> None:
            self.is_reader = is_reader

    assert not vllm_spin.cap_spin(Other, 0.02) and not vllm_spin.cap_spin(None, 0.02)
    assert Other(True).is_reader and "is ignored" in caplog.text


def test_vllm_finds_the_plugin():
    """vLLM loads `vllm.general_plugins` in the processes it spawns: the entry point must be installed."""
    assert "deployments.engines.vllm_spin:register" in {e.value for e in entry_points(group="vllm.general_plugins")}
