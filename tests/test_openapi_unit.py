"""The API page: /openapi.json is valid OpenAPI 3.1 (checked by openapi-spec-validator), lists every
route of the route table with its body model and errors, and /docs renders it in headless Chromium
with no remote asset and no console error."""

from __future__ import annotations

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.config import hash_key, parse_app_config
from serve_app.openapi import schema
from serve_app.router import Router
from tests.browser import chromium_dom, console_errors, needs_chromium
from tests.local_servers import ThreadedServer


def client(keys: bool = True) -> TestClient:
    api_keys = [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}] if keys else []
    cfg = parse_app_config({"gateway": {"api_keys": api_keys},
                            "models": [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat"}]})
    return TestClient(Router(cfg.gateway, cfg.models, {}).__serve_build_asgi_app__(), raise_server_exceptions=False)


BODILESS_POSTS = {"/v1/batches/{batch_id}/cancel"}  # a POST that takes no body


def undocumented(spec: dict) -> list[tuple[str, str]]:
    """Operations with no summary, or POSTs with no request body: routes missing from openapi.ROUTES."""
    return sorted((m, p) for p, ops in spec["paths"].items() for m, op in ops.items()
                  if not op["summary"] or (m == "post" and p not in BODILESS_POSTS and "requestBody" not in op))


def test_the_schema_is_valid_openapi_3_1_and_lists_every_route_with_its_body_and_errors():
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    c = client()
    spec = c.get("/openapi.json").json()  # open, as vLLM's, even with keys on
    validate(spec)
    table = {(r.path.replace("{model:path}", "{model}"), m.lower()) for r in c.app.routes for m in r.methods if m != "HEAD"}
    assert {(p, m) for p, ops in spec["paths"].items() for m in ops} == table
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    body = spec["components"]["schemas"][chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]]
    assert {"model", "messages", "stream", "max_tokens"} <= set(body["properties"]) and "messages" in body["required"]
    assert {"400", "401", "429", "503"} <= set(chat["responses"])
    assert [p["name"] for p in spec["paths"]["/v1/usage"]["get"]["parameters"]] == ["since", "until", "key"]
    assert undocumented(spec) == []
    # A route added to the table but not to openapi.ROUTES has no summary and no body: caught.
    extra = Route("/v1/new-thing", lambda request: None, methods=["POST"])
    assert undocumented(schema([*c.app.routes, extra])) == [("post", "/v1/new-thing")]
    dup = {**spec["paths"]["/health"]["get"], "operationId": spec["paths"]["/ready"]["get"]["operationId"]}
    broken = {**spec, "paths": {**spec["paths"], "/health": {"get": dup}}}
    with pytest.raises(OpenAPIValidationError):  # the validator does catch a broken schema (duplicate operationId)
        validate(broken)


def test_docs_is_served_without_a_key_and_loads_nothing_remote():
    page = client().get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "fetch(\"openapi.json\"" in page.text and "<script src" not in page.text and "<link" not in page.text


@needs_chromium
def test_docs_renders_every_route_in_a_real_browser(tmp_path):
    server = ThreadedServer(client(keys=True).app)
    try:
        dom, log = chromium_dom(f"{server.url}/docs", 2000, tmp_path)
        assert "/v1/chat/completions" in dom and "/v2/rerank" in dom and "request body" in dom and "POST" in dom
        assert console_errors(log) == [], console_errors(log)
    finally:
        server.close()
