"""The request's story as OpenTelemetry spans, in the same trace as Serve's own.

Ray Serve traces its proxy, replicas and handle calls when its `tracing_config` is on (the top of
serve_config.yaml: cluster-wide), through the span processors an exporter function returns:
`otlp_exporter` below sends them over OTLP/HTTP to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, which the
builder sets on every deployment of an app from `gateway.tracing.otlp_endpoint` (serve_app/app.py).
Inside that trace the router adds its own: one span per request (`serve_app POST /v1/...`, with the
request id, key name, model, status, outcome, retries and fallbacks), one per attempt (model,
replica, node, outcome), current while the handle call runs, so the model replica's Serve span is
its child; and, for LLMs, one for vLLM's own timings of the request (queue, prefill, decode),
placed where the engine worked. Off unless Serve's tracing is on in this process: then nothing is
imported and each request costs one flag check.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from serve_app.config_base import StrictConfig

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # the OTel SDK's own variable: its exporter reads it
SERVICE_ENV = "OTEL_SERVICE_NAME"
TRACER = "serve_app"
EXPORTER = "serve_app.tracing:otlp_exporter"


class TracingSettings(StrictConfig):
    """`gateway.tracing`: where this app's spans go (docs/OPERATIONS.md). Serve's own tracing must be
    on too: `tracing_config: {enabled: true, exporter_import_path: serve_app.tracing:otlp_exporter}`
    at the top of serve_config.yaml (it is cluster-wide; `check` says when it is missing)."""

    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces; unset: no export")
    service_name: str = Field("serve-app", min_length=1, max_length=200, description="the spans' service.name")

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL of an OTLP/HTTP traces endpoint")
        return v

    def env(self) -> dict[str, str]:
        """What every deployment of the app gets in its environment (the exporter reads it)."""
        return {ENDPOINT_ENV: self.otlp_endpoint, SERVICE_ENV: self.service_name} if self.otlp_endpoint else {}


def otlp_exporter() -> list[Any]:
    """Serve's `tracing_config.exporter_import_path` (`serve_app.tracing:otlp_exporter`; Serve calls
    it with no arguments): batches of spans to the OTLP/HTTP endpoint in this process's
    environment; none where it has none (a proxy, or another app's replica, with tracing on
    cluster-wide)."""
    if not os.environ.get(ENDPOINT_ENV):
        return []
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


def _serve_flag() -> Any:
    """Serve's own switch, looked up once: an import statement per call cost 24 µs (measured)."""
    try:
        from ray.serve._private import tracing_utils
    except ImportError:  # a Ray without Serve's tracing: nothing to join
        return lambda: False
    return tracing_utils.is_tracing_enabled


_IS_ON = _serve_flag()
_OFF = contextlib.nullcontext()  # what `span` is when tracing is off: no generator, no allocation


def enabled() -> bool:
    """Serve's tracing is set up in this process (its replica did it before our code ran)."""
    return _IS_ON()


def span(name: str, attributes: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """A span of ours, current for the block (handle calls in it carry it to the replica); when
    tracing is off, a context that yields None."""
    return _span(name, attributes) if enabled() else _OFF


@contextlib.contextmanager
def _span(name: str, attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry import trace

    with trace.get_tracer(TRACER).start_as_current_span(name, attributes=_clean(attributes), record_exception=False) as s:
        yield s


def describe_attempt(s: Any, entry: dict[str, Any] | None) -> None:
    """An attempt's span gets what its story entry says (stories.attempt)."""
    if s is None or entry is None:
        return
    s.set_attributes(_clean({f"serve_app.{k}": v for k, v in entry.items() if k != "at_ms"}))
    if entry.get("outcome") != "ok":
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, str(entry.get("error") or entry.get("outcome"))))


def describe_request(s: Any, story: dict[str, Any]) -> None:
    """The request's span gets the finished story's summary, and a child span for vLLM's own
    timings of it, ending when the engine's work was seen to end (the stream's end, or the
    attempt that answered) and as long as queue + prefill + decode."""
    if s is None:
        return
    router = story.get("router") or {}
    s.set_attributes(_clean({
        "serve_app.key": story.get("key"), "serve_app.model": story.get("model"),
        "serve_app.status": story.get("status"), "serve_app.outcome": story.get("outcome"),
        "serve_app.retries": story.get("retries"), "serve_app.fallbacks": ",".join(story.get("fallbacks") or ()),
        "serve_app.router_replica": router.get("replica_id"), "serve_app.router_node": router.get("node_id"),
        "http.response.status_code": story.get("status"), "serve_app.error": (story.get("error") or {}).get("message"),
        "serve_app.first_token_ms": story.get("first_token_ms"),
    }))
    engine = story.get("engine")
    if engine:
        from opentelemetry import trace

        ok = [a for a in story.get("attempts", ()) if a.get("outcome") == "ok"]
        end_ms = story["duration_ms"] if story.get("stream") or not ok else ok[-1]["at_ms"] + ok[-1]["duration_ms"]
        took_ms = (engine.get("queued_ms") or 0) + (engine.get("prefill_ms") or 0) + (engine.get("decode_ms") or 0)
        end_ns = int((story["arrived_at"] + end_ms / 1000) * 1e9)
        child = trace.get_tracer(TRACER).start_span(
            "vllm request", context=trace.set_span_in_context(s), start_time=end_ns - int(took_ms * 1e6),
            attributes=_clean({f"vllm.{k}": v for k, v in engine.items()} | {"serve_app.request_id": story["id"]}))
        child.end(end_time=end_ns)
    if (story.get("status") or 0) >= 500 or story.get("outcome") == "failed_mid_stream":
        from opentelemetry.trace import Status, StatusCode

        s.set_status(Status(StatusCode.ERROR, (story.get("error") or {}).get("message") or story.get("outcome")))


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OTel attributes are str, bool, int, float (or lists of them): None is left out."""
    return {k: v for k, v in attributes.items() if isinstance(v, (str, bool, int, float))}

