"""OpenTelemetry on the real stack: with Serve's tracing on (serve_app.tracing:otlp_exporter) and
`gateway.tracing.otlp_endpoint` naming an OTLP/HTTP receiver this test runs, one request yields one
trace holding the router's spans and the model replica's Serve span, carrying the request id."""

from __future__ import annotations

import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.e2e.conftest import deploy, kept_apps, wait_for
from tests.local_servers import ThreadedServer

# After the shared apps are up: Serve's tracing config is cluster-wide, read by every replica that
# starts while it is on, and the shared apps start in the background until then.
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared")]


class OtlpReceiver:
    """POST /v1/traces (OTLP/HTTP, protobuf) on a loopback port; keeps every span it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

        self.spans: list[dict] = []
        self._lock = threading.Lock()

        async def traces(request: Request) -> Response:
            batch = ExportTraceServiceRequest.FromString(await request.body())
            with self._lock:
                for rs in batch.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                            self.spans.append({"service": service, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                               "parent": span.parent_span_id.hex(), "name": span.name, "attributes": attrs})
            return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

        self.server = ThreadedServer(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]))
        self.endpoint = f"{self.server.url}/v1/traces"

    def trace_of(self, rid: str) -> list[dict] | None:
        with self._lock:
            ours = next((s for s in self.spans if s["attributes"].get("serve_app.request_id") == rid
                         and s["name"].startswith("serve_app POST")), None)
            return [s for s in self.spans if s["trace"] == ours["trace"]] if ours else None


def _ancestors(span: dict, spans: list[dict]) -> list[str]:
    by_id = {s["id"]: s for s in spans}
    out, parent = [], span["parent"]
    while parent in by_id and parent not in out:
        out.append(parent)
        parent = by_id[parent]["parent"]
    return out


def _replica_span(span: dict) -> bool:
    return (span["service"] == "serve-app-e2e" and span["attributes"].get("deployment") == "rerank-ce"
            and "replica_id" in span["attributes"])


def test_one_request_is_one_trace_with_the_routers_and_the_replicas_spans(stack):
    receiver = OtlpReceiver()
    app = {"gateway": {"tracing": {"otlp_endpoint": receiver.endpoint, "service_name": "serve-app-e2e"},
                       "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}},
           "models": [{"name": "ce", "kind": "rerank", "engine": "transformers", "source": str(stack.tiny_models.ce),
                       "deployment": {"ray_actor_options": {"num_cpus": 0.25}}}]}
    tracing = {"enabled": True, "exporter_import_path": "serve_app.tracing:otlp_exporter", "sampling_ratio": 1.0}
    try:
        deploy({**kept_apps(stack), "traced": app}, tracing=tracing)
        with httpx.Client(base_url=f"{stack.base}/traced", timeout=60) as c:
            r = c.post("/v1/rerank", json={"model": "ce", "query": "paris", "documents": ["paris", "rome"]},
                       headers={"x-request-id": "traced-req-1"})
        assert r.status_code == 200, r.text
        # The replica's own span (Serve's "replica_handle_request", with its replica_id); the
        # router's "route_to_replica" span names the deployment too and may be exported first.
        spans = wait_for(lambda: (lambda t: t if t and any(_replica_span(s) for s in t) else None)(receiver.trace_of("traced-req-1")),
                         60, "the request's spans at the OTLP receiver")
        by_name = {s["name"]: s for s in spans}
        request, attempt = by_name["serve_app POST /traced/v1/rerank"], by_name["serve_app attempt ce"]
        replica = next(s for s in spans if _replica_span(s))
        assert attempt["parent"] == request["id"]
        assert attempt["id"] in _ancestors(replica, spans), spans  # router → attempt → (Serve's handle call) → replica
        assert replica["attributes"]["request_id"] == "traced-req-1"  # Serve's own attribute
        assert request["attributes"]["serve_app.outcome"] == "ok" and attempt["attributes"]["serve_app.outcome"] == "ok"
        assert attempt["attributes"]["serve_app.replica"] == replica["attributes"]["replica_id"]
        assert {s["service"] for s in spans} == {"serve-app-e2e"}
    finally:
        deploy(kept_apps(stack), tracing={"enabled": False})  # replicas started later trace nothing
        receiver.server.close()
