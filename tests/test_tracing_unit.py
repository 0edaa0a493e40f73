"""The request's story as OpenTelemetry spans (serve_app/tracing.py), through the real router app
over fake handles, with an in-memory span exporter standing in for the OTLP endpoint (the e2e test
sends them over OTLP/HTTP to a receiver)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serve_app import tracing
from serve_app.errors import ReplicaFailed
from tests.fakes import FakeModel
from tests.test_resilience_unit import CHAT, client

SPANS = InMemorySpanExporter()


@pytest.fixture()
def traced(monkeypatch):
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # once per process, as Serve sets it up
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(SPANS))
        trace.set_tracer_provider(provider)
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    SPANS.clear()
    yield SPANS


def test_a_retried_request_is_one_trace_with_a_span_per_attempt(traced):
    c, _ = client(FakeModel("chat", "llm", fail=ReplicaFailed("died"), fail_times=1))
    assert c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "t-1"}).status_code == 200
    spans = {s.name: s for s in traced.get_finished_spans()}
    request = spans["serve_app POST /v1/chat/completions"]
    attempts = [s for s in traced.get_finished_spans() if s.name == "serve_app attempt chat"]
    assert len(attempts) == 2 and {s.context.trace_id for s in attempts} == {request.context.trace_id}
    assert all(s.parent.span_id == request.context.span_id for s in attempts)
    assert request.attributes["serve_app.request_id"] == "t-1" and request.attributes["serve_app.retries"] == 1
    assert request.attributes["serve_app.outcome"] == "ok" and request.attributes["http.response.status_code"] == 200
    assert [s.attributes["serve_app.outcome"] for s in attempts] == ["replica_failed", "ok"]
    assert attempts[1].attributes["serve_app.replica"] == "fake-replica"
    assert not attempts[0].status.is_ok and request.status.is_ok


def test_vllms_timings_become_a_span_where_the_engine_worked(traced):
    class Timed(FakeModel):
        async def _do_create(self, api, body, rid):
            import dataclasses

            out = await super()._do_create(api, body, rid)
            return dataclasses.replace(out, engine={"queued_ms": 2.0, "prefill_ms": 3.0, "decode_ms": 5.0, "prompt_tokens": 3,
                                                    "cached_tokens": 0, "generated_tokens": 1, "preemptions": 0,
                                                    "finish_reason": "length"})

    c, _ = client(Timed("chat", "llm"))
    assert c.post("/v1/chat/completions", json={"model": "chat", **CHAT}, headers={"x-request-id": "t-2"}).status_code == 200
    (engine,) = [s for s in traced.get_finished_spans() if s.name == "vllm request"]
    (attempt,) = [s for s in traced.get_finished_spans() if s.name == "serve_app attempt chat"]
    assert engine.end_time - engine.start_time == 10_000_000 and engine.attributes["vllm.queued_ms"] == 2.0
    assert engine.attributes["serve_app.request_id"] == "t-2"
    assert abs(engine.end_time - attempt.end_time) < 2_000_000  # ends with the attempt that answered


def test_off_unless_serves_tracing_is_on():
    SPANS.clear()
    c, _ = client(FakeModel("chat", "llm"))
    assert c.post("/v1/chat/completions", json={"model": "chat", **CHAT}).status_code == 200
    assert SPANS.get_finished_spans() == () and tracing.enabled() is False


def test_the_exporter_sends_only_where_an_endpoint_is_set(monkeypatch):
    """As Serve loads and checks it (a custom exporter takes no arguments)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from ray.serve._private.tracing_utils import _validate_tracing_exporter

    _validate_tracing_exporter(tracing.otlp_exporter)

    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    assert tracing.otlp_exporter() == []
    monkeypatch.setenv(tracing.ENDPOINT_ENV, "http://127.0.0.1:9/v1/traces")
    (processor,) = tracing.otlp_exporter()
    assert isinstance(processor, BatchSpanProcessor)
    processor.shutdown()
